"""Plain helpers the test modules share (their fixtures live in conftest.py): the repository's
root, a free local port, and the environment of a child process that runs this checkout."""
from __future__ import annotations

import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A local TCP port nobody listens on now (the OS picks it; free again once this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child `python ...` that imports this checkout's core and
    explorer (PYTHONPATH), without gradio's analytics, plus `extra`."""
    return {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO), **extra}
