"""UniPruning: the mirror-descent maths by hand, the global controller's budget, N:M validity,
artifacts on disk, and its cuts on tiny models of every family."""
from __future__ import annotations

import pytest
import torch

from core.artifacts import load_artifact, save_artifact
from core.calibrate import run_layerwise
from core.errors import MaskFileError
from core.patterns import Pattern
from core.pruning import calibrate, cut, update_cut_params
from core.unipruning import BUDGET_SCALES, budget_scales, keep_mask_from_count, mirror_descent, mirror_descent_step, prune_counts, quantile_threshold, subset_size, window_saliency
from tiny import FAMILY_NAMES, build_tiny

BATCH = 4


# ---------------------------------------------------------------- the maths, by hand

def test_mirror_descent_steps_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    z, gamma = torch.zeros(2, 2), torch.zeros(2, 2)
    # step 1: z = 0.5 S = [.5 1; 1.5 2]; t = 25% quantile of |z| = 0.5 (1st of 4); Gamma = z - t, >= 0
    mirror_descent_step(z, gamma, s, kappa=0.5, lam=0.25)
    assert torch.allclose(z, torch.tensor([[0.5, 1.0], [1.5, 2.0]]))
    assert torch.allclose(gamma, torch.tensor([[0.0, 0.5], [1.0, 1.5]]))
    # step 2: z += 0.5 (S - Gamma) = [1 1.75; 2.5 3.25]; t = 1; Gamma = [0 .75; 1.5 2.25]
    mirror_descent_step(z, gamma, s, kappa=0.5, lam=0.25)
    assert torch.allclose(z, torch.tensor([[1.0, 1.75], [2.5, 3.25]]))
    assert torch.allclose(gamma, torch.tensor([[0.0, 0.75], [1.5, 2.25]]))


def test_soft_threshold_zeroes_exactly_the_quantile():
    z = torch.randperm(1000).float().reshape(40, 25) + 1  # distinct values
    gamma = torch.zeros_like(z)
    mirror_descent_step(torch.zeros_like(z), gamma, z, kappa=1.0, lam=0.1)
    assert int((gamma == 0).sum()) == 100
    kept = gamma != 0
    assert z[~kept].max() < z[kept].min()  # the zeroed ones are the smallest


def test_quantile_is_sampled_only_for_big_matrices():
    values = torch.arange(1, 1001, dtype=torch.float32)
    assert quantile_threshold(values, 0.01).item() == 10.0
    big = torch.rand(400_000, generator=torch.Generator().manual_seed(0))
    approx = quantile_threshold(big, 0.5, generator=torch.Generator().manual_seed(0)).item()
    assert abs(approx - 0.5) < 0.01


def test_saliencies_by_hand():
    w = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    x2 = torch.tensor([4.0, 1.0])
    wanda = window_saliency(w, x2, "wanda")
    raw = torch.tensor([[2.0, 3.0], [4.0, 2.0]])
    assert torch.allclose(wanda, raw / raw.mean())
    ria = window_saliency(w, x2, "ria", exponent=0.5)
    rel = w / w.sum(1, keepdim=True) + w / w.sum(0, keepdim=True)
    raw = rel * torch.tensor([2.0, 1.0])
    assert torch.allclose(ria, raw / raw.mean())
    assert subset_size(10, 100) == 2 and subset_size(3, 3) == 1
    # stochRIA with every row and column in its subsets is RIA
    full = window_saliency(w, x2, "stochria", exponent=0.5, tau=2)
    assert torch.allclose(full, ria)


def test_first_step_records_activation():
    abs_w = torch.tensor([[1.0, 0.001], [2.0, 3.0]])
    gamma, first = mirror_descent(abs_w, torch.ones(5, 2), "wanda", kappa=0.5, lam=0.25)
    assert first.dtype == torch.int16
    assert first[1, 1] == 1 and first[0, 0] == 1  # big ones are active from the first step
    assert first[0, 1] == 6  # the tiny one is always below the quantile: never active
    assert gamma[0, 1] == 0


