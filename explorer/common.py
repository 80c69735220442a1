"""What every tab's handlers share: errors, progress, the session's model, the session-touching
wrapper, example prompts. No layout here, nothing built at import."""
from __future__ import annotations

import functools
import inspect
import math
import os
from pathlib import Path

import gradio as gr

from core.errors import PruneError
from core.progress import staged
from core.bundled import DEFAULT_MODEL

from .limits import LimitError, take_seat
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


def progress_fn(progress, stage: str = ""):
    """core's progress callback (done, total, what) as a gr.Progress call, its messages prefixed
    "stage: " (core.progress.staged); None without one."""
    if progress is None:
        return None
    return staged(lambda done, total, what: progress((done, total), desc=what), stage)


def ensure_model(session: Session) -> ModelEntry:
    """The session's model; the first use loads the app's default (a seat on the server first)."""
    try:
        take_seat(session)
    except LimitError as exc:
        raise gr.Error(str(exc)) from None
    if session.model is None:
        try:
            session.model = get_model(session.default_spec or DEFAULT_MODEL)
        except Exception as exc:
            raise fail(exc) from exc
    problem = session.model.dense.source_problem()
    if problem is not None:
        raise gr.Error(f"{problem} since {session.model.lm.model_id} was loaded, so this session can no longer "
                       "restore or show its dense model. Press Load (Model panel) to load the model as it is on "
                       "disk now; this session's runs were made on the old weights and go with it.")
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


# ---------------------------------------------------------------- numbers a user sends

def checked_number(value, name: str, low: float | None = None, high: float | None = None, *,
                   integer: bool = False, below_high: bool = False, default=None):
    """A number a user sent (a widget's value, or anything an API client posts), checked: a finite
    number (an int or float, or its text), whole when `integer`, within [low, high] ([low, high)
    with `below_high`); None or "" is `default` where one is given. Anything else is a gr.Error
    naming `name`, the value and what fits, before any work. Every handler's numeric inputs, and
    the Number and Slider components' own preprocessing, go through here."""
    given = value
    if (value is None or (isinstance(value, str) and not value.strip())) and default is not None:
        return default
    parsed = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        parsed = value
    elif isinstance(value, str):
        for kind in (int, float):
            try:
                parsed = kind(value.strip())
                break
            except ValueError:
                continue
    ok = parsed is not None and math.isfinite(parsed) and (not integer or parsed == int(parsed))
    if ok:
        parsed = int(parsed) if integer else parsed
        ok = (low is None or parsed >= low) and (high is None or (parsed < high if below_high else parsed <= high))
    if not ok:
        kind = "a whole number" if integer else "a number"
        raise gr.Error(f"{name} must be {kind}{_range_text(low, high, below_high)}; got {given!r}.")
    return parsed


def _range_text(low, high, below_high: bool) -> str:
    def shown(v) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:g}"
    if low is not None and high is not None:
        return f" from {shown(low)} to {shown(high)}" + (" (not included)" if below_high else "")
    if low is not None:
        return f" of at least {shown(low)}"
    return f" of at most {shown(high)}" if high is not None else ""


def checked_sparsity(value, name: str = "Sparsity") -> float:
    """A target sparsity: a finite number in [0, 1)."""
    return float(checked_number(value, name, 0.0, 1.0, below_high=True))


def _widget_name(component) -> str:
    label = str(getattr(component, "label", None) or "value")
    return label.split(":", 1)[0].strip() or "value"  # parameter widgets: "name: help"


NO_BOUND = 1e12  # a parameter widget's bound where its parameter has none


def _bound(value):
    """A widget's bound as a check uses it; NO_BOUND stands for none."""
    return None if value is None or abs(value) >= NO_BOUND else value


class Number(gr.Number):
    """gr.Number whose value is checked by `checked_number` before a handler runs: gradio's own
    preprocessing fails on a value that is not a number (an API client's "abc") with a generic
    error, and passes NaN on. Drawn as gr.Number (is_template)."""

    is_template = True

    def preprocess(self, payload):
        if payload is None:
            return None
        value = checked_number(payload, _widget_name(self), _bound(self.minimum), _bound(self.maximum),
                       integer=self.precision == 0)
        return self.round_to_precision(value, self.precision)


class Slider(gr.Slider):
    """gr.Slider whose value is checked by `checked_number` first (see Number). Drawn as gr.Slider."""

    is_template = True

    def preprocess(self, payload):
        whole = all(float(v).is_integer() for v in (self.step or 0.5, self.minimum or 0))  # a slider of steps of 1
        value = checked_number(payload, _widget_name(self), self.minimum, self.maximum, integer=whole)
        return gr.Number.round_to_precision(value, self.precision)
