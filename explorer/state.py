"""Shared model cache and per-session state.

The loaded models are shared by every session (they are big); each session keeps its own
runs (calibration artifacts and masks, `Runs`), perplexities and cancel flag. Weights are only ever changed under MODEL_LOCK, and always
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
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.calibrate import release_free_memory
from core.dense import DenseWeights
from core.loaded_model import LoadedModel
from core.loading import load_model
from core.maskset import MaskSet
from core.outputs import process_folder
from core.run_source import RunSource, is_structured

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


@contextmanager
def model_as(entry: ModelEntry, masks: MaskSet | None = None):
    """The shared model with `masks` applied (None: dense) for the with-block, under MODEL_LOCK,
    and dense again after it whatever happens: the one way a job uses the shared weights."""
    with MODEL_LOCK:
        try:
            if masks is None:
                entry.dense.restore()
            else:
                entry.dense.apply(masks)
            yield entry.lm
        finally:
            entry.dense.restore()


def get_model(spec: str, dtype: str = "auto", device: str = "cpu", offload: str = "none") -> ModelEntry:
    """Load (once) and return the shared model for (spec, dtype, device, offload); raises
    ModelLoadError. dtype auto: the checkpoint's own when it is 16-bit, else float32. A cached
    model whose files changed or vanished on disk is loaded again (sessions on the old one are
    told so by ensure_model)."""
    key = (str(spec).strip(), dtype, device, offload)
    with _CACHE_LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry.dense.source_problem() is None:
            _CACHE.move_to_end(key)
            return entry
        if entry is not None:  # its files changed on disk: load what is there now
            del _CACHE[key]
        lm = load_model(key[0], dtype=dtype, device=device, offload=offload)
        entry = ModelEntry(key, lm, DenseWeights(lm))
        _CACHE[key] = entry
        while len(_CACHE) > MAX_CACHED_MODELS:  # sessions still holding an evicted entry keep it alive
            _CACHE.popitem(last=False)
        return entry


def cached_keys() -> list[tuple[str, str, str]]:
    with _CACHE_LOCK:
        return list(_CACHE)


@dataclass
class Run:
    """One calibration (or imported mask file) of a session: its settings, what cuts it (its
    core.run_source: cut from an artifact by the slider, a structured run pruned again, a fixed
    mask from a file that the slider leaves as it is) and its current masks."""

    id: str
    name: str
    method: str
    params: dict = field(default_factory=dict)
    pattern: str = "unstructured"
    text: str = ""  # the calibration text (protocol), in words
    origin: str = "calibrated"  # "calibrated", "imported" (a mask file), "reopened" (a session file)
    source: RunSource | None = None  # what gives its masks at a sparsity (None: a fixed mask)
    masks: MaskSet | None = None  # the current masks
    sparsity: float | None = None  # the slider value the masks were cut at (None: a fixed mask)
    visible: bool = True
    prepared: dict = field(default_factory=dict)  # (id(artifact), matrix) -> figures.PreparedScores
    files: list = field(default_factory=list)  # files the run owns (a reopened artifact), removed with it

    def drop_files(self) -> None:
        for path in self.files:
            try:
                os.remove(path)
            except OSError:
                pass
        self.files.clear()

    @property
    def artifact(self):
        """The calibration artifact the run is cut from (core.pruning.calibrate), if any."""
        return self.source.artifact if self.source is not None else None

    @property
    def cuttable(self) -> bool:
        """Whether the slider re-cuts this run (a calibration, or a structured method's run)."""
        return self.source is not None and self.source.follows_sparsity

    @property
    def kind(self) -> str:
        if self.source is not None:
            return self.source.kind
        return "structured (fixed mask)" if is_structured(self.masks) else "fixed mask"

    def forget_source(self) -> None:
        """Let go of what cuts the run (before its files go: core may read an artifact from them)."""
        self.source = None

    def describe(self) -> dict:
        """The run as a table row / JSON (no tensors)."""
        return {"id": self.id, "name": self.name, "method": self.method, "params": dict(self.params),
                "pattern": self.current_pattern(), "text": self.text, "origin": self.origin, "kind": self.kind,
                "sparsity": self.sparsity, "visible": self.visible,
                "achieved": None if self.masks is None else round(self.masks.total_sparsity(), 6)}

    def current_pattern(self) -> str:
        if self.masks is not None:
            return str(self.masks.meta.get("pattern", self.pattern))
        return self.pattern


class Runs:
    """A session's runs, in the order they were made, and which one is active (the one the
    heatmap, the status and the exports show)."""

    def __init__(self):
        self._runs: "OrderedDict[str, Run]" = OrderedDict()
        self.active_id: str | None = None
        self._counter = 0

    def __iter__(self):
        return iter(list(self._runs.values()))

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id) -> bool:
        return run_id in self._runs

    def new_id(self) -> str:
        self._counter += 1
        return f"r{self._counter}"

    def unique_name(self, base: str, exclude: str | None = None) -> str:
        names = {r.name for r in self._runs.values() if r.id != exclude}
        base = (base or "run").strip() or "run"
        if base not in names:
            return base
        i = 2
        while f"{base} #{i}" in names:
            i += 1
        return f"{base} #{i}"

    def add(self, run: Run, activate: bool = True) -> Run:
        if not run.id or run.id in self._runs:
            run.id = self.new_id()
        else:  # ids restored from a session file: later ids must not collide
            digits = run.id[1:] if run.id.startswith("r") else ""
            if digits.isdigit():
                self._counter = max(self._counter, int(digits))
        run.name = self.unique_name(run.name, exclude=run.id)
        self._runs[run.id] = run
        if activate or self.active_id is None:
            self.active_id = run.id
        return run

    def get(self, run_id: str | None) -> Run | None:
        return self._runs.get(run_id) if run_id else None

    def require(self, run_id: str | None) -> Run:
        run = self.get(run_id) or self.by_name(run_id)
        if run is None:
            raise ValueError(f"No run {run_id!r} in this session"
                             + (f": the runs are {', '.join(r.name for r in self)}." if self._runs else
                                ": calibrate or import a mask file first."))
        return run

    def by_name(self, name: str | None) -> Run | None:
        for run in self._runs.values():
            if run.name == name:
                return run
        return None

    @property
    def active(self) -> Run | None:
        return self._runs.get(self.active_id) if self.active_id else None

    def activate(self, run_id: str) -> Run:
        run = self.require(run_id)
        self.active_id = run.id
        return run

    def visible(self) -> list[Run]:
        return [r for r in self._runs.values() if r.visible and r.masks is not None]

    def rename(self, run_id: str, name: str) -> Run:
        run = self.require(run_id)
        name = (name or "").strip()
        if not name:
            raise ValueError("Type a new name for the run.")
        run.name = self.unique_name(name, exclude=run.id)
        return run

    def remove(self, run_id: str) -> Run:
        run = self.require(run_id)
        del self._runs[run.id]
        if self.active_id == run.id:
            self.active_id = next(reversed(self._runs), None) if self._runs else None
        return run

    def clear(self) -> None:
        self._runs.clear()
        self.active_id = None

    def choices(self) -> list[tuple[str, str]]:
        """(label, id) pairs for the dropdowns and the visibility checkboxes."""
        return [(r.name, r.id) for r in self._runs.values()]


