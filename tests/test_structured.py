"""Structured pruning: units and parameter accounting per family, the budget rules, the
reconstruction solvers, and Wanda-sp / FLAP / SPAP / StructPrune end to end on tiny models."""
from __future__ import annotations

import math

import pytest
import torch

from core.errors import Cancelled
from core.dense import DenseWeights
from core.structured.pipeline import prune_structured
from core.structured.plan import StructuredPlan, plan_from_maskset
from core.structured.reconstruct import admm_select, spap_select
from core.structured.scores import block_unit_counts, global_removal, softmax_allocation
from core.structured.solve import reconstruction_error, refit_columns
from core.structured.units import all_block_units, decoder_params
from tiny import FAMILY_NAMES, HEADS, INTERMEDIATE, KV_HEADS, build_tiny

METHODS = ("wanda-sp", "flap", "spap", "structprune")


def logits(lm, windows):
    with torch.no_grad():
        return lm.model(windows, use_cache=False).logits


# ---------------------------------------------------------------- units and accounting

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_units_and_parameter_accounting(family):
    lm = build_tiny(family)
    units = all_block_units(lm)
    gqa = family in ("llama", "gemma3")
    for u in units:
        assert u.attn_units == (KV_HEADS if gqa else HEADS)
        assert u.q_heads_per_unit * u.attn_units == HEADS
        assert u.channels == INTERMEDIATE
    # every weight of the attention and MLP matrices belongs to exactly one unit
    weights = sum(lm.family.weight_view(m).numel() for m in lm.prunable().values())
    unit_biases = sum(
        (u.attn_unit_params - ((u.q_heads_per_unit + 2) * u.head_dim * u.hidden + u.q_heads_per_unit * u.head_dim * u.hidden)) * u.attn_units
        + (u.channel_params - (len(lm.family.mlp.inputs) + 1) * u.hidden) * u.channels for u in units)
    assert decoder_params(units) == weights + unit_biases
    # removing one unit of each kind removes exactly its parameters from the masks (biases aside)
    plan = StructuredPlan.dense(units)
    plan.keep_attn[0][0] = False
    plan.keep_channels[-1][:5] = False
    zeros = sum(m.numel() - int(m.count_nonzero()) for m in plan.to_maskset(lm).masks.values())
    bias_share = (units[0].attn_unit_params - (units[0].q_heads_per_unit * 2 + 2) * units[0].head_dim * units[0].hidden
                  ) + 5 * (units[-1].channel_params - (len(lm.family.mlp.inputs) + 1) * units[-1].hidden)
    assert zeros == plan.removed_params(units) - bias_share


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_plan_survives_the_mask_round_trip(family):
    lm = build_tiny(family)
    units = all_block_units(lm)
    gen = torch.Generator().manual_seed(1)
    plan = StructuredPlan([torch.rand(u.attn_units, generator=gen) > 0.5 for u in units],
                          [torch.rand(u.channels, generator=gen) > 0.3 for u in units])
    back = plan_from_maskset(lm, plan.to_maskset(lm))
    assert all(torch.equal(a, b) for a, b in zip(plan.keep_attn, back.keep_attn))
    assert all(torch.equal(a, b) for a, b in zip(plan.keep_channels, back.keep_channels))


# ---------------------------------------------------------------- budget rules

def test_global_removal_hits_the_budget_to_one_unit():
    gen = torch.Generator().manual_seed(0)
    scores = [torch.rand(n, generator=gen) for n in (4, 128, 4, 128)]
    sizes = [300, 7, 300, 7]
    total = sum(s.numel() * p for s, p in zip(scores, sizes))
    for frac in (0.0, 0.1, 0.25, 0.5, 0.9):
        keeps = global_removal(scores, sizes, round(frac * total))
        removed = sum(int((~k).sum()) * p for k, p in zip(keeps, sizes))
        assert abs(removed - frac * total) <= max(sizes) / 2 + 1
        # the lowest scores go first, across all groups
        flat = torch.cat(scores)
        gone = torch.cat([~k for k in keeps])
        if gone.any() and (~gone).any():
            assert flat[gone].max() <= flat[~gone].min()


