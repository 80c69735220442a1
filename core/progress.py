"""Progress callbacks: core reports (done, total, what); the CLI draws them with tqdm and the
explorer with gr.Progress."""
from __future__ import annotations

from typing import Callable

ProgressFn = Callable[[int, int, str], None]


def staged(progress: ProgressFn | None, stage: str) -> ProgressFn | None:
    """`progress` with each message prefixed by the stage's name ("stage: what"); an empty stage
    passes messages through, and no callback stays none."""
    if progress is None or not stage:
        return progress
    return lambda done, total, what: progress(done, total, f"{stage}: {what}")
