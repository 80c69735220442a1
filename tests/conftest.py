"""Shared fixtures: tiny random models and a byte-level tokenizer (no downloads), the explorer
app served on a local port, and the browser tests' screenshot folder."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):  # the repo (for `core`) and tests/ (for `import tiny`)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from tiny import FAMILY_NAMES, build_tiny, tiny_tokenizer as _tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama with its byte tokenizer saved as a transformers folder; tests only read it."""
    from tiny import build_tiny_module

    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_module("llama").save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """Factory: tiny_model('llama') -> a fresh LoadedModel (seeded, so equal across calls)."""

    def make(family: str, with_tokenizer: bool = False, seed: int = 0):
        return build_tiny(family, tokenizer=tiny_tokenizer if with_tokenizer else None, seed=seed)

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def serve_app():
    """Factory: serve_app(demo, **launch) queues a gradio app (one job at a time), launches it on
    a free local port and returns its URL; the apps are closed when the test module ends."""
    demos = []

    def serve(demo, **launch) -> str:
        demo.queue(default_concurrency_limit=1)
        port = _free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch)
        demos.append(demo)
        return f"http://127.0.0.1:{port}/"

    yield serve
    for demo in demos:
        demo.close()


@pytest.fixture(scope="module")
def browser_artifacts() -> Path:
    """Where the browser tests' screenshots and downloads go: $BROWSER_ARTIFACTS, default
    tests/artifacts/browser/ (git-ignored)."""
    folder = Path(os.environ.get("BROWSER_ARTIFACTS") or _HERE / "artifacts" / "browser")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots in {folder}")
    return folder


@pytest.fixture(params=FAMILY_NAMES)
def family_name(request):
    return request.param


@pytest.fixture
def hub_offline(monkeypatch):
    """Make hub look-ups fail at once, as on a machine without internet (no retry wait).

    huggingface_hub and datasets read the *_OFFLINE variables at import time, so the
    module-level flags are patched as well as the environment.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    try:
        import datasets.config as ds_config
    except ImportError:
        return
    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(ds_config, "HF_DATASETS_OFFLINE", True, raising=False)