def test_block_unit_counts_spend_the_block_budget():
    attn, chans = block_unit_counts(3, 294912, 1536, 1728, 0.25)
    removed = attn * 294912 + chans * 1728
    assert abs(removed - 0.25 * (3 * 294912 + 1536 * 1728)) <= 1728
    assert block_unit_counts(3, 294912, 1536, 1728, 0.0) == (0, 0)
    attn, chans = block_unit_counts(3, 294912, 1536, 1728, 0.99)
    assert attn <= 2 and chans <= 1535  # one unit of each sublayer always stays


def test_softmax_allocation_limits():
    energies = [0.1, 0.5, 2.0, 0.3, 1.0]
    sizes = [100, 100, 100, 200, 100]
    for target in (0.125, 0.25, 0.5):
        hot = softmax_allocation(energies, sizes, target, temperature=1e9)
        assert all(math.isclose(s, target, rel_tol=1e-6) for s in hot)  # T -> infinity: uniform
        for t in (0.3, 1.0, 3.0):
            alloc = softmax_allocation(energies, sizes, target, temperature=t)
            spent = sum(s * n for s, n in zip(alloc, sizes)) / sum(sizes)
            assert math.isclose(spent, target, rel_tol=1e-6)  # the budget is exact
            order = sorted(range(5), key=lambda i: energies[i])
            assert all(alloc[a] >= alloc[b] - 1e-12 for a, b in zip(order, order[1:]))  # costly layers prune less
    spread = [max(softmax_allocation(energies, sizes, 0.3, t)) - min(softmax_allocation(energies, sizes, 0.3, t))
              for t in (0.3, 1.0, 10.0, 1e6)]
    assert spread == sorted(spread, reverse=True)  # colder = more uneven


# ---------------------------------------------------------------- reconstruction

def _layer(seed=0, d_in=96, d_out=24, n=600):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen) * torch.rand(d_in, generator=gen) * 3
    x[:, :8] += x[:, 8:16]  # correlated inputs: where refitting pays
    return torch.randn(d_out, d_in, generator=gen), x.t() @ x


@pytest.mark.parametrize("seed", range(4))
def test_refit_never_increases_the_reconstruction_error(seed):
    w, h = _layer(seed)
    keep = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed + 10)) > 0.4
    masked = reconstruction_error(w, w * keep, h)
    refit = reconstruction_error(w, refit_columns(w, h, keep, percdamp=0.0), h)
    assert refit <= masked * (1 + 1e-9)
    assert (refit_columns(w, h, keep)[:, ~keep] == 0).all()


@pytest.mark.parametrize("solver", [spap_select, admm_select])
@pytest.mark.parametrize("group", [1, 8])
def test_solvers_keep_exactly_k_units_and_beat_plain_masking(solver, group):
    w, h = _layer(3)
    units = w.shape[1] // group
    keep, new = solver(w, h, units // 2, group)
    assert keep.shape == (units,) and int(keep.sum()) == units // 2
    cols = keep.repeat_interleave(group)
    assert (new[:, ~cols] == 0).all()
    assert reconstruction_error(w, new, h) <= reconstruction_error(w, w * cols, h)


def test_flap_bias_compensation_reduces_the_layer_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 32, generator=gen) + torch.randn(32, generator=gen) * 2  # inputs with a mean
    w = torch.randn(16, 32, generator=gen)
    removed = torch.zeros(32, dtype=torch.bool)
    removed[::3] = True
    dense_out = x @ w.t()
    plain = x @ (w * ~removed).t()
    compensated = plain + w[:, removed] @ x[:, removed].mean(0)
    assert (compensated - dense_out).pow(2).sum() < (plain - dense_out).pow(2).sum()


# ---------------------------------------------------------------- methods end to end

@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_structured_methods_hit_the_budget(family, method, windows):
    lm = build_tiny(family)
    units = all_block_units(lm)
    dense = DenseWeights(lm)
    before = logits(lm, windows)
    biggest = max(max(u.attn_unit_params, u.channel_params) for u in units)
    for sparsity in (0.2, 0.4):
        masks, plan = prune_structured(lm, method, windows, sparsity, dense=dense)
        achieved = plan.structured_sparsity(units)
        assert abs(achieved - sparsity) * decoder_params(units) <= len(units) * biggest, (achieved, sparsity)
        assert masks.meta["pattern"] == "structured"
        # the model now computes the masked function, and the masks say which units are gone
        after = logits(lm, windows)
        assert torch.isfinite(after).all() and not torch.allclose(after, before)
        for u, keep in zip(units, plan.keep_channels):
            down = masks.masks[f"{lm.family.block_prefix(u.index)}.{lm.family.mlp.out}"]
            assert torch.equal(down.any(0), keep)
        dense.restore()
        assert torch.allclose(logits(lm, windows), before)


