"""Shared model cache and per-session state.

The loaded models are shared by every session (they are big); each session keeps its own
artifact, masks and cancel flag. Weights are only ever changed under MODEL_LOCK, and always
put back dense before the lock is released, so no session can see another's masks.
"""
from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from core.calibrate import release_free_memory
from core.masks import MaskSet
from core.dense import DenseWeights
from core.models import LoadedModel, load_model

# One lock for every model: held while weights are masked or a forward pass needs them dense.
# A plain Lock (not RLock): gradio may resume a streaming generator on another thread.
MODEL_LOCK = threading.Lock()
_CACHE_LOCK = threading.Lock()
MAX_CACHED_MODELS = 2


@dataclass
class ModelEntry:
    key: tuple[str, str, str]
    lm: LoadedModel
    dense: DenseWeights  # the dense copy every session's artifact cuts from and restores to


_CACHE: "OrderedDict[tuple[str, str, str], ModelEntry]" = OrderedDict()


def get_model(spec: str, dtype: str = "float32", device: str = "cpu") -> ModelEntry:
    """Load (once) and return the shared model for (spec, dtype, device); raises ModelLoadError."""
    key = (str(spec).strip(), dtype, device)
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is not None:
            _CACHE.move_to_end(key)
            return entry
        lm = load_model(key[0], dtype=dtype, device=device)
        entry = ModelEntry(key, lm, DenseWeights(lm))
        _CACHE[key] = entry
        while len(_CACHE) > MAX_CACHED_MODELS:  # sessions still holding an evicted entry keep it alive
            _CACHE.popitem(last=False)
        return entry


def cached_keys() -> list[tuple[str, str, str]]:
    with _CACHE_LOCK:
        return list(_CACHE)


@dataclass
class Session:
    """What one browser tab (or one gradio_client.Client) owns."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    model: ModelEntry | None = None
    artifact: object | None = None  # core.pruning.Artifact
    masks: MaskSet | None = None
    sparsity: float = 0.5
    pattern: str = "unstructured"
    cancel: threading.Event = field(default_factory=threading.Event)
    prepared: dict = field(default_factory=dict)  # (id(artifact), matrix) -> figures.PreparedScores
    ppl_runs: list = field(default_factory=list)  # {"method", "pattern", "sparsity", "ppl", "protocol"}
    ppl_dense: dict = field(default_factory=dict)  # protocol text -> dense perplexity
    # what the page's plots show: (the MaskSet drawn in the allocation, the matrix drawn below it)
    shown: tuple = (None, None)
    structured: object | None = None  # explorer.structured_view.StructuredRun of a structured method
    # (the structured MaskSet, its physically sliced LoadedModel): what generation runs as "pruned"
    sliced: tuple | None = None
    # a calibration whose first cut was cancelled (a weight-updating method's solve): the session
    # kept its previous masks; Calibrate at the same settings resumes from this artifact and the
    # matrices it already solved instead of calibrating and solving again
    interrupted: object | None = None
    _tmp: str | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value; an Event cannot be
        return self

    def reset_pruning(self) -> None:
        self.artifact = None
        self.structured = None
        self.masks = None
        self.sliced = None
        self.interrupted = None
        self.prepared.clear()
        self.shown = (None, None)

    def tmpdir(self) -> Path:
        """This session's folder for exports, under the app's one temporary root (tmp_root)."""
        if self._tmp is None or not Path(self._tmp).is_dir():
            self._tmp = tempfile.mkdtemp(prefix=f"session-{self.id}-", dir=tmp_root())
        return Path(self._tmp)

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def release(self) -> None:
        """Drop everything this session holds (artifact, masks, prepared figures, sliced model,
        its temporary folder) and hand the freed memory back to the OS. Gradio calls it when
        the tab closes (the app's unload event) or the session has been idle for its state's
        time-to-live. A job still running for the session is cancelled at its next block."""
        self.cancel.set()
        self.reset_pruning()
        self.model = None
        self.ppl_runs.clear()
        self.ppl_dense.clear()
        self.cleanup()
        gc.collect()  # figures and masks can sit in reference cycles
        release_free_memory()  # glibc keeps freed heap pages resident otherwise


def release_session(value) -> None:
    """gr.State's delete_callback: release a Session (anything else is left alone)."""
    if isinstance(value, Session):
        value.release()


_TMP_ROOT: str | None = None
_TMP_ROOT_LOCK = threading.Lock()
_TMP_PREFIX = "explorer-app-"


def tmp_root() -> Path:
    """The one temporary folder this server process owns (every session's folder lives in it),
    made on first use and removed when the process exits (atexit; launch.py turns SIGTERM into
    a normal exit). Roots left by servers that were killed outright are removed here too."""
    global _TMP_ROOT
    with _TMP_ROOT_LOCK:
        if _TMP_ROOT is None or not Path(_TMP_ROOT).is_dir():
            _remove_stale_roots()
            _TMP_ROOT = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-")
            atexit.register(shutil.rmtree, _TMP_ROOT, True)
        return Path(_TMP_ROOT)


def _remove_stale_roots() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{_TMP_PREFIX}*"):
        pid = folder.name[len(_TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True
