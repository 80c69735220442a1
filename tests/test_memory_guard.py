"""Calibration's memory is estimated from shapes and checked before anything is allocated.

The estimate (core.memory) is compared with real calibrations (the artifact's own byte count,
a fresh process's peak resident growth); oversized requests are refused with the numbers by
the CLI (exit code 2, before memory grows) and by the app (through gradio_client)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from core.dense import DenseWeights  # noqa: E402
from core.memory import (CalibrationMemoryError, ModelShapes, check_calibration_memory,  # noqa: E402
                         estimate_calibration)
from core.methods import all_methods  # noqa: E402
from core.pruning import calibrate  # noqa: E402
from support import REPO, free_port  # noqa: E402

HUGE_WINDOWS, LONG_CONTEXT = 100_000, 8192


@pytest.fixture(scope="module")
def long_llama_dir(tmp_path_factory):
    """The tiny Llama with an 8192-token context: 100000 windows x its context is ~400 GB."""
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.max_position_embeddings = LONG_CONTEXT
    folder = tmp_path_factory.mktemp("long-llama")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# every method that calibrates an artifact (a structured method prunes instead: no artifact to compare)
@pytest.mark.parametrize("method", sorted(name for name, m in all_methods().items() if not m.structured))
def test_estimate_of_the_artifact_matches_a_real_one(tiny_model, method):
    lm = tiny_model("llama")
    windows = torch.randint(0, 250, (8, 32))
    artifact = calibrate(lm, method, windows, dense=DenseWeights(lm), batch_size=4)
    estimate = estimate_calibration(ModelShapes.from_model(lm), method, 8, 32, 4)
    kept = estimate.parts["artifact"] + estimate.parts["statistics"]
    real = _held_bytes(artifact)
    assert kept >= 0.9 * real, (kept, real, estimate.parts)
    assert kept <= 1.3 * real + 64 * 1024, (kept, real, estimate.parts)


def _held_bytes(artifact) -> int:
    """Bytes of the artifact's distinct tensors in memory (Artifact.nbytes counts a LayerStats
    shared by the modules fed one input, q/k/v, once)."""
    return artifact.nbytes()


def test_estimate_grows_with_the_request_and_names_its_parts(tiny_model):
    shapes = ModelShapes.from_model(tiny_model("llama"))
    small = estimate_calibration(shapes, "wanda", 8, 64)
    assert {"windows", "activations", "statistics", "artifact", "temporaries", "overhead"} <= set(small.parts)
    assert estimate_calibration(shapes, "wanda", 16, 64).total > small.total
    assert estimate_calibration(shapes, "wanda", 8, 128).total > small.total
    # activations: inputs and outputs of a block for every window (fp32)
    assert estimate_calibration(shapes, "wanda", 1000, 256).parts["activations"] == 2 * 1000 * 256 * 64 * 4
    # a per-window statistic (UniPruning) grows with the windows, X^T X (SparseGPT) does not
    assert (estimate_calibration(shapes, "unipruning", 64, 64).parts["statistics"]
            > estimate_calibration(shapes, "unipruning", 8, 64).parts["statistics"])


_MEASURE = r"""
import gc, json, sys
sys.path.insert(0, "tests")
import torch
from core.calibrate import release_free_memory
from core.dense import DenseWeights
from core.pruning import calibrate
from tiny import build_tiny

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

