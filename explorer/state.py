"""Shared model cache and per-session state.

The loaded models are shared by every session (they are big); each session keeps its own
artifact, masks and cancel flag. Weights are only ever changed under MODEL_LOCK, and always
put back dense before the lock is released, so no session can see another's masks.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from core.masks import DenseWeights, MaskSet
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
    _tmp: str | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value; an Event cannot be
        return self

    def reset_pruning(self) -> None:
        self.artifact = None
        self.structured = None
        self.masks = None
        self.sliced = None
        self.prepared.clear()
        self.shown = (None, None)

    def tmpdir(self) -> Path:
        if self._tmp is None or not Path(self._tmp).is_dir():
            self._tmp = tempfile.mkdtemp(prefix=f"explorer-{self.id}-")
        return Path(self._tmp)

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