@dataclass
class Session:
    """What one browser tab (or one gradio_client.Client) owns: its runs (each a calibration
    or an imported mask file), the perplexities it measured, and its temporary files."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    model: ModelEntry | None = None
    default_spec: str = ""  # the app's default model, loaded by the first handler that needs one
    runs: Runs = field(default_factory=Runs)
    sparsity: float = 0.5  # the slider's last value, and its pattern
    pattern: str = "unstructured"
    alloc_mode: str = "block"  # the overlaid allocation: "block", or "type" (per matrix type in a block)
    cancel: threading.Event = field(default_factory=threading.Event)
    ppl_runs: list = field(default_factory=list)  # {"run", "run_id", "method", "pattern", "sparsity", "ppl", "protocol"}
    ppl_dense: dict = field(default_factory=dict)  # protocol text -> dense perplexity
    # what the page's plots show: (the allocation's signature, (the MaskSet and matrix drawn below it))
    shown: tuple = (None, None)
    # [(structured MaskSet, its physically sliced LoadedModel)]: what generation runs as "pruned"
    sliced: list = field(default_factory=list)
    # a calibration whose first cut was cancelled (a weight-updating method's solve): the session
    # kept its previous masks; Calibrate at the same settings resumes from this artifact and the
    # matrices it already solved instead of calibrating and solving again
    interrupted: object | None = None
    compare_cache: dict = field(default_factory=dict)  # (id(masks A), id(masks B)) -> per-matrix counts
    _tmp: str | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value; an Event cannot be
        return self

    # The active run's parts, as one-run code reads them.
    @property
    def active(self) -> Run | None:
        return self.runs.active

    @property
    def masks(self) -> MaskSet | None:
        run = self.runs.active
        return run.masks if run is not None else None

    @property
    def artifact(self):
        run = self.runs.active
        return run.artifact if run is not None else None

    def reset_pruning(self) -> None:
        """Forget every run (another model was loaded, or a session file reopened)."""
        for run in self.runs:
            run.forget_source()  # before its files go: core may read an artifact from its file
            run.drop_files()
        self.runs.clear()
        self.sliced = []
        self.interrupted = None
        self.compare_cache.clear()
        self.shown = (None, None)

    def drop_run(self, run_id: str) -> Run:
        run = self.runs.remove(run_id)
        run.forget_source()
        run.drop_files()
        self.sliced = [(m, lm) for m, lm in self.sliced if m is not run.masks]
        self.compare_cache.clear()
        self.ppl_runs[:] = [p for p in self.ppl_runs if p.get("run_id") != run.id]
        self.shown = (None, None)
        return run

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
        """Drop everything this session holds (runs: artifacts, masks, prepared figures; sliced
        models, its temporary folder) and hand the freed memory back to the OS. Gradio calls it
        when the tab closes (the app's unload event) or the session has been idle for its
        state's time-to-live. A job still running for the session is cancelled at its next block."""
        self.cancel.set()
        self.reset_pruning()
        self.model = None
        SEATS.give_back(self.id)
        self.ppl_runs.clear()
        self.ppl_dense.clear()
        self.cleanup()
        gc.collect()  # figures and masks can sit in reference cycles
        release_free_memory()  # glibc keeps freed heap pages resident otherwise


class Seats:
    """The sessions using a model now (each browser tab or API client that loaded one), so that a
    server can cap them. A released session gives its seat back; one nobody holds any more (a
    dropped test session, a state gradio deleted) loses it when it is collected."""

    def __init__(self):
        self._sessions: "weakref.WeakValueDictionary[str, Session]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def take(self, session: "Session", limit: int) -> bool:
        """Seat a session (True if it has one now); False when `limit` others are seated."""
        with self._lock:
            if session.id in self._sessions:
                return True
            if len(self._sessions) >= limit:
                gc.collect()  # sessions only a reference cycle still holds
            if len(self._sessions) >= limit:
                return False
            self._sessions[session.id] = session
            return True

    def give_back(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


SEATS = Seats()


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
            _TMP_ROOT = str(process_folder(tempfile.gettempdir(), _TMP_PREFIX))
            atexit.register(shutil.rmtree, _TMP_ROOT, True)
        return Path(_TMP_ROOT)