@pytest.mark.parametrize("method", ["spap", "structprune"])
def test_reconstruction_beats_wanda_sp_on_the_calibration_data(method, windows):
    """The refit methods aim at the dense model's function: on the text they calibrated on, their
    output stays closer to the dense model's than plain Wanda-sp's at the same budget."""
    lm = build_tiny("llama", seed=3)
    dense = DenseWeights(lm)
    ref = logits(lm, windows)
    errors = {}
    for name in ("wanda-sp", method):
        prune_structured(lm, name, windows, 0.4, dense=dense)
        errors[name] = float((logits(lm, windows) - ref).pow(2).mean())
        dense.restore()
    assert errors[method] < errors["wanda-sp"]


def test_structprune_at_infinite_temperature_is_its_uniform_allocation(windows):
    lm = build_tiny("opt")
    dense = DenseWeights(lm)
    _, hot = prune_structured(lm, "structprune", windows, 0.3, {"temperature": 1e6}, dense=dense)
    dense.restore()
    _, uniform = prune_structured(lm, "structprune", windows, 0.3, {"allocation": "uniform"}, dense=dense)
    assert all(torch.equal(a, b) for a, b in zip(hot.keep_channels, uniform.keep_channels))
    assert all(torch.equal(a, b) for a, b in zip(hot.keep_attn, uniform.keep_attn))


def test_structprune_energy_is_relative_to_the_residual_stream_it_perturbs(windows):
    """The energy's scale is the energy of each block's input (the residual stream the pruning
    error is added to), as a hook on the block sees it; "output" keeps the old scale."""
    from core.methods import get_method
    from core.structured.runner import collect_dense

    lm = build_tiny("llama", seed=1)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args, kw: seen.append(float(
        (kw.get("hidden_states", args[0] if args else None)).double().pow(2).sum())), with_kwargs=True)
        for b in lm.blocks]
    try:
        with torch.no_grad():
            lm.model(windows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    method = get_method("structprune")
    outs = collect_dense(lm, windows, method.stats)
    assert [o.input_energy for o in outs] == pytest.approx(seen, rel=1e-4)
    for out in outs:
        residual, output = method.layer_energy(out, 0.3, "residual"), method.layer_energy(out, 0.3, "output")
        assert residual > 0 and output > 0 and residual != pytest.approx(output)
    # both energies give an exact budget through the pipeline
    units, total = all_block_units(lm), decoder_params(all_block_units(lm))
    for energy in ("residual", "output"):
        dense = DenseWeights(lm)
        _, plan = prune_structured(lm, "structprune", windows, 0.3, {"energy": energy}, dense=dense)
        dense.restore()
        assert abs(plan.removed_params(units) - 0.3 * total) <= units[0].attn_unit_params


def test_flap_global_allocation_is_uneven_and_adds_biases(windows):
    lm = build_tiny("llama", seed=2)
    dense = DenseWeights(lm)
    masks, plan = prune_structured(lm, "flap", windows, 0.4, dense=dense)
    kept = [int(c.sum()) for c in plan.keep_channels]
    assert plan.biases and all(name in lm.prunable() for name in plan.biases)
    o_proj = lm.prunable()[next(n for n in plan.biases if n.endswith(lm.family.mlp.out))]
    assert o_proj.bias is not None  # the compensation is live in the model
    dense.restore()
    assert o_proj.bias is None  # and gone again: Llama's down_proj has no bias of its own
    assert len(set(kept)) > 1  # one global threshold: blocks lose different amounts


def test_cancel_leaves_the_model_dense(windows):
    lm = build_tiny("gpt2")
    dense = DenseWeights(lm)
    before = logits(lm, windows)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1  # after the first block

    with pytest.raises(Cancelled):
        prune_structured(lm, "spap", windows, 0.3, dense=dense, should_stop=stop)
    assert torch.equal(logits(lm, windows), before)


def test_structured_methods_refuse_bad_sparsity(windows):
    from core.errors import PruneError

    lm = build_tiny("llama")
    with pytest.raises(PruneError, match="Sparsity"):
        prune_structured(lm, "flap", windows, 1.5)
    with pytest.raises(PruneError, match="not a structured method"):
        prune_structured(lm, "wanda", windows, 0.3)
