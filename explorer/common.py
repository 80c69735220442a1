"""What every tab's handlers share: errors, progress, the session's model, the session-touching
wrapper, example prompts. No layout here, nothing built at import."""
from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import gradio as gr

from core.errors import PruneError
from core.models import DEFAULT_MODEL

from .state import ModelEntry, Session, get_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PATTERNS = ["unstructured", "2:4", "4:8"]
HEAVY = "heavy"  # one concurrency slot shared by every job that runs the model
CALIB_BATCH = 8  # windows per forward in the app's calibrations (core.pruning.calibrate's default)
# A session idle this long (no event) is released like a closed tab: runs, masks, files.
SESSION_TTL_S = float(os.environ.get("EXPLORER_SESSION_TTL", 2 * 3600))
# Files handed to the browser (exports) are copied into gradio's cache: every 30 min those older
# than 2 h are deleted, and all of them when the server stops.
DELETE_CACHE = (1800, 2 * 3600)
NO_MASKS = "Calibrate (or import a mask file) to see the masks."


def fail(exc: BaseException) -> gr.Error:
    """A user-facing error for anything a handler could not do."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, (PruneError, ValueError)):
        return gr.Error(str(exc))
    return gr.Error(f"{type(exc).__name__}: {exc}")


def progress_fn(progress, label: str = ""):
    """core's progress callback (done, total, what) as a gr.Progress call; None without one."""
    if progress is None:
        return None

    def report(done: int, total: int, what: str) -> None:
        progress((done, total), desc=f"{label}{what}")

    return report


def ensure_model(session: Session) -> ModelEntry:
    """The session's model; the first use loads the app's default."""
    if session.model is None:
        try:
            session.model = get_model(session.default_spec or DEFAULT_MODEL)
        except Exception as exc:
            raise fail(exc) from exc
    return session.model


def example_prompts() -> list[str]:
    path = ASSETS / "prompts.txt"
    if not path.is_file():
        return ["The Python programming language is", "def fibonacci(n):"]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def touching(fn, outputs: list, at: int = 0):
    """`fn`, a handler whose input number `at` is the session, returning the session too (wire
    it with `[*outputs, session]`): gradio stores a returned State again, which restarts its
    time-to-live, so a session expires after SESSION_TTL_S without events, not that long after
    it was made, and the unload event can release it (gradio only deletes states it stored)."""
    single = len(outputs) == 1

    def tail(out, args):
        return (out, args[at]) if single else (*out, args[at])

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            for out in fn(*args, **kwargs):
                yield tail(out, args)
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return tail(fn(*args, **kwargs), args)
    return call


def unload(demo: gr.Blocks, request) -> None:
    """The unload event: delete the closing session's states now (each State's delete_callback,
    here release_session, runs), rather than an hour after the tab closed."""
    holder = getattr(demo, "state_holder", None)
    if holder is not None and request is not None and request.session_hash:
        holder.delete_state(request.session_hash)


def kw(update: dict) -> dict:
    """Constructor kwargs from a gr.update dict."""
    return {k: v for k, v in update.items() if k != "__type__"}


def parse_sparsities(text) -> list[float]:
    try:
        values = [float(v) for v in str(text).replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"Give sparsities separated by commas, e.g. 0.3, 0.5, 0.7 (got {text!r}).") from None
    if not values:
        raise ValueError("Give sparsities separated by commas, e.g. 0.3, 0.5, 0.7.")
    return values
