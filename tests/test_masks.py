"""Masks: cutting (hand-checked), pattern / sparsity validation, apply-restore, and mask files."""
from __future__ import annotations

import json
import os

import pytest
import torch

from core.cutting import ascending_ranks, cut_from_ranks, cut_mask, cut_nm, cut_unstructured
from core.dense import DenseWeights
from core.errors import MaskFileError, PatternError
from core.mask_file import load_masks, save_masks
from core.maskset import MaskSet
from core.patterns import Pattern, check_nm_fits, check_sparsity, parse_pattern
from tiny import build_tiny

T, F = True, False


# ---------------------------------------------------------------- unstructured cuts, by hand

SCORES = torch.tensor([[4.0, 1.0, 3.0, 2.0],
                       [5.0, 8.0, 7.0, 6.0]])


@pytest.mark.parametrize("sparsity, expected", [
    (0.5, [[T, F, T, F], [F, T, T, F]]),    # 2 of 4 per row: row 0 drops 1, 2; row 1 drops 5, 6
    (0.3, [[T, F, T, T], [F, T, T, T]]),    # floor(1.2) = 1 per row
    (0.75, [[T, F, F, F], [F, T, F, F]]),   # 3 per row
    (0.2, [[T, T, T, T], [T, T, T, T]]),    # floor(0.8) = 0: nothing pruned
    (0.0, [[T, T, T, T], [T, T, T, T]]),
])
def test_row_scope_by_hand(sparsity, expected):
    assert torch.equal(cut_unstructured(SCORES, sparsity, "row"), torch.tensor(expected))


@pytest.mark.parametrize("sparsity, expected", [
    (0.5, [[F, F, F, F], [T, T, T, T]]),    # the 4 lowest of 8 are all in row 0
    (0.375, [[T, F, F, F], [T, T, T, T]]),  # 3 of 8: 1, 2, 3
    (0.7, [[F, F, F, F], [F, T, T, T]]),    # floor(5.6) = 5: 1..5 go
    (0.1, [[T, T, T, T], [T, T, T, T]]),    # floor(0.8) = 0
])
def test_matrix_scope_by_hand(sparsity, expected):
    assert torch.equal(cut_unstructured(SCORES, sparsity, "matrix"), torch.tensor(expected))


@pytest.mark.parametrize("sparsity, per_row", [(0.1, 1), (0.33, 3), (0.5, 5), (0.55, 5), (0.9, 9), (0.99, 9)])
def test_row_scope_counts_and_order(sparsity, per_row):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(7, 10, generator=g)
    keep = cut_unstructured(scores, sparsity, "row")
    assert ((~keep).sum(dim=1) == per_row).all()
    for r in range(7):  # every pruned score is below every kept one in its row
        if per_row and per_row < 10:
            assert scores[r][~keep[r]].max() < scores[r][keep[r]].min()


def test_ties_still_prune_exact_count():
    scores = torch.ones(3, 8)
    keep = cut_unstructured(scores, 0.5, "row")
    assert ((~keep).sum(dim=1) == 4).all()
    keep = cut_unstructured(torch.zeros(4, 5), 0.5, "matrix")
    assert int((~keep).sum()) == 10


