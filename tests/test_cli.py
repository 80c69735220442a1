"""The command line as a user runs it: core.cli.main (what `python -m core ...` runs) with its
exit codes and output, in this process through conftest's `cli`; one run of `python -m core`
itself checks that the exit code reaches the shell."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.fast_decode import cpu_compiler
from core.methods import all_methods
from support import REPO, child_env


def test_python_dash_m_core_exits_with_mains_code():
    """The process boundary: `python -m core` passes main's exit code and its one-line error on."""
    done = subprocess.run([sys.executable, "-m", "core", "prune", "--sparsity=1.5", "--no-eval"], cwd=REPO,
                          env=child_env(HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("error: Sparsity must") and "Traceback" not in done.stderr


def test_methods_lists_every_method(cli):
    code, out, err = cli("methods")
    assert code == 0, err
    listed = [line.split()[0] for line in out.splitlines() if line and not line[0].isspace()]
    assert sorted(listed) == sorted(all_methods())
    for method in all_methods().values():
        for param in method.params:
            assert f"--param {param.name}=" in out


def test_methods_json(cli):
    code, out, err = cli("methods", "--json")
    assert code == 0, err
    described = json.loads(out)
    assert sorted(d["name"] for d in described) == sorted(all_methods())
    by_name = {d["name"]: d for d in described}
    assert by_name["sparsegpt"]["updates_weights"] is True
    assert by_name["owl"]["patterns"] == ["unstructured"]


@pytest.mark.parametrize("value", ["1.5", "abc"])
def test_prune_bad_sparsity_exits_2(cli, value):
    code, out, err = cli("prune", f"--sparsity={value}", "--no-eval")
    assert code == 2, (out, err)
    assert "error: Sparsity must" in err
    assert "Traceback" not in err
    assert "Loading" not in err  # refused before any model is loaded


@pytest.mark.parametrize("pattern, message", [("3:2", "0 < N < M"), ("2:4:8", "not understood")])
def test_prune_bad_pattern_exits_2(cli, pattern, message):
    code, out, err = cli("prune", "--pattern", pattern, "--no-eval")
    assert code == 2, (out, err)
    assert message in err
    assert "Traceback" not in err
    assert "Loading" not in err


def test_prune_missing_model_exits_2(cli, tmp_path, hub_offline):
    code, out, err = cli("prune", "--model", "./no/such", "--no-eval", "--out", tmp_path / "out")
    assert code == 2, (out, err)
    assert "error: No model folder or file at './no/such'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_an_argparse_error(cli):
    code, _, err = cli("prune", "--method", "nosuch")
    assert code == 2
    assert "invalid choice: 'nosuch'" in err


def test_prune_then_export_tiny_model(cli, tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from core.mask_file import load_masks
    from core.loading import load_model
    from core.data import evaluation_set
    from core.dense import DenseWeights
    from core.evaluate import perplexity

    out = tmp_path / "run"
    result = cli("prune", "--model", str(tiny_llama_dir), "--method", "ria", "--pattern", "2:4",
                 "--calib-windows", "4", "--seqlen", "32", "--eval-windows", "2", "--eval-dense",
                 "--out", str(out))
    assert result.code == 0, result.err
    summary = json.loads((out / "result.json").read_text())
    assert summary["achieved_sparsity"] == 0.5 and summary["pattern"] == "2:4"
    lm = load_model(str(tiny_llama_dir))
    masks = load_masks(out / "masks.safetensors", lm)
    assert masks.meta["method"] == "ria" and masks.total_sparsity() == 0.5
    # the perplexities reported are those of the dense model and of the model with the written masks
    windows, protocol = evaluation_set(lm.tokenizer, seqlen=32, max_windows=2)
    dense = DenseWeights(lm)
    assert summary["dense_ppl"] == pytest.approx(perplexity(lm, windows, protocol.as_dict()).value, rel=1e-5)
    dense.apply(masks)
    assert summary["ppl"] == pytest.approx(perplexity(lm, windows, protocol.as_dict()).value, rel=1e-5)
    dense.restore()
    assert summary["ppl"] != pytest.approx(summary["dense_ppl"], rel=1e-3)

    result = cli("export", "--model", str(tiny_llama_dir), "--masks", str(out / "masks.safetensors"),
                 "--out", str(tmp_path / "model"))
    assert result.code == 0, result.err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    modules = dict(exported.named_modules())
    for name, mask in masks.masks.items():
        w = modules[name].weight.data
        assert torch.equal(w == 0, ~mask), name  # zero exactly where pruned
    assert json.loads((tmp_path / "model" / "PRUNING.json").read_text())["source_fingerprint"] == lm.fingerprint


def test_calibrate_once_then_cut_from_the_saved_artifact(cli, tiny_llama_dir, tmp_path):
    from core.mask_file import load_masks
    from core.loading import load_model

    artifact = tmp_path / "uni.artifact.safetensors"
    data = ["--calib-windows", "4", "--seqlen", "32", "--eval-windows", "2"]
    result = cli("calibrate", "--model", str(tiny_llama_dir), "--method", "unipruning", *data,
                 "--out", str(artifact))
    assert result.code == 0, result.err
    assert json.loads(result.out)["method"] == "unipruning" and artifact.is_file()
    lm = load_model(str(tiny_llama_dir))
    for sparsity in ("0.3", "0.7"):
        out = tmp_path / f"cut{sparsity}"
        result = cli("cut", "--model", str(tiny_llama_dir), "--artifact", str(artifact), "--sparsity", sparsity,
                     "--param", "controller=global-row", *data, "--out", str(out))
        assert result.code == 0, result.err
        assert "calibrating" not in result.err  # no new calibration
        report = json.loads((out / "result.json").read_text())
        assert abs(report["achieved_sparsity"] - float(sparsity)) < 1e-4 and report["ppl"] > 0
        assert abs(load_masks(out / "masks.safetensors", lm).total_sparsity() - float(sparsity)) < 1e-4
    refused = cli("cut", "--model", str(tiny_llama_dir), "--artifact", str(artifact), "--param", "kappa=0.5",
                  *data, "--out", str(tmp_path / "x"))
    assert refused.code == 2 and "needs a new calibration" in refused.err
    sweep = cli("sweep", "--model", str(tiny_llama_dir), "--artifact", str(artifact), "--sparsities", "0.2,0.6",
                *data)
    assert sweep.code == 0, sweep.err
    assert "unipruning on" in sweep.out and "0.600" in sweep.out


def test_structured_prune_then_export_a_smaller_model(cli, tiny_llama_dir, tmp_path):
    """FLAP from the command line: the mask file says structured, the export is physically
    smaller, loads through core.loading.load_model, and computes what the masked model computes."""
    import torch

    from core.dense import DenseWeights
    from core.loading import load_model
    from core.mask_file import load_masks

    out = tmp_path / "flap"
    result = cli("prune", "--model", str(tiny_llama_dir), "--method", "flap", "--sparsity", "0.3",
                 "--calib-windows", "4", "--seqlen", "32", "--eval-windows", "2", "--out", str(out))
    assert result.code == 0, result.err
    summary = json.loads((out / "result.json").read_text())
    assert summary["pattern"] == "structured" and abs(summary["structured_sparsity"] - 0.3) < 0.1
    assert len(summary["allocation"]) == 2 and summary["ppl"] > 0

    result = cli("export", "--model", str(tiny_llama_dir), "--masks", str(out / "masks.safetensors"),
                 "--out", str(tmp_path / "small"))
    assert result.code == 0, result.err
    assert "Sliced" in result.out
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

    refused = cli("cut", "--model", str(tiny_llama_dir), "--method", "flap", "--artifact", "x.safetensors",
                  "--out", str(tmp_path / "no"))
    assert refused.code == 2 and "structured" in refused.err

    # the sliced folder decodes from the command line
    result = cli("generate", "--model", str(tmp_path / "small"), "--prompt", "hello there", "--new-tokens", "6")
    assert result.code == 0, result.err
    report = json.loads(result.err.strip().splitlines()[-1])
    assert report["new_tokens"] == 6 and report["decode_tok_s"] > 0 and report["runtime"] == "eager"
    assert result.out.startswith("hello there") and len(result.out.strip()) > len("hello there")


@pytest.mark.skipif(cpu_compiler() is None, reason="no C++ compiler: torch.compile cannot build CPU kernels here")
def test_generate_compiled_gives_the_eager_text(cli, tiny_llama_dir):
    runs = {}
    for flags in ((), ("--compile",)):
        result = cli("generate", "--model", str(tiny_llama_dir), "--prompt", "hello there", "--new-tokens", "6",
                     *flags)
        assert result.code == 0, result.err
        report = json.loads(result.err.strip().splitlines()[-1])
        assert report["new_tokens"] == 6 and report["decode_tok_s"] > 0
        runs[report["runtime"]] = result.out
    assert runs["compiled"] == runs["eager"] and runs["eager"].startswith("hello there")
    assert "compiled in" in result.err


def test_generate_refuses_too_few_tokens(cli, tiny_llama_dir):
    result = cli("generate", "--model", str(tiny_llama_dir), "--new-tokens", "1")
    assert result.code == 2 and "at least 2" in result.err
    result = cli("generate", "--model", str(tiny_llama_dir), "--prompt", "  ")
    assert result.code == 2 and "--prompt is empty" in result.err
