"""What one request may ask of the server. The app is shared (a workshop room, `--share`), so every
request that can grow memory or hold the model for long is checked before its work starts: a
sweep's points, a perplexity's windows and length, runs per session, sessions per server. Memory
is checked with core.memory's estimates (the same margin as a calibration), and work streams so
that a sweep holds one mask set at a time.

Each limit can be set by an environment variable (in brackets) where a server needs another."""
from __future__ import annotations

import math
import os

from core.memory import ModelShapes, check_request_memory, estimate_cut, estimate_evaluation, estimate_generation

from .state import SEATS, ModelEntry, Session


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


MAX_SWEEP_POINTS = _env_int("EXPLORER_MAX_SWEEP_POINTS", 24)  # sparsities in one sweep
MAX_MEASUREMENTS = _env_int("EXPLORER_MAX_MEASUREMENTS", 96)  # (run, sparsity) points in one "sweep every run"
MAX_EVAL_WINDOWS = _env_int("EXPLORER_MAX_EVAL_WINDOWS", 256)  # perplexity windows per measurement
MAX_RUNS = _env_int("EXPLORER_MAX_RUNS", 12)  # runs one session keeps
MAX_SESSIONS = _env_int("EXPLORER_MAX_SESSIONS", 32)  # sessions using a model at once
EVAL_BATCH = 4  # core.evaluate.perplexity's batch


class LimitError(ValueError):
    """A request beyond one of the server's limits (shown to the user as it is)."""


def describe() -> str:
    """The limits, as the app shows them."""
    return (f"Server limits: {MAX_SWEEP_POINTS} sparsities per sweep and {MAX_MEASUREMENTS} points per "
            f"sweep of every run, {MAX_EVAL_WINDOWS} perplexity windows, {MAX_RUNS} runs per session, "
            f"{MAX_SESSIONS} sessions at once; every request is checked against the memory free "
            "before it starts.")


def available(entry: ModelEntry) -> int | None:
    from core.memory import available_bytes

    return available_bytes(str(entry.lm.device))


def check_sparsities(values: list[float]) -> list[float]:
    """A sweep's sparsities: finite, in [0, 1), at most MAX_SWEEP_POINTS, each once, in order."""
    bad = [v for v in values if not math.isfinite(v) or not 0.0 <= v < 1.0]
    if bad:
        raise LimitError(f"Sparsities go from 0 up to (not including) 1; {bad[0]!r} is not one.")
    values = sorted(set(values))
    if len(values) > MAX_SWEEP_POINTS:
        raise LimitError(f"{len(values)} sparsities asked for; a sweep measures at most {MAX_SWEEP_POINTS} "
                         "(each is a full perplexity run): give fewer, e.g. 0.3, 0.4, 0.5, 0.6, 0.7.")
    return values


def check_measurements(n_points: int) -> None:
    if n_points > MAX_MEASUREMENTS:
        raise LimitError(f"That is {n_points} measurements (runs x sparsities); one sweep makes at most "
                         f"{MAX_MEASUREMENTS}: hide some runs or give fewer sparsities.")


def check_evaluation(entry: ModelEntry, seqlen: int, max_windows: int, method=None) -> None:
    """A perplexity request: its windows within the cap, and one batch's logits (plus, with
    `method`, one mask set cut from its artifact) within the memory free now."""
    if not 1 <= int(max_windows) <= MAX_EVAL_WINDOWS:
        raise LimitError(f"max windows must be between 1 and {MAX_EVAL_WINDOWS} (got {max_windows}).")
    shapes = ModelShapes.from_model(entry.lm)
    need = estimate_evaluation(shapes, int(seqlen), EVAL_BATCH)
    what = f"a perplexity at seqlen {int(seqlen)}"
    if method is not None:
        need += estimate_cut(shapes, method)
        what += " with one mask set at a time"
    check_request_memory(need, what, available(entry),
                         "Use a shorter seqlen, or free memory (delete runs, close other sessions).")


def check_generation(entry: ModelEntry, tokens: int) -> None:
    """A generation of `tokens` tokens in all (prompt and new): its KV cache and forward pass within
    the memory free now (the sides stream one after the other, so one at a time)."""
    shapes = ModelShapes.from_model(entry.lm)
    need = estimate_generation(shapes, tokens, kv_heads=entry.lm.heads.num_kv_heads)
    check_request_memory(need, f"a generation of {tokens} tokens", available(entry),
                         "Ask for fewer new tokens or a shorter prompt, or free memory (delete runs, close other "
                         "sessions).")


def check_new_run(session: Session) -> None:
    """Room for one more run in this session (before a calibration, an import, a reopened session)."""
    if len(session.runs) >= MAX_RUNS:
        raise LimitError(f"This session already has {len(session.runs)} runs, the most it keeps: delete a "
                         "run (Live view, run list) first.")


def take_seat(session: Session) -> None:
    """Seat the session before it first uses a model; refused when MAX_SESSIONS others are."""
    if not SEATS.take(session, MAX_SESSIONS):
        raise LimitError(f"This server is serving {MAX_SESSIONS} sessions, its limit: try again when a tab "
                         "closes (an idle session is released after its time-to-live).")
