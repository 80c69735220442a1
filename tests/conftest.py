"""Shared fixtures: tiny random models and a byte-level tokenizer (no downloads), calibration
windows, the real CLI run in this process, the explorer app served on a local port, and the
browser tests' screenshot folder. Plain helpers are in tiny.py, support.py and browser_support.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
_HERE = Path(__file__).resolve().parent
for _p in (_HERE.parent, _HERE):  # the repo (for `core`) and tests/ (for `import tiny`)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from support import free_port  # noqa: E402
from tiny import FAMILY_NAMES, build_tiny, random_windows, tiny_tokenizer as _tiny_tokenizer  # noqa: E402


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


# ---------------------------------------------------------------- calibration windows
# Module-scoped: one tensor per test module, which the tests only read.

@pytest.fixture(scope="module")
def windows():
    """6 windows of 32 random byte ids (seed 0): uneven batches of 4 (4 + 2), longer than gemma3's
    sliding window of 8."""
    return random_windows(6, 32)


@pytest.fixture(scope="module")
def windows_seed1():
    """The same shape as `windows`, other ids (seed 1)."""
    return random_windows(6, 32, seed=1)


@pytest.fixture(scope="module")
def windows_4x32():
    """4 windows of 32 random ids below 250 (seed 0): fewer, for the engine at scale (offload, 16-bit)."""
    return random_windows(4, 32, high=250)


@pytest.fixture(scope="module")
def text_windows(tiny_tokenizer):
    """16 windows of 64 tokens of real text (Python's own topic docs), through the byte tokenizer."""
    from pydoc_data.topics import topics

    from core.data import calibration_windows, tokenize

    text = " ".join(topics[k] for k in sorted(topics)[:40])
    return calibration_windows(tokenize(tiny_tokenizer, text), 16, 64, seed=0)[0]


# ---------------------------------------------------------------- the CLI, in this process

class CliRun(NamedTuple):
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """cli("prune", "--model", folder, ...) -> CliRun(exit code, stdout, stderr) of core.cli.main run
    in this process: what `python -m core ...` runs, without starting an interpreter (seconds each).
    Arguments may be paths; an argparse refusal (SystemExit) gives its exit code too."""
    from core.cli import main

    def run(*args) -> CliRun:
        capsys.readouterr()  # only this command's output
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return CliRun(code, out.out, out.err)

    return run


# ---------------------------------------------------------------- the explorer app

@pytest.fixture(scope="module")
def serve_app():
    """Factory: serve_app(demo, **launch) queues a gradio app (one job at a time), launches it on
    a free local port and returns its URL; the apps are closed when the test module ends."""
    demos = []

    def serve(demo, **launch) -> str:
        demo.queue(default_concurrency_limit=1)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch)
        demos.append(demo)
        return f"http://127.0.0.1:{port}/"

    yield serve
    for demo in demos:
        demo.close()


def _serve_explorer(serve_app, model: str, autoload: bool, browser: bool) -> str:
    from explorer.app import build_app, launch_kwargs

    return serve_app(build_app(model=model, autoload=autoload), **(launch_kwargs() if browser else {}))


@pytest.fixture(scope="module")
def app_url(serve_app, tiny_llama_dir):
    """The explorer on the tiny Llama, served for this test module; a page's load event loads it
    (autoload, launch.py's default)."""
    return _serve_explorer(serve_app, str(tiny_llama_dir), autoload=True, browser=False)


@pytest.fixture(scope="module")
def app_url_no_autoload(serve_app, tiny_llama_dir):
    """As `app_url`, but nothing is loaded until a model is chosen (launch.py --no-autoload)."""
    return _serve_explorer(serve_app, str(tiny_llama_dir), autoload=False, browser=False)


@pytest.fixture(scope="module")
def browser_app_url(serve_app, tiny_llama_dir):
    """As `app_url_no_autoload`, launched with the page's theme, css and head, as a browser sees it."""
    return _serve_explorer(serve_app, str(tiny_llama_dir), autoload=False, browser=True)


@pytest.fixture(scope="module")
def browser_app_url_default_model(serve_app):
    """As `browser_app_url`, with the bundled default model (smollm2-135m) as the app's default,
    never loaded: a test must choose its model through the chooser, as a user does."""
    return _serve_explorer(serve_app, "smollm2-135m", autoload=False, browser=True)


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
