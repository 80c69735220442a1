"""Calibrate / cut / prune_sequential on tiny models of every family, for every registered method,
and the block-by-block engine checked against a plain full-model forward."""
from __future__ import annotations

import pytest
import torch

from core.calibrate import run_layerwise
from core.layer_stats import LayerStats
from core.dense import DenseWeights
from core.errors import Cancelled, PatternError
from core.methods import all_methods
from core.patterns import Pattern
from core.pruning import calibrate, cut, prune_sequential
from tiny import FAMILY_NAMES, build_tiny

METHODS = sorted(n for n, m in all_methods().items() if not m.structured)  # structured: test_structured.py
BATCH = 4  # conftest's 6 windows: two uneven batches (4 + 2)


def logits(lm, windows):
    with torch.no_grad():
        return lm.model(windows, use_cache=False).logits


def snapshot(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_state_equal(lm, before: dict[str, torch.Tensor]) -> None:
    after = lm.model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} differs from the dense weights"


def min_width(lm) -> int:
    return min(lm.family.weight_view(m).shape[1] for m in lm.prunable().values())


def assert_nm_valid(mask: torch.Tensor, n: int, m: int) -> None:
    d_out, d_in = mask.shape
    assert (mask.view(d_out, d_in // m, m).sum(dim=2) == n).all()


# ---------------------------------------------------------------- one-shot: calibrate, then cut

@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_calibrate_and_cut_unstructured(family, method, windows):
    lm = build_tiny(family)
    before = snapshot(lm)
    artifact = calibrate(lm, method, windows, batch_size=BATCH)
    assert_state_equal(lm, before)  # calibration never changes the model
    masks = cut(artifact, 0.5)
    assert list(masks.masks) == list(lm.prunable())
    m = all_methods()[method]
    # floor per row (or matrix) can only prune less, by under one weight per row
    achieved = masks.total_sparsity()
    assert 0.5 - 1 / min_width(lm) < achieved <= 0.5 + 1e-9, achieved
    if not m.sequential:  # one global budget: exact to one weight in total, free per matrix
        total = sum(mask.numel() for mask in masks.masks.values())
        pruned = sum(int((~mask).sum()) for mask in masks.masks.values())
        assert pruned == int(0.5 * total)
        return
    for name, mask in masks.masks.items():
        d_out, d_in = mask.shape
        pruned = int((~mask).sum())
        if m.needs_dense_prepass:  # per-block allocation: each row is still cut evenly
            per_row = (~mask).sum(dim=1)
            assert (per_row == per_row[0]).all()
        elif m.updates_weights:  # exactly half of every 128-column block
            for start in range(0, d_in, 128):
                block = mask[:, start:start + 128]
                assert int((~block).sum()) == block.numel() // 2
        elif m.scope == "matrix":
            assert pruned == mask.numel() // 2
        else:
            assert ((~mask).sum(dim=1) == d_in // 2).all(), name
    if m.updates_weights:
        assert set(masks.weights) == set(masks.masks)
        for name, w in masks.weights.items():
            assert bool((w[~masks.masks[name]] == 0).all())
    dense_logits = logits(lm, windows)
    dense = artifact.dense
    dense.apply(masks)
    for name, module in lm.prunable().items():
        assert bool((lm.family.weight_view(module)[~masks.masks[name]] == 0).all())
    assert not torch.allclose(logits(lm, windows), dense_logits)
    dense.restore()
    assert_state_equal(lm, before)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_cut_nm(family, method, windows):
    lm = build_tiny(family)
    artifact = calibrate(lm, method, windows, batch_size=BATCH)
    if "nm" not in all_methods()[method].patterns:
        with pytest.raises(PatternError, match="not N:M"):
            cut(artifact, 0.5, Pattern(2, 4))
        return
    for n, m in ((2, 4), (4, 8)):
        masks = cut(artifact, 0.9, Pattern(n, m))  # the sparsity argument is ignored for N:M
        assert masks.total_sparsity() == 1 - n / m
        for mask in masks.masks.values():
            assert_nm_valid(mask, n, m)
        for name, w in masks.weights.items():
            assert bool((w[~masks.masks[name]] == 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_cut_is_repeatable(method, windows):
    lm = build_tiny("llama")
    artifact = calibrate(lm, method, windows, batch_size=BATCH)
    first = cut(artifact, 0.5)
    higher = cut(artifact, 0.7)
    again = cut(artifact, 0.5)
    assert higher.total_sparsity() > first.total_sparsity()
    for name in first.masks:
        assert torch.equal(first.masks[name], again.masks[name])
        if name in first.weights:
            assert torch.equal(first.weights[name], again.weights[name])
        if not all_methods()[method].updates_weights:
            # score methods: every weight cut at 0.5 is cut at 0.7 too
            assert not (higher.masks[name] & ~first.masks[name]).any()


def test_cut_refuses_bad_requests(windows):
    lm = build_tiny("llama")
    artifact = calibrate(lm, "wanda", windows, batch_size=BATCH)
    with pytest.raises(PatternError, match=r"\[0, 1\)"):
        cut(artifact, 1.0)
    with pytest.raises(PatternError, match="multiples of 3"):
        cut(artifact, 0.5, Pattern(2, 3))  # widths 64 and 128
    skipped = cut(artifact, 0.5, Pattern(1, 3), skip_misfits=True)
    assert skipped.masks == {} and len(skipped.meta["skipped_layers"]) == len(lm.prunable())


# ---------------------------------------------------------------- sequential pruning

@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", METHODS)
def test_prune_sequential(family, method, windows):
    lm = build_tiny(family)
    before = snapshot(lm)
    dense_logits = logits(lm, windows)
    dense = DenseWeights(lm)
    masks, artifact = prune_sequential(lm, method, windows, 0.5, dense=dense, batch_size=BATCH)
    assert list(masks.masks) == list(lm.prunable())
    assert 0.5 - 1 / min_width(lm) < masks.total_sparsity() <= 0.5 + 1e-9
    for name, module in lm.prunable().items():
        view = lm.family.weight_view(module)
        assert bool((view[~masks.masks[name]] == 0).all()), name
        if name in masks.weights:
            assert torch.equal(view, masks.weights[name])
    assert not torch.allclose(logits(lm, windows), dense_logits)
    # the artifact can be re-cut, and the dense copy restores the model exactly
    assert cut(artifact, 0.3).total_sparsity() <= 0.3 + 1e-9
    dense.restore()
    assert_state_equal(lm, before)
    assert torch.equal(logits(lm, windows), dense_logits)


@pytest.mark.parametrize("method", METHODS)
def test_sequential_block0_matches_one_shot(method, windows):
    """Block 0 sees the same dense inputs either way, so its masks must be the same."""
    lm = build_tiny("llama")
    one_shot = cut(calibrate(lm, method, windows, batch_size=BATCH), 0.5)
    seq, _ = prune_sequential(lm, method, windows, 0.5, batch_size=BATCH)
    block0 = [n for n in seq.masks if n.startswith("model.layers.0.")]
    assert block0
    for name in block0:
        assert torch.equal(seq.masks[name], one_shot.masks[name]), name
        if name in one_shot.weights:
            torch.testing.assert_close(seq.weights[name], one_shot.weights[name])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_cancel_mid_run_restores_dense(family, method, windows):
    if not all_methods()[method].sequential:
        pytest.skip("a global-budget method changes no weight before its single final cut; "
                    "its cancellation is test_cancel_global_method_midway")
    lm = build_tiny(family)
    before = snapshot(lm)
    dense = DenseWeights(lm)
    calls = {"n": 0, "pruned": False}

    def should_stop():  # stop at the first check after some weights were actually pruned
        calls["n"] += 1
        changed = any(not torch.equal(lm.family.weight_view(m), dense.weight(n)) for n, m in dense.modules.items())
        calls["pruned"] |= changed
        return changed

    with pytest.raises(Cancelled):
        prune_sequential(lm, method, windows, 0.5, dense=dense, batch_size=BATCH, should_stop=should_stop)
    assert calls["pruned"], "the run was not stopped midway"
    assert_state_equal(lm, before)


def test_cancel_global_method_midway(windows):
    lm = build_tiny("llama")
    before = snapshot(lm)
    checks = {"n": 0}

    def should_stop():  # let the first block calibrate, then stop
        checks["n"] += 1
        return checks["n"] > 1

    with pytest.raises(Cancelled):
        prune_sequential(lm, "unipruning", windows, 0.5, batch_size=BATCH, should_stop=should_stop)
    assert checks["n"] == 2
    assert_state_equal(lm, before)


def test_cancel_calibration(windows):
    lm = build_tiny("llama")
    with pytest.raises(Cancelled):
        calibrate(lm, "wanda", windows, batch_size=BATCH, should_stop=lambda: True)


def test_error_in_sequential_restores_dense(windows, monkeypatch):
    lm = build_tiny("llama")
    before = snapshot(lm)
    method = all_methods()["wanda"]
    calls = {"n": 0}
    original = type(method).score

    def failing(self, weight, stats, params):
        calls["n"] += 1
        if calls["n"] > 9:  # block 0 (7 linears) is pruned by then
            raise RuntimeError("boom")
        return original(self, weight, stats, params)

    monkeypatch.setattr(type(method), "score", failing)
    with pytest.raises(RuntimeError, match="boom"):
        prune_sequential(lm, "wanda", windows, 0.5, batch_size=BATCH)
    assert_state_equal(lm, before)


# ---------------------------------------------------------------- the engine against a real forward

def hooked_stats(lm, windows) -> dict[str, dict[str, torch.Tensor]]:
    """Input statistics of every prunable linear over one plain forward of the whole model."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for name, module in lm.prunable().items():
        def hook(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            out[name] = {"xtx": x.t() @ x, "sum_x2": (x * x).sum(0), "sum_x": x.sum(0), "n": x.shape[0]}
        handles.append(module.register_forward_pre_hook(hook))
    try:
        logits(lm, windows)
    finally:
        for h in handles:
            h.remove()
    return out


def engine_stats(lm, windows) -> tuple[dict[str, LayerStats], list[dict[str, LayerStats]]]:
    collected, per_block = {}, []
    progress = []

    def on_block(ctx):
        assert set(ctx.stats) == set(ctx.linears)
        collected.update(ctx.stats)
        per_block.append(dict(ctx.stats))
        return False

    run_layerwise(lm, windows, {"xtx", "sum_x2", "sum_x"}, on_block, batch_size=BATCH,
                  progress=lambda d, t, w: progress.append((d, t)))
    n_blocks = len(lm.blocks)
    assert progress == [(i + 1, n_blocks) for i in range(n_blocks)]
    return collected, per_block


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=what)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_engine_reproduces_real_inputs(family, windows):
    lm = build_tiny(family)
    expected = hooked_stats(lm, windows)
    got, _ = engine_stats(lm, windows)
    assert set(got) == set(expected) == set(lm.prunable())
    for name, ref in expected.items():
        stats = got[name]
        assert stats.n_tokens == windows.numel() == ref["n"]
        _close(stats.xtx, ref["xtx"], f"{name} X^T X")
        _close(stats.sum_x2, ref["sum_x2"], f"{name} sum x^2")
        _close(stats.sum_x, ref["sum_x"], f"{name} sum x")
        _close(stats.mean_x2(), ref["sum_x2"] / ref["n"], f"{name} mean x^2")
        var = ref["sum_x2"] / ref["n"] - (ref["sum_x"] / ref["n"]) ** 2
        _close(stats.variance(), var.clamp_min(0), f"{name} variance")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_shared_inputs_share_one_stats_object(family, windows):
    lm = build_tiny(family)
    expected = hooked_stats(lm, windows)
    _, per_block = engine_stats(lm, windows)
    att, mlp = lm.family.attention, lm.family.mlp
    for index, stats in enumerate(per_block):
        prefix = lm.family.block_prefix(index) + "."
        groups = []
        if att.q is not None:
            groups.append([att.q, att.k, att.v])
        if len(mlp.inputs) > 1:
            groups.append(list(mlp.inputs))
        for group in groups:
            objs = [stats[prefix + rel] for rel in group]
            assert all(o is objs[0] for o in objs), group
            assert objs[0].n_tokens == windows.numel()  # counted once, not once per sharer
            _close(objs[0].xtx, expected[prefix + group[0]]["xtx"], f"{group} X^T X")
            _close(objs[0].sum_x2, expected[prefix + group[-1]]["sum_x2"], f"{group} sum x^2")
        # different inputs never share
        assert stats[prefix + att.out] is not stats[prefix + mlp.out]
        for rel in (att.out, mlp.out):
            assert all(stats[prefix + rel] is not stats[prefix + g] for grp in groups for g in grp)
    if family in ("llama", "gemma3", "opt"):
        assert att.q is not None  # these families do exercise the sharing


def test_engine_rejects_unknown_statistics(windows):
    lm = build_tiny("llama")
    with pytest.raises(ValueError, match="unknown statistics"):
        run_layerwise(lm, windows, {"xtx", "hessian"})


def test_engine_feeds_pruned_outputs_forward(windows):
    """After on_block changes a block, the next block's inputs are the changed block's outputs."""
    lm = build_tiny("llama")
    seen = {}

    def on_block(ctx):
        seen[ctx.index] = ctx.inputs.clone()
        if ctx.index == 0:
            for module in ctx.linears.values():
                module.weight.data.zero_()  # the block becomes the identity (residuals only)
            return True
        return False

    run_layerwise(lm, windows, {"sum_x2"}, on_block, batch_size=BATCH)
    torch.testing.assert_close(seen[1], seen[0])


def test_artifact_nbytes_counts_what_the_artifact_keeps(windows):
    """UniPruning keeps its Gamma (4 bytes a weight), the sorted copy (4), row ranks (2) and the
    first step (2); Wanda keeps only ranks (2) and vector statistics."""
    lm = build_tiny("llama")
    weights = sum(m.weight.numel() for m in lm.prunable().values())
    uni = calibrate(lm, "unipruning", windows, batch_size=BATCH)
    assert uni.nbytes() >= 12 * weights
    wanda = calibrate(lm, "wanda", windows, batch_size=BATCH)
    assert 2 * weights <= wanda.nbytes() < 3 * weights
