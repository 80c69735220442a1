"""Týr-the-Pruner: group OBS scores, nested refitted levels, budget-exact mutations, top-k KL
fitness, and the whole method through the structured pipeline on tiny real models."""
from __future__ import annotations

import random

import pytest
import torch

from core.calibrate import run_layerwise
from core.errors import Cancelled
from core.methods import get_method
from core.structured import tyr
from core.structured.pipeline import prune_structured
from core.hessian import damped
from core.structured.solve import reconstruction_error, refit_columns
from core.structured.units import all_block_units, decoder_params
from tiny import build_tiny

FAST = {"generations": 4, "offspring": 6, "iterations": 2, "stage_tokens": "128,512,2048"}


def _problem(d_in=24, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, d_in, generator=g) @ (torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g))
    return torch.randn(d_out, d_in, generator=g), x.t() @ x


def _removal_cost(w, hd, keep_units, size):
    """Exact reconstruction error (1/2 ||X dW||^2 on the damped H) after the best refit of the kept units."""
    v = refit_columns(w.double(), hd, tyr.unit_columns(keep_units, size), 0.0)
    return 0.5 * reconstruction_error(w, v, hd)


# ---------------------------------------------------------------- local pruning

@pytest.mark.parametrize("size", [1, 4])
def test_group_obs_score_is_the_exact_cost_of_removing_the_unit(size):
    w, h = _problem()
    hd = damped(h)
    scores = tyr.group_obs_scores(w, torch.cholesky_inverse(torch.linalg.cholesky(hd)), size)
    n = w.shape[1] // size
    for g in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[g] = False
        assert scores[g].item() == pytest.approx(_removal_cost(w, hd, keep, size), rel=1e-8)


@pytest.mark.parametrize("size", [1, 3])
def test_progressive_removal_is_greedy_exact_obs(size):
    """One unit per round: each removal is the cheapest given the earlier ones, which holds only
    if the OBS weight updates and inverse downdates are right."""
    w, h = _problem(d_in=24, seed=1)
    hd = damped(h)
    n = 24 // size
    order = tyr.progressive_removal(w, h, size, n - 1, per_round=1)
    assert sorted(order) == sorted(set(order)) and len(order) == n - 1
    keep = torch.ones(n, dtype=torch.bool)
    for unit in order:
        costs = {}
        for g in keep.nonzero().squeeze(1).tolist():
            trial = keep.clone()
            trial[g] = False
            costs[g] = _removal_cost(w, hd, trial, size)
        assert costs[unit] <= min(costs.values()) * (1 + 1e-6)
        keep[unit] = False


def test_gradient_term_changes_the_order_when_weights_are_off_the_optimum():
    w, h = _problem(seed=2)
    start = w.clone()
    start[:, 5] *= 40  # far from the reference: removing column 5 now *reduces* the error
    assert tyr.progressive_removal(w, h, 1, 1, per_round=1, start=start) == [5]
    assert tyr.progressive_removal(w, h, 1, 1, per_round=1) != [5]  # from the optimum, 5 is not the cheapest


def test_level_counts_are_centred_and_clipped():
    assert tyr.level_counts(8, 3, 9, 24) == [0, 0, 2, 5, 8, 11, 14, 17, 20]
    assert tyr.level_counts(1, 1, 9, 3) == [0, 0, 0, 0, 1, 2, 3, 3, 3]
    assert tyr.step_units(0.125, 3) == 1 and tyr.step_units(0.125, 1536) == 192