@pytest.mark.parametrize("width", [2**15 - 1, 2**15, 40000])  # int16 / int32 rank boundary
def test_wide_rows_rank_exactly(width):
    scores = torch.randperm(width).float().unsqueeze(0)
    keep = cut_unstructured(scores, 0.5, "row")
    assert int((~keep).sum()) == width // 2
    assert torch.equal(keep[0], scores[0] >= width // 2)  # pruned exactly the values 0..width//2-1


@pytest.mark.parametrize("scope", ["row", "matrix"])
@pytest.mark.parametrize("sparsity", [0.0, 0.13, 0.5, 0.61, 0.9])
def test_cut_from_ranks_equals_cut_unstructured(scope, sparsity):
    scores = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    ranks = ascending_ranks(scores, scope)
    assert torch.equal(cut_from_ranks(ranks, sparsity, scope), cut_unstructured(scores, sparsity, scope))
    assert torch.equal(cut_mask(scores, sparsity, Pattern(), scope, ranks), cut_unstructured(scores, sparsity, scope))


def test_ranks_by_hand():
    assert torch.equal(ascending_ranks(SCORES, "row").long(), torch.tensor([[3, 0, 2, 1], [0, 3, 2, 1]]))
    assert torch.equal(ascending_ranks(SCORES, "matrix").long(), torch.tensor([[3, 0, 2, 1], [4, 7, 6, 5]]))


# ---------------------------------------------------------------- N:M

@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_cut_nm_every_group_valid(n, m):
    scores = torch.randn(32, 64, generator=torch.Generator().manual_seed(n * 10 + m))
    keep = cut_nm(scores, n, m)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    groups_keep = keep.view(32, 64 // m, m)
    groups_score = scores.view(32, 64 // m, m)
    assert (groups_keep.sum(dim=2) == n).all()
    for r in range(32):
        for g in range(64 // m):
            kept = groups_score[r, g][groups_keep[r, g]]
            dropped = groups_score[r, g][~groups_keep[r, g]]
            assert kept.min() > dropped.max()
    assert 1 - keep.float().mean().item() == pytest.approx(1 - n / m)


def test_cut_nm_by_hand():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2, 7.0, 6.0, 1.0, 0.0]])
    assert torch.equal(cut_nm(scores, 2, 4), torch.tensor([[F, T, T, F, T, T, F, F]]))
    assert torch.equal(cut_mask(scores, 0.9, Pattern(2, 4)), cut_nm(scores, 2, 4))  # N:M ignores sparsity


def test_cut_nm_refuses_misfit_width():
    with pytest.raises(PatternError, match="multiple of 4"):
        cut_nm(torch.randn(2, 6), 2, 4)


# ---------------------------------------------------------------- parsing and checking

def test_parse_pattern_accepts():
    assert parse_pattern("2:4") == Pattern(2, 4)
    assert parse_pattern(" 4:8 ") == Pattern(4, 8)
    assert parse_pattern("2:4").sparsity == 0.5
    assert str(parse_pattern("4:8")) == "4:8"
    for text in ("unstructured", "Unstructured", "", "none"):
        p = parse_pattern(text)
        assert not p.is_nm and p.sparsity is None and str(p) == "unstructured"


@pytest.mark.parametrize("text", ["3:2", "4:4", "0:4", "-1:4"])
def test_parse_pattern_rejects_bad_nm(text):
    with pytest.raises(PatternError, match="0 < N < M"):
        parse_pattern(text)


@pytest.mark.parametrize("text", ["abc", "2:4:8", "a:b", "2-4", "2:"])
def test_parse_pattern_rejects_garbage(text):
    with pytest.raises(PatternError, match="not understood.*2:4"):
        parse_pattern(text)


@pytest.mark.parametrize("value", [1.0, 1, -0.1, 1.5, float("inf"), float("nan"), "nan"])
def test_check_sparsity_out_of_range(value):
    with pytest.raises(PatternError, match=r"in \[0, 1\)"):
        check_sparsity(value)


@pytest.mark.parametrize("value", ["abc", None, "", [0.5]])
def test_check_sparsity_not_a_number(value):
    with pytest.raises(PatternError, match="must be a number"):
        check_sparsity(value)


def test_check_sparsity_accepts():
    assert check_sparsity(0) == 0.0
    assert check_sparsity("0.25") == 0.25
    assert check_sparsity(0.999) == 0.999


def test_check_nm_fits_names_misfits_and_skips():
    shapes = {"a": (8, 16), "b": (8, 18), "c": (8, 6), "d": (4, 8)}
    with pytest.raises(PatternError) as info:
        check_nm_fits(shapes, Pattern(2, 4))
    msg = str(info.value)
    assert "b (width 18)" in msg and "c (width 6)" in msg
    assert "a (" not in msg and "d (" not in msg
    assert "skip" in msg
    assert info.value.bad_layers == ["b", "c"]
    assert check_nm_fits(shapes, Pattern(2, 4), skip_misfits=True) == ["b", "c"]
    assert check_nm_fits(shapes, Pattern(4, 8), skip_misfits=True) == ["b", "c"]
    assert check_nm_fits({"a": (8, 16)}, Pattern(2, 4)) == []
    assert check_nm_fits(shapes, Pattern()) == []  # unstructured fits everything


def test_check_nm_fits_truncates_long_lists():
    shapes = {f"layer{i}": (4, 6) for i in range(8)}
    with pytest.raises(PatternError, match="and 3 more") as info:
        check_nm_fits(shapes, Pattern(2, 4))
    assert len(info.value.bad_layers) == 8


# ---------------------------------------------------------------- apply / restore

def _random_masks(dense: DenseWeights, seed: int = 0, p: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=g) > p for n, w in ((n, dense.weight(n)) for n in dense.modules)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: transposed Conv1D weights
def test_dense_weights_apply_restore_bit_exact(family):
    lm = build_tiny(family)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    dense = DenseWeights(lm)
    masks = _random_masks(dense)
    one = next(iter(masks))
    updated = {one: torch.randn(dense.shapes()[one])}
    dense.apply(MaskSet(masks, weights=updated))
    for name, module in dense.modules.items():
        view = lm.family.weight_view(module)
        source = updated.get(name, dense.weight(name))
        assert torch.equal(view, source * masks[name])
        assert bool((view[~masks[name]] == 0).all())
    # applying a set that covers one layer puts every other layer back to dense
    dense.apply(MaskSet({one: masks[one]}))
    for name, module in dense.modules.items():
        expected = dense.weight(name) * masks[name] if name == one else dense.weight(name)
        assert torch.equal(lm.family.weight_view(module), expected)
    dense.restore()
    after = lm.model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# ---------------------------------------------------------------- files

@pytest.fixture
def llama():
    return build_tiny("llama")


@pytest.fixture
def saved(llama, tmp_path):
    dense = DenseWeights(llama)
    masks = _random_masks(dense, seed=3, p=0.3)
    one = next(iter(masks))
    ms = MaskSet(masks, weights={one: torch.randn(dense.shapes()[one])},
                 meta={"method": "wanda", "params": {"alpha": 0.5}})
    path = save_masks(tmp_path / "sub" / "masks.safetensors", ms, llama)
    return path, ms


def test_save_load_round_trip(llama, saved):
    path, ms = saved
    assert path.is_file()
    loaded = load_masks(path, llama)
    assert set(loaded.masks) == set(ms.masks)
    for name, mask in ms.masks.items():
        assert loaded.masks[name].dtype == torch.bool
        assert torch.equal(loaded.masks[name], mask)
    assert set(loaded.weights) == set(ms.weights)
    for name, w in ms.weights.items():
        assert torch.equal(loaded.weights[name], w)
    assert loaded.meta["method"] == "wanda"
    assert json.loads(loaded.meta["params"]) == {"alpha": 0.5}
    assert loaded.meta["model_fingerprint"] == llama.fingerprint
    assert loaded.meta["model_id"] == "tiny-llama"
    assert float(loaded.meta["achieved_sparsity"]) == pytest.approx(ms.total_sparsity(), abs=1e-6)
    assert loaded.total_sparsity() == ms.total_sparsity()
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind


def test_resaving_loaded_masks_records_the_current_model(llama, saved, tmp_path):
    """Re-saving a mask set that came from a file must record the model it is saved for and
    the sparsity of the masks it holds, not the values read from the old file."""
    path, ms = saved
    other = build_tiny("llama", seed=1)
    loaded = load_masks(path, other, allow_other_model=True)
    name = next(iter(loaded.masks))
    # loaded masks are a read-only PackedMasks: replace the mapping to prune one matrix entirely
    loaded.masks = {**loaded.masks, name: torch.zeros_like(loaded.masks[name])}
    new_path = save_masks(tmp_path / "again.safetensors", loaded, other)
    again = load_masks(new_path, other)  # would refuse if the old fingerprint were written
    assert again.meta["model_fingerprint"] == other.fingerprint
    assert float(again.meta["achieved_sparsity"]) == pytest.approx(loaded.total_sparsity(), abs=1e-6)
    assert float(again.meta["achieved_sparsity"]) != pytest.approx(ms.total_sparsity(), abs=1e-6)


def test_load_refuses_other_model(saved):
    path, _ = saved
    other = build_tiny("llama", seed=1)  # same shapes, other weights
    with pytest.raises(MaskFileError, match="was made for model 'tiny-llama'.*Load the model it was made for"):
        load_masks(path, other)
    assert load_masks(path, other, allow_other_model=True).masks  # the escape hatch works


def test_load_refuses_truncated(llama, saved, tmp_path):
    path, _ = saved
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskFileError, match="not a readable safetensors mask file.*truncated or corrupt"):
        load_masks(bad, llama)


