"""core.calibrate.statistics_dtype: the statistics summed in float64 (bench/high_sparsity.py's
check of how much fp32 summation moves a result) still reach the methods as float32, and are the
float64 sums rounded once; the default stays float32 summation."""
from __future__ import annotations

import pytest
import torch

from core.calibrate import run_layerwise, statistics_dtype


def _block0_stats(lm, windows) -> dict:
    seen = {}

    def on_block(ctx):
        if ctx.index == 0:
            seen.update(ctx.stats)
        return False

    run_layerwise(lm, windows, {"sum_x2", "sum_x", "xtx"}, on_block, batch_size=2)
    return seen


def _reference_sum_x2(lm, windows, name: str) -> torch.Tensor:
    """The float64 sum of x^2 over every token entering `name`, made independently of the engine
    (a hook on the plain model's forward), in the engine's batch order."""
    module = lm.prunable()[name]
    total = torch.zeros(module.in_features, dtype=torch.float64)

    def hook(_module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
        total.add_((x * x).sum(0))

    handle = module.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], 2):
                lm.model(windows[start:start + 2], use_cache=False)
    finally:
        handle.remove()
    return total


def test_float64_sums_reach_methods_as_float32_rounded_once(tiny_model):
    lm = tiny_model("llama")
    windows = torch.randint(0, 256, (6, 48), generator=torch.Generator().manual_seed(3))
    name = next(n for n in lm.prunable() if n.endswith("down_proj") and ".0." in n)
    fp32 = _block0_stats(lm, windows)
    with statistics_dtype(torch.float64):
        fp64 = _block0_stats(lm, windows)
    default_again = _block0_stats(lm, windows)
    for stats in (*fp32.values(), *fp64.values()):
        assert stats.sum_x2.dtype == stats.sum_x.dtype == stats.xtx.dtype == torch.float32
    reference = _reference_sum_x2(lm, windows, name)
    assert torch.equal(fp64[name].sum_x2, reference.float())  # summed in float64, rounded once
    err32 = (fp32[name].sum_x2.double() - reference).abs().sum()
    err64 = (fp64[name].sum_x2.double() - reference).abs().sum()
    assert err64 <= err32
    # the context ends with its block: the default is float32 summation again, bit for bit
    for key in fp32:
        assert torch.equal(default_again[key].sum_x2, fp32[key].sum_x2)
        assert torch.equal(default_again[key].xtx, fp32[key].xtx)


def test_only_float32_or_float64():
    with pytest.raises(ValueError, match="float32 or float64"):
        with statistics_dtype(torch.bfloat16):
            pass