lm = build_tiny("llama")
dense = DenseWeights(lm)
windows = torch.randint(0, 250, (int(sys.argv[2]), int(sys.argv[3])))
gc.collect(); release_free_memory()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
calibrate(lm, sys.argv[1], windows, dense=dense, batch_size=8)
print(json.dumps({"peak_growth": status("VmHWM:") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak reset")
def test_estimate_covers_a_measured_peak():
    """Peak resident growth of a real calibration in a fresh process (tiny Llama, 512 windows x
    256 tokens: ~64 MB of activations) against the estimate: close, and not under."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, "wanda", "512", "256"], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth"]
    from tiny import build_tiny

    estimate = estimate_calibration(ModelShapes.from_model(build_tiny("llama")), "wanda", 512, 256, 8).total
    assert 0.9 * measured <= estimate <= 1.6 * measured, (estimate / 2**20, measured / 2**20)


def test_check_refuses_with_numbers_and_ways_out(tiny_model):
    lm = tiny_model("llama")
    with pytest.raises(CalibrationMemoryError) as err:
        check_calibration_memory(lm, "wanda", 4096, 256, available=512 * 2**20)
    text = str(err.value)
    assert "4096 windows x 256 tokens" in text and "only 0.50 GiB is available" in text
    assert "--calib-windows" in text and "--seqlen" in text  # smaller requests that would fit
    fitting = int(text.split("--calib-windows ")[1].split()[0])
    assert 0 < fitting < 4096
    check_calibration_memory(lm, "wanda", fitting, 256, available=512 * 2**20)  # and it does fit
    assert err.value.estimate.total > 0


# The process's own peak (VmHWM, which starts afresh at exec), not getrusage's ru_maxrss: Linux
# carries that one over from the parent across fork + exec, so it would report pytest's size.
_CLI = r"""
import runpy, sys
sys.argv = ["python -m core"] + sys.argv[1:]
try:
    runpy.run_module("core", run_name="__main__")
finally:
    with open("/proc/self/status") as fh:
        hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    print(f"MAXRSS {hwm * 1024}", file=sys.stderr)
"""


@pytest.mark.parametrize("command", ["prune", "calibrate", "sweep"])
def test_cli_refuses_an_oversized_calibration_before_memory_grows(long_llama_dir, tmp_path, command):
    out_arg = {"prune": ["--out", str(tmp_path / "run"), "--no-eval"],
               "calibrate": ["--out", str(tmp_path / "a.safetensors"), "--no-eval"],
               "sweep": ["--no-eval"]}[command]
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CLI, command, "--model", str(long_llama_dir), "--method", "wanda",
                          "--calib-windows", str(HUGE_WINDOWS), "--seqlen", str(LONG_CONTEXT), "--device", "cpu",
                          *out_arg], cwd=REPO, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Not enough memory" in out.stderr and f"{HUGE_WINDOWS} windows x {LONG_CONTEXT} tokens" in out.stderr
    assert "GiB" in out.stderr and "--calib-windows" in out.stderr and "--seqlen" in out.stderr
    peak = int(out.stderr.split("MAXRSS ")[1].split()[0])
    assert peak < 1.5 * 2**30, f"the refusal came after {peak / 2**30:.1f} GB had been allocated"
    assert seconds < 120, seconds


def test_app_refuses_an_oversized_calibration(long_llama_dir):
    pytest.importorskip("gradio")
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from explorer.app import build_app

    demo = build_app(model=str(long_llama_dir))
    demo.queue(default_concurrency_limit=1)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        props = {}  # the calibration widgets (the Compare tab's "seqlen" has no maximum)
        for c in client.config["components"]:
            p = c.get("props", {})
            if p.get("maximum") is not None:
                props.setdefault(p.get("label"), p)
        max_windows, max_seqlen = props["windows"]["maximum"], props["seqlen"]["maximum"]
        assert max_seqlen <= LONG_CONTEXT and max_windows >= 1  # from the machine and the model, not fixed
        client.predict(str(long_llama_dir), "float32", "cpu", api_name="/load_model")
        # each within its widget's maximum, together far too much: the handler's own check refuses
        with pytest.raises(AppError) as err:
            client.predict(method_name="wanda", windows=max_windows, seqlen=max_seqlen, api_name="/calibrate")
        assert "Not enough memory" in str(err.value) and "GiB" in str(err.value), str(err.value)
        assert f"{max_windows} windows x {max_seqlen} tokens" in str(err.value)
        # beyond the widgets' maxima: refused with the number too
        with pytest.raises(AppError) as err:
            client.predict(method_name="wanda", windows=HUGE_WINDOWS, seqlen=LONG_CONTEXT, api_name="/calibrate")
        assert str(HUGE_WINDOWS) in str(err.value), str(err.value)
        # and a request that fits still runs
        client.predict(method_name="wanda", windows=4, seqlen=32, api_name="/calibrate")
        client.close()
    finally:
        demo.close()


# the spill decision and the estimate use one rule of what an artifact keeps per matrix
@pytest.mark.parametrize("method", sorted(name for name, m in all_methods().items() if not m.structured))
def test_artifact_bytes_are_what_a_real_artifact_stores(tiny_model, method):
    from core.artifacts import artifact_bytes

    lm = tiny_model("llama")
    artifact = calibrate(lm, method, torch.randint(0, 250, (4, 32)), dense=DenseWeights(lm), batch_size=4)
    stored = [artifact.stored(key) for key in artifact.stored_keys()]
    held = sum(t.numel() * t.element_size() for t in stored)
    shapes = [lm.family.weight_view(m).shape for m in lm.prunable().values()]
    expected = sum(artifact_bytes(artifact.method_obj, artifact.params, d_out, d_in) for d_out, d_in in shapes)
    assert held == expected, (held, expected, sorted({k.split("/")[0] for k in artifact.stored_keys()}))