@pytest.mark.parametrize("content", [os.urandom(4096), b"this is a plain text file\n" * 20, b"", b"\x08"])
def test_load_refuses_non_safetensors(llama, tmp_path, content):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(content)
    with pytest.raises(MaskFileError, match="not a readable safetensors mask file"):
        load_masks(bad, llama)


def test_load_refuses_missing_file(llama, tmp_path):
    with pytest.raises(MaskFileError, match="No mask file at"):
        load_masks(tmp_path / "nothing.safetensors", llama)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_load_refuses_foreign_safetensors(llama, tmp_path, metadata):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 64)}, str(path), metadata=metadata)
    with pytest.raises(MaskFileError, match="safetensors file but not a mask file"):
        load_masks(path, llama)


def test_load_refuses_wrong_shape(llama, tmp_path):
    name = "model.layers.0.mlp.up_proj"
    path = save_masks(tmp_path / "m.safetensors", MaskSet({name: torch.ones(3, 3, dtype=torch.bool)}), llama)
    # the file holds the mask packed (format version 2): (3, 3) packs to (3, 1), (128, 64) to (128, 8)
    with pytest.raises(MaskFileError, match=r"up_proj has a packed mask of shape \(3, 1\) but the model's "
                                            r"\(128, 64\) matrix packs to \(128, 8\)"):
        load_masks(path, llama)