def _out_projection_hessians(lm, windows):
    """(name, dense weight, H, unit size) of every o/down projection, from the dense model."""
    family, units = lm.family, all_block_units(lm)
    out = []

    def on_block(ctx):
        u = units[ctx.index]
        prefix = family.block_prefix(ctx.index)
        for rel, size in ((family.attention.out, u.q_heads_per_unit * u.head_dim), (family.mlp.out, 1)):
            name = f"{prefix}.{rel}"
            out.append((name, family.weight_view(ctx.linears[name]).clone(), ctx.stats[name].xtx.clone(), size))
        return False

    run_layerwise(lm, windows, {"xtx"}, on_block)
    return out


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_levels_nested_exact_counts_and_refit_beats_masking(tiny_model, text_windows, family):
    lm = tiny_model(family)
    for name, w, h, size in _out_projection_hessians(lm, text_windows):
        n = w.shape[1] // size
        centre = n // 2
        lv = tyr.sublayer_levels(w, h, size, centre, max(1, n // 8), 9)
        assert lv.counts == tyr.level_counts(centre, max(1, n // 8), 9, n)
        for count, keep, new in zip(lv.counts, lv.keeps, lv.weights):
            assert int(keep.sum()) == n - count, name
            cols = tyr.unit_columns(keep, size)
            assert torch.all(new[:, ~cols] == 0)
            masked = w * cols
            assert reconstruction_error(w, new, h) <= reconstruction_error(w, masked, h) * (1 + 1e-5) + 1e-6, name
        for a, b in zip(lv.keeps, lv.keeps[1:]):
            assert torch.all(b <= a), "levels must be nested"
        if 0 < lv.counts[-1] < n:  # a real removal: the refit is strictly better than masking
            assert reconstruction_error(w, lv.weights[-1], h) < reconstruction_error(
                w, w * tyr.unit_columns(lv.keeps[-1], size), h)


# ---------------------------------------------------------------- budget and mutation

def test_spread_and_initial_counts():
    parts = tyr.spread(22, [3] * 30)
    assert sum(parts) == 22 and set(parts) == {0, 1}
    zeros = [i for i, p in enumerate(parts) if p == 0]
    assert min(b - a for a, b in zip(zeros, zeros[1:])) >= 3  # evenly spaced, not the first or last blocks
    assert tyr.spread(10, [4, 0, 8]) == [3, 0, 7]
    assert tyr.spread(99, [4, 0, 8]) == [4, 0, 8]
    # smollm2-like: 30 blocks, 3 attention units of 294912 params, 1536 channels of 1728
    attn, mlp = tyr.initial_counts(0.25 * 30 * (3 * 294912 + 1536 * 1728), [3] * 30, [294912] * 30,
                                   [1536] * 30, [1728] * 30)
    removed = sum(attn) * 294912 + sum(mlp) * 1728
    assert abs(removed - 0.25 * 30 * (3 * 294912 + 1536 * 1728)) <= 1728 / 2
    assert sum(attn) == round(0.25 * 90)


@pytest.mark.parametrize("unit_params_of", ["uniform", "mixed"])
def test_every_mutation_preserves_the_removed_parameter_count(unit_params_of):
    rng = random.Random(0)
    kinds, counts, unit_params = [], [], []
    for block in range(12):
        attn_p = 294912 if unit_params_of == "uniform" or block % 2 else 147456  # mixed: two attention sizes
        centre_a, centre_m = rng.randint(0, 3), rng.randint(100, 600)
        kinds += ["attn", "mlp"]
        counts += [tyr.level_counts(centre_a, 1, 9, 3), tyr.level_counts(centre_m, 96, 9, 1536)]
        unit_params += [attn_p, 1728]
    state = [4] * len(kinds)
    budget = tyr.removed_params(state, counts, unit_params)
    moved = 0
    for _ in range(3000):
        moves = tyr.feasible_moves(state, counts, unit_params, kinds)
        for a, b in moves[:50]:  # every candidate move on its own
            trial = list(state)
            trial[a] += 1
            trial[b] -= 1
            assert kinds[a] == kinds[b]
            assert tyr.removed_params(trial, counts, unit_params) == budget
        new = tyr.mutate(state, counts, unit_params, kinds, rng, rng.randint(1, 4))
        assert tyr.removed_params(new, counts, unit_params) == budget
        assert all(0 <= level < 9 for level in new)
        moved += new != state
        state = new
    assert moved > 2000  # the moves really happen


# ---------------------------------------------------------------- fitness

def test_topk_kl_is_zero_for_the_same_model_and_bounded_by_the_full_kl():
    g = torch.Generator().manual_seed(0)
    dense = 3 * torch.randn(50, 300, generator=g)
    other = dense + torch.randn(50, 300, generator=g)
    idx, logp = tyr.topk_reference(dense, 16)
    assert tyr.kl_to_reference(dense, idx, logp).abs().max() < 1e-5
    kl = tyr.kl_to_reference(other, idx, logp)
    full = (dense.log_softmax(-1).exp() * (dense.log_softmax(-1) - other.log_softmax(-1))).sum(-1)
    assert torch.all(kl > 0) and torch.all(kl <= full + 1e-5)


# ---------------------------------------------------------------- the method

def _dense_state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def _same_weights(lm, state):
    return all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_tyr_through_the_pipeline(tiny_model, text_windows, family):
    lm = tiny_model(family)
    units = all_block_units(lm)
    total = decoder_params(units)
    plans, steps = [], []
    params = {**FAST, "seed": 3}
    dense_logits = lm.model(text_windows[:4], use_cache=False).logits.detach()
    mask_set, plan = prune_structured(lm, "tyr", text_windows, 0.3, params,
                                      progress=lambda d, t, w: steps.append((d, t)),
                                      on_plan=lambda p, info: plans.append((p, info)))
    # the budget: within one MLP channel's parameters of the target, and as reported
    removed = plan.removed_params(units)
    assert abs(removed - 0.3 * total) <= units[0].channel_params
    assert plan.meta["removed_params"] == removed
    assert plan.meta["achieved_sparsity"] == pytest.approx(removed / total, abs=1e-6)
    # the search never ends worse than its uniform start; on_plan saw every improvement
    assert plan.meta["fitness_kl"] <= plan.meta["no_search_fitness_kl"]
    assert plans and plans[0][1]["generation"] == 0
    fits = [info["fitness"] for _, info in plans]
    assert fits == sorted(fits, reverse=True) and len(set(fits)) == len(fits)
    assert plans[-1][0] is plan and fits[-1] == plan.meta["fitness_kl"]
    assert all(p.removed_params(units) == removed for p, _ in plans)  # every candidate: the same budget
    # progress reaches its total, never goes back
    assert steps[-1][0] == steps[-1][1] and [d for d, _ in steps] == sorted(d for d, _ in steps)
    # the model now is the plan: its KL to the dense model on the fitness tokens is the reported one
    from core.structured.tyr import kl_to_reference, topk_reference

    chunks = text_windows[:, :64]
    n = plan.meta["fitness_tokens"] // 64
    lm_dense = tiny_model(family)
    ref = topk_reference(lm_dense.model(chunks[:n], use_cache=False).logits, 64)
    kl = kl_to_reference(lm.model(chunks[:n], use_cache=False).logits, *ref).mean().item()
    assert kl == pytest.approx(plan.meta["fitness_kl"], rel=1e-3, abs=1e-9)
    assert not torch.equal(lm.model(text_windows[:4], use_cache=False).logits, dense_logits)
    # deterministic for a fixed seed
    lm2 = tiny_model(family)
    _, again = prune_structured(lm2, "tyr", text_windows, 0.3, params)
    assert all(torch.equal(a, b) for a, b in zip(plan.keep_attn, again.keep_attn))
    assert all(torch.equal(a, b) for a, b in zip(plan.keep_channels, again.keep_channels))
    assert plan.weights.keys() == again.weights.keys()
    assert all(torch.equal(plan.weights[k], again.weights[k]) for k in plan.weights)


def test_search_moves_the_distribution_and_no_search_is_the_uniform_start(tiny_model, text_windows):
    lm = tiny_model("llama")
    units = all_block_units(lm)
    _, flat = prune_structured(lm, "tyr", text_windows, 0.4, {**FAST, "search": False})
    attn, mlp = tyr.initial_counts(0.4 * decoder_params(units), [u.attn_units for u in units],
                                   [u.attn_unit_params for u in units], [u.channels for u in units],
                                   [u.channel_params for u in units])
    assert [u.attn_units - int(a.sum()) for u, a in zip(units, flat.keep_attn)] == attn
    assert [u.channels - int(c.sum()) for u, c in zip(units, flat.keep_channels)] == mlp
    assert flat.meta["fitness_kl"] == flat.meta["no_search_fitness_kl"] and flat.meta["generations_run"] == 0
    # the other start: every block's own removal counts, as the other structured methods
    _, per_block = prune_structured(tiny_model("llama"), "tyr", text_windows, 0.4,
                                    {**FAST, "search": False, "start": "block"})
    assert [(u.attn_units - int(a.sum()), u.channels - int(c.sum()))
            for u, a, c in zip(units, per_block.keep_attn, per_block.keep_channels)] == \
        [u.removal_counts(0.4) for u in units]
    lm = tiny_model("llama")
    _, searched = prune_structured(lm, "tyr", text_windows, 0.4, {**FAST, "generations": 8, "offspring": 8})
    assert searched.meta["no_search_fitness_kl"] == pytest.approx(flat.meta["fitness_kl"], rel=1e-9)
    assert searched.meta["fitness_kl"] < flat.meta["fitness_kl"]  # the tiny llama does improve
    assert searched.removed_params(units) == flat.removed_params(units)


def test_expected_propagation_hits_the_budget(tiny_model, text_windows):
    lm = tiny_model("opt")
    units = all_block_units(lm)
    _, plan = prune_structured(lm, "tyr", text_windows, 0.5, {**FAST, "propagation": "expected", "levels": 5})
    assert abs(plan.removed_params(units) - 0.5 * decoder_params(units)) <= units[0].channel_params
    assert plan.meta["fitness_kl"] <= plan.meta["no_search_fitness_kl"]


@pytest.fixture(scope="module")
def stop_checks(text_windows):
    """How many times a whole (uncancelled) Týr run on the tiny llama asks whether to stop (one
    run for the module: the cancel tests below stop at fractions of it)."""
    calls = []
    prune_structured(build_tiny("llama"), "tyr", text_windows, 0.3, FAST, should_stop=lambda: calls.append(1) and False)
    return len(calls)


@pytest.mark.parametrize("when", [0.02, 0.3, 0.9])
def test_cancel_raises_and_leaves_the_model_dense(tiny_model, text_windows, stop_checks, when):
    """Stops in the build, at the first generations or deep in the search."""
    method = get_method("tyr")
    stop_after = max(1, int(when * stop_checks))
    for direct in (True, False):
        lm = tiny_model("llama")
        dense = _dense_state(lm)
        calls = []

        def should_stop():
            calls.append(1)
            return len(calls) > stop_after

        with pytest.raises(Cancelled):
            if direct:  # the method's own restore, without the pipeline's
                method.prune_structured(lm, text_windows, 0.3, method.resolve_params(FAST), should_stop=should_stop)
            else:
                prune_structured(lm, "tyr", text_windows, 0.3, FAST, should_stop=should_stop)
        assert _same_weights(lm, dense)


def test_registered_with_sane_params():
    method = get_method("tyr")
    params = method.resolve_params({})
    assert method.structured and params["levels"] == 9 and params["step"] == 0.125
    assert params["propagation"] == "centre" and params["search"] is True
    with pytest.raises(ValueError):
        method.resolve_params({"propagation": "mean"})
