"""The command line, run as a user would: `python -m core ...` in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.fast_decode import cpu_compiler
from core.methods import all_methods

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_methods_lists_every_method():
    result = run_cli("methods")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line and not line[0].isspace()]
    assert sorted(listed) == sorted(all_methods())
    for method in all_methods().values():
        for param in method.params:
            assert f"--param {param.name}=" in result.stdout


def test_methods_json():
    result = run_cli("methods", "--json")
    assert result.returncode == 0, result.stderr
    described = json.loads(result.stdout)
    assert sorted(d["name"] for d in described) == sorted(all_methods())
    by_name = {d["name"]: d for d in described}
    assert by_name["sparsegpt"]["updates_weights"] is True
    assert by_name["owl"]["patterns"] == ["unstructured"]


@pytest.mark.parametrize("value", ["1.5", "abc"])
def test_prune_bad_sparsity_exits_2(value):
    result = run_cli("prune", f"--sparsity={value}", "--no-eval")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "error: Sparsity must" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Loading" not in result.stderr  # refused before any model is loaded


@pytest.mark.parametrize("pattern, message", [("3:2", "0 < N < M"), ("2:4:8", "not understood")])
def test_prune_bad_pattern_exits_2(pattern, message):
    result = run_cli("prune", "--pattern", pattern, "--no-eval")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "Loading" not in result.stderr


def test_prune_missing_model_exits_2(tmp_path):
    result = run_cli("prune", "--model", "./no/such", "--no-eval", "--out", str(tmp_path / "out"))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "error: No model folder or file at './no/such'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_an_argparse_error():
    result = run_cli("prune", "--method", "nosuch")
    assert result.returncode == 2
    assert "invalid choice: 'nosuch'" in result.stderr


def test_prune_then_export_tiny_model(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from core.mask_file import load_masks
    from core.loading import load_model

    out = tmp_path / "run"
    result = run_cli("prune", "--model", str(tiny_llama_dir), "--method", "ria", "--pattern", "2:4",
                     "--calib-windows", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-dense",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "result.json").read_text())
    assert summary["achieved_sparsity"] == 0.5 and summary["pattern"] == "2:4"
    assert summary["ppl"] > 0 and summary["dense_ppl"] > 0 and summary["ppl"] != summary["dense_ppl"]
    lm = load_model(str(tiny_llama_dir))
    masks = load_masks(out / "masks.safetensors", lm)
    assert masks.meta["method"] == "ria" and masks.total_sparsity() == 0.5

    result = run_cli("export", "--model", str(tiny_llama_dir), "--masks", str(out / "masks.safetensors"),
                     "--out", str(tmp_path / "model"))
    assert result.returncode == 0, result.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    modules = dict(exported.named_modules())
    for name, mask in masks.masks.items():
        w = modules[name].weight.data
        assert torch.equal(w == 0, ~mask), name  # zero exactly where pruned
    assert json.loads((tmp_path / "model" / "PRUNING.json").read_text())["source_fingerprint"] == lm.fingerprint


def test_calibrate_once_then_cut_from_the_saved_artifact(tiny_llama_dir, tmp_path):
    from core.mask_file import load_masks
    from core.loading import load_model

    artifact = tmp_path / "uni.artifact.safetensors"
    data = ["--calib-windows", "4", "--seqlen", "32", "--eval-windows", "2"]
    result = run_cli("calibrate", "--model", str(tiny_llama_dir), "--method", "unipruning", *data,
                     "--out", str(artifact))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "unipruning" and artifact.is_file()
    lm = load_model(str(tiny_llama_dir))
    for sparsity in ("0.3", "0.7"):
        out = tmp_path / f"cut{sparsity}"
        result = run_cli("cut", "--model", str(tiny_llama_dir), "--artifact", str(artifact), "--sparsity", sparsity,
                         "--param", "controller=global-row", *data, "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert "calibrating" not in result.stderr  # no new calibration
        report = json.loads((out / "result.json").read_text())
        assert abs(report["achieved_sparsity"] - float(sparsity)) < 1e-4 and report["ppl"] > 0
        assert abs(load_masks(out / "masks.safetensors", lm).total_sparsity() - float(sparsity)) < 1e-4
    refused = run_cli("cut", "--model", str(tiny_llama_dir), "--artifact", str(artifact), "--param", "kappa=0.5",
                      *data, "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "needs a new calibration" in refused.stderr
    sweep = run_cli("sweep", "--model", str(tiny_llama_dir), "--artifact", str(artifact), "--sparsities", "0.2,0.6",
                    *data)
    assert sweep.returncode == 0, sweep.stderr
    assert "unipruning on" in sweep.stdout and "0.600" in sweep.stdout


def test_structured_prune_then_export_a_smaller_model(tiny_llama_dir, tmp_path):
    """FLAP from the command line: the mask file says structured, the export is physically
    smaller, loads through core.loading.load_model, and computes what the masked model computes."""
    import torch

    from core.dense import DenseWeights
    from core.loading import load_model
    from core.mask_file import load_masks

    out = tmp_path / "flap"
    result = run_cli("prune", "--model", str(tiny_llama_dir), "--method", "flap", "--sparsity", "0.3",
                     "--calib-windows", "4", "--seqlen", "32", "--eval-windows", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "result.json").read_text())
    assert summary["pattern"] == "structured" and abs(summary["structured_sparsity"] - 0.3) < 0.1
    assert len(summary["allocation"]) == 2 and summary["ppl"] > 0

    result = run_cli("export", "--model", str(tiny_llama_dir), "--masks", str(out / "masks.safetensors"),
                     "--out", str(tmp_path / "small"))
    assert result.returncode == 0, result.stderr
    assert "Sliced" in result.stdout
    lm = load_model(str(tiny_llama_dir))
    masks = load_masks(out / "masks.safetensors", lm)
    small = load_model(str(tmp_path / "small"))
    n_dense = sum(p.numel() for p in lm.model.parameters())
    n_small = sum(p.numel() for p in small.model.parameters())
    assert n_small < 0.85 * n_dense
    DenseWeights(lm).apply(masks)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, small.model(ids).logits, atol=1e-4)

    refused = run_cli("cut", "--model", str(tiny_llama_dir), "--method", "flap", "--artifact", "x.safetensors",
                      "--out", str(tmp_path / "no"))
    assert refused.returncode == 2 and "structured" in refused.stderr

    # the sliced folder decodes from the command line
    result = run_cli("generate", "--model", str(tmp_path / "small"), "--prompt", "hello there", "--new-tokens", "6")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report["new_tokens"] == 6 and report["decode_tok_s"] > 0 and report["runtime"] == "eager"
    assert result.stdout.startswith("hello there") and len(result.stdout.strip()) > len("hello there")


@pytest.mark.skipif(cpu_compiler() is None, reason="no C++ compiler: torch.compile cannot build CPU kernels here")
def test_generate_compiled_gives_the_eager_text(tiny_llama_dir):
    runs = {}
    for flags in ((), ("--compile",)):
        result = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "hello there", "--new-tokens", "6",
                         *flags)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stderr.strip().splitlines()[-1])
        assert report["new_tokens"] == 6 and report["decode_tok_s"] > 0
        runs[report["runtime"]] = result.stdout
    assert runs["compiled"] == runs["eager"] and runs["eager"].startswith("hello there")
    assert "compiled in" in result.stderr


def test_generate_refuses_too_few_tokens(tiny_llama_dir):
    result = run_cli("generate", "--model", str(tiny_llama_dir), "--new-tokens", "1")
    assert result.returncode == 2 and "at least 2" in result.stderr
    result = run_cli("generate", "--model", str(tiny_llama_dir), "--prompt", "  ")
    assert result.returncode == 2 and "--prompt is empty" in result.stderr