def test_load_refuses_unknown_layer(llama, tmp_path):
    path = save_masks(tmp_path / "m.safetensors", MaskSet({"model.layers.9.mlp.up_proj": torch.ones(128, 64).bool()}),
                      llama)
    with pytest.raises(MaskFileError, match="model.layers.9.mlp.up_proj.*does not have"):
        load_masks(path, llama)


def test_load_refuses_other_format_version(llama, tmp_path):
    dense = DenseWeights(llama)
    path = tmp_path / "m.safetensors"
    from safetensors.torch import save_file

    save_file({f"mask/{n}": torch.ones(w.shape, dtype=torch.uint8) for n, w in ((n, dense.weight(n)) for n in dense.modules)}, str(path),
              metadata={"format": "pruning-explorer-masks", "format_version": "99",
                        "model_fingerprint": llama.fingerprint})
    with pytest.raises(MaskFileError, match="format version 99"):
        load_masks(path, llama)


def test_save_is_atomic(llama, saved, monkeypatch):
    path, ms = saved
    original = path.read_bytes()
    import core.mask_file

    def half_then_fail(filename, entries, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(core.mask_file, "write_safetensors", half_then_fail)
    other = MaskSet({n: torch.zeros_like(m) for n, m in ms.masks.items()})
    with pytest.raises(OSError, match="disk full"):
        save_masks(path, other, llama)
    assert path.read_bytes() == original
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # the temp file is gone
    monkeypatch.undo()
    assert torch.equal(load_masks(path, llama).masks[next(iter(ms.masks))], next(iter(ms.masks.values())))


def test_known_pruned_counts_match_the_masks():
    """cut() fills MaskSet.pruned without counting; it must equal a real count."""
    from core.pruning import calibrate, cut
    from tiny import build_tiny

    lm = build_tiny("llama")
    windows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    for method in ("wanda", "magnitude"):
        artifact = calibrate(lm, method, windows)
        for sparsity, pattern in ((0.37, Pattern()), (0.0, Pattern(2, 4))):
            masks = cut(artifact, sparsity, pattern)
            assert masks.pruned is not None
            assert masks.pruned == {n: m.numel() - int(m.count_nonzero()) for n, m in masks.masks.items()}
