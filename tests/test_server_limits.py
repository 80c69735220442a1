"""The explorer's resource limits, on a real server process: a sweep of 199 sparsities is refused
before any work, an allowed sweep holds one mask set at a time (peak memory measured in the
server), and the server's memory after either is back at its baseline."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from support import REPO, free_port  # noqa: E402

MIB = 2**20


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory):
    """A random Llama big enough that a mask set (1 byte a weight, made) is ~63 MB: 16 blocks of
    512 x 2048, with the tests' byte tokenizer."""
    import transformers as tf

    from tiny import KV_HEADS, tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 512, 2048, 16
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 8, KV_HEADS * 2, 64
    folder = tmp_path_factory.mktemp("mid-llama")
    tf.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(mid_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "log.txt"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "EXPLORER_MAX_SESSIONS": "3", "EXPLORER_MAX_RUNS": "3"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--model", str(mid_model), "--port",
                                 str(port), "--no-autoload", "--dtype", "float32"], cwd=REPO, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    client = None
    while client is None:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        try:
            client = Client(url, verbose=False, download_files=False)
        except Exception:
            time.sleep(1)
    yield proc, client
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _settle(pid: int) -> int:
    time.sleep(1.0)
    return _status(pid)["VmRSS"]


def test_sweeps_are_capped_streamed_and_leave_memory_at_baseline(server, mid_model):
    proc, client = server
    client.predict(str(mid_model), "float32", "cpu", "none", api_name="/load_model")
    status, *_ = client.predict(method_name="wanda", windows=2, seqlen=32, sparsity=0.5, params_json="",
                                api_name="/calibrate")
    assert "Calibrated" in status
    evaluation = dict(source="python-docs", seqlen=32, max_windows=1)
    client.predict("0.5", **evaluation, api_name="/sweep")  # the dense perplexity, measured once
    baseline = _settle(proc.pid)

    many = ", ".join(f"{i / 200:.3f}" for i in range(1, 200))  # 199 points: the probe that killed the app
    _reset_peak(proc.pid)
    with pytest.raises(AppError, match="at most 24"):
        client.predict(many, **evaluation, api_name="/sweep")
    with pytest.raises(AppError, match="at most 24"):
        client.predict(many, **evaluation, api_name="/sweep_runs")
    peak = _status(proc.pid)["VmHWM"]
    after_refused = _settle(proc.pid)
    print(f"\nRSS baseline {baseline / MIB:.0f} MiB; 199 points refused: peak {peak / MIB:.0f}, "
          f"after {after_refused / MIB:.0f} MiB")
    assert peak - baseline < 32 * MIB and after_refused - baseline < 32 * MIB

    # 12 points (the scaled-down probe grew the app by 1.3 GB on smollm2): one mask set at a time
    twelve = ", ".join(f"{0.2 + i * 0.05:.2f}" for i in range(12))
    from transformers import AutoConfig

    from core.memory import ModelShapes, estimate_cut, estimate_evaluation

    shapes = ModelShapes.from_config(AutoConfig.from_pretrained(mid_model))
    one_point = estimate_cut(shapes, "wanda") + estimate_evaluation(shapes, 32)
    bound = int(1.5 * one_point) + 64 * MIB  # the stated bound: one point's estimate, with room
    _reset_peak(proc.pid)
    md, _plot, points = client.predict(twelve, **evaluation, api_name="/sweep")
    peak = _status(proc.pid)["VmHWM"]
    after = _settle(proc.pid)
    print(f"12-point sweep: peak {peak / MIB:.0f} MiB ({(peak - baseline) / MIB:+.0f}), after {after / MIB:.0f} MiB "
          f"({(after - baseline) / MIB:+.0f})")
    assert md.count("\n| ") >= 12 and len([p for p in points if p.get("run") == "wanda"]) >= 13
    # twelve mask sets held at once would be 12 x n_prunable bytes (more than twice the bound)
    assert 12 * shapes.n_prunable > 2 * bound
    assert peak - baseline < bound, f"peak growth {(peak - baseline) / MIB:.0f} MiB, bound {bound / MIB:.0f} MiB"
    assert after - baseline < 48 * MIB


def test_limits_are_refused_with_a_message_naming_them(server, mid_model):
    _proc, client = server
    client.predict(str(mid_model), "float32", "cpu", "none", api_name="/load_model")
    client.predict(method_name="magnitude", windows=2, seqlen=32, sparsity=0.5, params_json="",
                   api_name="/calibrate")
    with pytest.raises(AppError, match="(from 1 to|between 1 and) 256"):
        client.predict("python-docs", 32, 100000, api_name="/perplexity")
    with pytest.raises(AppError, match="up to .not including. 1"):
        client.predict("0.5, 1.5", "python-docs", 32, 1, api_name="/sweep")


def test_runs_per_session_and_sessions_per_server_are_capped(server, mid_model):
    proc, client = server
    url = client.src
    client.predict(str(mid_model), "float32", "cpu", "none", api_name="/load_model")
    while len(client.predict(api_name="/runs")[-1]) < 3:
        client.predict(method_name="magnitude", windows=2, seqlen=32, sparsity=0.5, params_json="", api_name="/calibrate")
    with pytest.raises(AppError, match="already has 3 runs, the most it keeps"):
        client.predict(method_name="magnitude", windows=2, seqlen=32, sparsity=0.5, params_json="", api_name="/calibrate")
    others = [Client(url, verbose=False, download_files=False) for _ in range(3)]
    for other in others[:2]:  # with the module's client: three sessions, the limit set for this server
        other.predict(str(mid_model), "float32", "cpu", "none", api_name="/load_model")
    with pytest.raises(AppError, match="serving 3 sessions, its limit"):
        others[2].predict(str(mid_model), "float32", "cpu", "none", api_name="/load_model")
    assert proc.poll() is None  # refused, not fallen over