# ---------------------------------------------------------------- global controller

def _random_sorted(seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = {f"m{i}": torch.rand(n, generator=g) * (i + 1) for i, n in enumerate([50, 120, 33, 400])}
    scores["m1"][:30] = 0.0  # ties across matrices at the threshold
    scores["m3"][:25] = 0.0
    return scores, {k: v.sort().values for k, v in scores.items()}


@pytest.mark.parametrize("n_prune", [0, 1, 30, 54, 55, 56, 301, 602, 603])
def test_global_budget_is_exact_and_takes_the_lowest(n_prune):
    scores, sorted_scores = _random_sorted()
    counts = prune_counts(sorted_scores, n_prune)
    assert sum(counts.values()) == n_prune
    masks = {k: keep_mask_from_count(scores[k], sorted_scores[k], counts[k]) for k in scores}
    assert sum(int((~m).sum()) for m in masks.values()) == n_prune
    pruned = torch.cat([scores[k][~masks[k]] for k in scores])
    kept = torch.cat([scores[k][masks[k]] for k in scores])
    if len(pruned) and len(kept):
        assert pruned.max() <= kept.min()


@pytest.mark.parametrize("n_prune", [0, 1, 55, 300, 603])
def test_scaled_budget_equals_the_budget_over_scaled_scores(n_prune):
    """Scales compare each matrix's scores divided by its scale: the same counts (to the split of
    weights within one float32 step of the threshold) as dividing the scores first."""
    scores, sorted_scores = _random_sorted(5)
    scales = {"m0": 0.5, "m1": 3.0, "m2": 1.0, "m3": 7.25}
    counts = prune_counts(sorted_scores, n_prune, scales=scales)
    assert sum(counts.values()) == n_prune
    divided = prune_counts({k: v / scales[k] for k, v in sorted_scores.items()}, n_prune)
    assert all(abs(counts[k] - divided[k]) <= 1 for k in counts)
    if n_prune == 300:  # past the 55 zero ties, the scales move budget between matrices
        assert counts != prune_counts(sorted_scores, n_prune)


@pytest.mark.parametrize("kind", BUDGET_SCALES)
def test_budget_scales(kind):
    _, sorted_scores = _random_sorted(2)
    scales = budget_scales(sorted_scores, kind)
    if kind == "mean":
        assert scales is None
    elif kind == "median":
        assert all(scales[k] == float(v[v.numel() // 2]) for k, v in sorted_scores.items())
    else:
        assert all(abs(scales[k] - float(v.square().mean().sqrt())) < 1e-5 for k, v in sorted_scores.items())


def test_global_budget_respects_bounds():
    scores, sorted_scores = _random_sorted(3)
    bounds = {k: (int(0.3 * v.numel()), int(0.7 * v.numel())) for k, v in scores.items()}
    counts = prune_counts(sorted_scores, 300, bounds)
    assert sum(counts.values()) == 300
    assert all(bounds[k][0] <= counts[k] <= bounds[k][1] for k in counts)
    with pytest.raises(ValueError):
        prune_counts(sorted_scores, 10, bounds)  # the lower bounds alone prune more


# ---------------------------------------------------------------- on models

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_unipruning_on_every_family(family, windows_seed1):
    lm = build_tiny(family)
    artifact = calibrate(lm, "unipruning", windows_seed1, batch_size=BATCH)
    total = sum(s.numel() for s in artifact.scores.values())
    for sparsity in (0.3, 0.5, 0.8):
        masks = cut(artifact, sparsity)
        pruned = sum(int((~m).sum()) for m in masks.masks.values())
        assert pruned == int(sparsity * total)  # one budget, exact to the weight
    a, b = cut(artifact, 0.6), cut(artifact, 0.6)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert set(artifact.extras[next(iter(artifact.scores))]) == {"first_step"}


def test_global_allocation_follows_the_scores_and_bounds_hold(windows_seed1):
    lm = build_tiny("llama")
    skewed = "model.layers.0.self_attn.q_proj"  # 90% of its weights made tiny: few matter
    with torch.no_grad():
        weight = lm.family.weight_view(lm.prunable()[skewed])
        weight[torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) < 0.9] *= 0.01
    artifact = calibrate(lm, "unipruning", windows_seed1, batch_size=BATCH)
    spread = cut(artifact, 0.5).sparsity_per_matrix()
    assert spread[skewed] > 0.8  # the allocation is an output: the budget goes where scores are low
    assert all(s < 0.5 for name, s in spread.items() if name != skewed)
    update_cut_params(artifact, {"max_shift": 0.02})
    bounded = cut(artifact, 0.5).sparsity_per_matrix()
    assert all(0.48 - 1e-3 <= s <= 0.52 + 1e-3 for s in bounded.values())
    assert bounded[skewed] > 0.52 - 1e-3  # still pruned the most it may
    update_cut_params(artifact, {"controller": "row"})
    for mask in cut(artifact, 0.5).masks.values():
        assert ((~mask).sum(dim=1) == mask.shape[1] // 2).all()
    update_cut_params(artifact, {"controller": "matrix"})
    for mask in cut(artifact, 0.5).masks.values():
        assert int((~mask).sum()) == mask.numel() // 2


@pytest.mark.parametrize("nm_score", ["gamma", "first_step"])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_unipruning_nm_valid(windows_seed1, nm_score, n, m):
    lm = build_tiny("llama")
    artifact = calibrate(lm, "unipruning", windows_seed1, params={"nm_score": nm_score}, batch_size=BATCH)
    masks = cut(artifact, 0.0, Pattern(n, m))
    for mask in masks.masks.values():
        groups = mask.reshape(mask.shape[0], -1, m)
        assert (groups.sum(dim=2) == n).all()


def test_window_statistics_match_the_pooled_ones(windows_seed1):
    lm = build_tiny("llama")
    seen = {}

    def on_block(ctx):
        seen.update(ctx.stats)
        return False

    run_layerwise(lm, windows_seed1, frozenset({"sum_x2", "window_x2"}), on_block, batch_size=BATCH)
    for stats in seen.values():
        per_window = stats.window_mean_x2()
        assert per_window.shape[0] == windows_seed1.shape[0]
        assert torch.allclose(per_window.mean(0), stats.mean_x2(), rtol=1e-5, atol=1e-7)


def test_artifact_round_trip(tmp_path, windows_seed1):
    lm = build_tiny("llama")
    artifact = calibrate(lm, "unipruning", windows_seed1, batch_size=BATCH)
    path = save_artifact(tmp_path / "a.safetensors", artifact, lm)
    again = load_artifact(path, lm)
    assert again.method == "unipruning" and again.params == artifact.params
    for name in artifact.scores:
        assert torch.equal(again.scores[name], artifact.scores[name])
        assert torch.equal(again.extras[name]["first_step"], artifact.extras[name]["first_step"])
    for pattern, sparsity in ((Pattern(), 0.65), (Pattern(2, 4), 0.0)):
        a, b = cut(artifact, sparsity, pattern), cut(again, sparsity, pattern)
        assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_artifact_of_a_weight_updating_method_round_trips(tmp_path, windows_seed1):
    lm = build_tiny("llama")
    artifact = calibrate(lm, "sparsegpt", windows_seed1, batch_size=BATCH)
    again = load_artifact(save_artifact(tmp_path / "s.safetensors", artifact, lm), lm)
    a, b = cut(artifact, 0.5), cut(again, 0.5)
    assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)


def test_artifact_refuses_other_model_and_corrupt_files(tmp_path, windows_seed1):
    lm = build_tiny("llama")
    path = save_artifact(tmp_path / "a.safetensors", calibrate(lm, "wanda", windows_seed1, batch_size=BATCH), lm)
    with pytest.raises(MaskFileError, match="calibrated on"):
        load_artifact(path, build_tiny("opt"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MaskFileError, match="not a readable"):
        load_artifact(broken, lm)


# ---------------------------------------------------------------- released-code variant

def test_prox_nm_by_hand():
    from core.unipruning import prox_nm

    w = torch.tensor([[0.5, -0.05, 2.0, 0.1, 1.0, 0.2, -0.3, 0.0]])
    out = prox_nm(w, 2, 4, 0.08)
    # group 1: keep 2.0 and 0.5; shrink -0.05 -> 0, 0.1 -> 0.02; group 2: keep 1.0, -0.3; 0.2 -> 0.12
    assert torch.allclose(out, torch.tensor([[0.5, 0.0, 2.0, 0.02, 1.0, 0.12, -0.3, 0.0]]))
    assert torch.equal(prox_nm(torch.ones(2, 6), 2, 4, 0.1), torch.ones(2, 6))  # width 6: not 2:4-able


def test_adamw_variant_moves_weights_only_transiently(windows_seed1):
    lm = build_tiny("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    seen = []
    artifact = calibrate(lm, "unipruning-adamw", windows_seed1, params={"lr": 1e-2, "prox_nm": "2:4"},
                         progress=lambda done, total, what: seen.append(what))
    assert len(seen) == windows_seed1.shape[0] and "loss" in seen[0]
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in lm.model.parameters())
    masks = cut(artifact, 0.0, Pattern(2, 4))
    assert all((m.reshape(m.shape[0], -1, 4).sum(2) == 2).all() for m in masks.masks.values())


def test_adamw_variant_refuses_what_memory_cannot_hold():
    from core.errors import PruneError
    from core.unipruning_adamw import check_backprop_memory

    lm = build_tiny("llama")
    check_backprop_memory(lm, 32)  # a tiny model fits
    with pytest.raises(PruneError, match="frozen variant"):
        check_backprop_memory(lm, 4_000_000)  # activations of 4M-token windows do not


def test_global_row_controller_is_exact_and_even_per_row(windows_seed1):
    from core.unipruning import cut_rows_by_count

    ranks = torch.stack([torch.randperm(10) for _ in range(4)])
    mask = cut_rows_by_count(ranks, 13)  # 13 over 4 rows: 4, 3, 3, 3
    assert (~mask).sum(dim=1).tolist() == [4, 3, 3, 3]
    assert all(set(ranks[i][~mask[i]].tolist()) == set(range(int((~mask[i]).sum()))) for i in range(4))
    lm = build_tiny("llama")
    artifact = calibrate(lm, "unipruning", windows_seed1, params={"controller": "global-row"}, batch_size=BATCH)
    total = sum(s.numel() for s in artifact.scores.values())
    masks = cut(artifact, 0.6)
    assert sum(int((~m).sum()) for m in masks.masks.values()) == int(0.6 * total)
    for mask in masks.masks.values():
        per_row = (~mask).sum(dim=1)
        assert int(per_row.max() - per_row.min()) <= 1


def test_nm_masks_are_reused_until_a_cut_parameter_changes(windows_seed1):
    from core.pruning import update_cut_params

    lm = build_tiny("llama")
    artifact = calibrate(lm, "unipruning", windows_seed1, batch_size=BATCH)
    first = cut(artifact, 0.3, Pattern(2, 4))
    again = cut(artifact, 0.7, Pattern(2, 4))  # the sparsity does not matter at N:M
    assert all(again.masks[n] is first.masks[n] for n in first.masks)  # served from the cache
    update_cut_params(artifact, {"nm_score": "first_step"})
    other = cut(artifact, 0.3, Pattern(2, 4))
    assert any(other.masks[n] is not first.masks[n] for n in first.masks)
    assert all((m.reshape(m.shape[0], -1, 4).sum(2) == 2).all() for m in other.masks.values())
