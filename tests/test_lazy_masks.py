"""Lazy cuts: cut() returns masks made on first read; every reader sees the masks an eager cut
would have made, and the explorer's live view (counts, one matrix) makes no other mask."""
from __future__ import annotations

import threading

import pytest
import torch

from core.cutting import LazyMasks, cut_mask
from core.dense import DenseWeights
from core.mask_file import load_masks, save_masks
from core.maskset import allocation_table
from core.patterns import Pattern
from core.pruning import calibrate, cut, matrix_sparsities
from tiny import build_tiny, random_windows


def _eager(artifact, sparsity: float, pattern: Pattern) -> dict[str, torch.Tensor]:
    """What cut() made before it was lazy: cut_mask for every matrix at its target."""
    scope = artifact.method_obj.cut_scope(artifact.params)
    targets = matrix_sparsities(artifact, sparsity) if not pattern.is_nm else {n: sparsity for n in artifact.block_of}
    return {name: cut_mask(artifact.score(name), targets[name], pattern, scope,
                           None if pattern.is_nm else artifact.ranks(name, scope))
            for name in artifact.block_of}


@pytest.mark.parametrize("method,params", [("wanda", None), ("magnitude", None), ("owl", None),
                                           ("ria", {"scope": "matrix"})])
def test_lazy_cut_equals_the_eager_cut_and_makes_only_what_is_read(method, params):
    lm = build_tiny("llama")
    artifact = calibrate(lm, method, random_windows(4, 16), params=params)
    for sparsity, pattern in ((0.37, Pattern()), (0.6, Pattern()), (0.5, Pattern(2, 4))):
        if pattern.is_nm and "nm" not in artifact.method_obj.patterns:
            continue
        masks = cut(artifact, sparsity, pattern)
        assert isinstance(masks.masks, LazyMasks)
        first = next(iter(masks.masks))
        if not pattern.is_nm:  # N:M masks may have been made by an earlier N:M cut
            assert masks.masks.made() == []
        # what the explorer's live view reads: counts, shapes, the allocation table
        rows = allocation_table(masks, lm)
        total = masks.total_sparsity()
        per_matrix = masks.sparsity_per_matrix()
        assert len(rows) == len(masks.masks) == len(lm.prunable())
        if not pattern.is_nm:
            assert masks.masks.made() == []
        heat = masks.masks[first]  # the matrix the heatmap shows
        assert masks.masks[first] is heat  # made once
        eager = _eager(artifact, 0.5 if pattern.is_nm else sparsity, pattern)
        assert set(masks.masks) == set(eager)
        for name, mask in masks.masks.items():  # reading them all makes them all
            assert mask.dtype == torch.bool and torch.equal(mask, eager[name]), name
        assert masks.masks.made() == list(masks.masks)
        counted = {n: m.numel() - int(m.count_nonzero()) for n, m in eager.items()}
        assert masks.pruned_counts() == counted
        assert total == pytest.approx(sum(counted.values()) / sum(m.numel() for m in eager.values()))
        assert per_matrix == pytest.approx({n: counted[n] / eager[n].numel() for n in eager})
        assert [(r["name"], r["pruned"], r["params"]) for r in rows] == \
            [(n, counted[n], eager[n].numel()) for n in eager]


def test_apply_and_save_use_the_full_masks(tmp_path):
    lm = build_tiny("llama")
    dense = DenseWeights(lm)
    artifact = calibrate(lm, "wanda", random_windows(4, 16), dense=dense)
    masks = cut(artifact, 0.55)
    eager = _eager(artifact, 0.55, Pattern())
    dense.apply(masks)  # generation / perplexity / export apply the masks
    for name, module in dense.modules.items():
        assert torch.equal(lm.family.weight_view(module), dense.weight(name) * eager[name]), name
    dense.restore()
    fresh = cut(artifact, 0.55)
    loaded = load_masks(save_masks(tmp_path / "m.safetensors", fresh, lm), lm)
    assert all(torch.equal(loaded.masks[n], eager[n]) for n in eager)


def test_nm_cuts_share_the_masks_made_so_far():
    lm = build_tiny("llama")
    artifact = calibrate(lm, "wanda", random_windows(4, 16))
    first = cut(artifact, 0.5, Pattern(2, 4))
    name = next(iter(first.masks))
    made = first.masks[name]
    again = cut(artifact, 0.7, Pattern(2, 4))  # the sparsity does not change N:M masks
    assert again.masks.made() == [name] and again.masks[name] is made
    cut(artifact, 0.5)  # unstructured in between keeps the N:M cache
    assert cut(artifact, 0.5, Pattern(2, 4)).masks[name] is made
    other = cut(artifact, 0.5, Pattern(4, 8))
    assert other.masks.made() == []
    assert all((m.reshape(m.shape[0], -1, 8).sum(2) == 4).all() for m in other.masks.values())


def test_lazy_masks_reject_unknown_names_and_make_each_mask_once_across_threads():
    calls = []

    def make(name):
        calls.append(name)
        return torch.ones(2, 3, dtype=torch.bool)

    lazy = LazyMasks({"a": (2, 3), "b": (2, 3)}, make)
    with pytest.raises(KeyError):
        lazy["c"]
    assert lazy.get("c") is None and "c" not in lazy and "a" in lazy and len(lazy) == 2
    threads = [threading.Thread(target=lambda: lazy["a"]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"] and lazy.made() == ["a"]
    assert set(lazy.make_all()) == {"a", "b"} and calls == ["a", "b"]
    bad = LazyMasks({"a": (3, 3)}, make)
    with pytest.raises(ValueError, match="shape"):
        bad["a"]
