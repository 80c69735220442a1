"""explorer.compare: the maths of two runs' masks compared (pure tensors, no app), and the
figures drawn from it."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from core.maskset import MaskSet
from explorer import compare, figures


def _pair(shape=(40, 30), seed=0, keep=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < keep, torch.rand(shape, generator=g) < keep


def test_agreement_counts_sum_to_the_matrix_and_match_a_direct_count():
    a, b = _pair()
    c = compare.agreement_counts(a, b)
    assert c["kept_both"] + c["only_a"] + c["only_b"] + c["pruned_both"] == a.numel() == c["size"]
    assert c["kept_both"] == int((a & b).sum()) and c["only_a"] == int((a & ~b).sum())
    assert c["only_b"] == int((~a & b).sum()) and c["pruned_both"] == int((~a & ~b).sum())
    assert c["jaccard"] == pytest.approx(int((a & b).sum()) / int((a | b).sum()))
    assert c["agreement"] == pytest.approx(float((a == b).float().mean()))


def test_jaccard_of_a_mask_with_itself_is_one_and_with_its_complement_zero():
    a, _ = _pair()
    assert compare.jaccard(a, a) == 1.0
    assert compare.jaccard(a, ~a) == 0.0
    nothing = torch.zeros(4, 4, dtype=torch.bool)
    assert compare.jaccard(nothing, nothing) == 1.0  # both prune everything: identical
    assert compare.jaccard(nothing, torch.ones(4, 4, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError, match="different shapes"):
        compare.agreement_counts(a, a[:, :5])
    with pytest.raises(ValueError, match="inconsistent"):
        compare.counts_from(5, 3, 4, 10)


def test_agreement_codes_and_the_pooled_map():
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    assert compare.agreement_codes(a, b).tolist() == [[3, 2, 1, 0]]  # both, only A, only B, neither
    dominant, agree, tile = compare.pooled_agreement(a, b)
    assert tile == (1, 1) and dominant.tolist() == [[3, 2, 1, 0]] and agree.tolist() == [[100, 0, 0, 100]]
    # pooled: a 600 x 300 matrix in whole 3 x 2 tiles
    big_a = torch.zeros(600, 300, dtype=torch.bool)
    big_b = torch.zeros(600, 300, dtype=torch.bool)
    big_a[:300] = True  # top half: kept only by A; bottom half: pruned by both
    big_b[:300, :150] = True  # top-left quarter: kept by both
    dominant, agree, tile = compare.pooled_agreement(big_a, big_b)
    assert tile == (3, 2) and dominant.shape == (200, 150) and agree.dtype == np.uint8
    assert dominant[0, 0] == 3 and dominant[0, -1] == 2 and dominant[-1, 0] == 0
    assert agree[0, 0] == 100 and agree[0, -1] == 0 and agree[-1, -1] == 100
    mixed_a = torch.tensor([[1, 1, 1, 0]] * 2, dtype=torch.bool)
    mixed_b = torch.zeros(2, 4, dtype=torch.bool)
    dominant, agree, tile = compare.pooled_agreement(mixed_a, mixed_b, max_side=1)
    assert tile == (2, 4) and dominant.tolist() == [[2]] and agree.tolist() == [[25]]  # 3 of 4 only A


def test_overlaps_per_matrix_and_for_the_whole_model():
    a1, b1 = _pair((8, 16), 1)
    a2, b2 = _pair((16, 8), 2)
    masks_a = MaskSet(masks={"m1": a1, "m2": a2})
    masks_b = MaskSet(masks={"m1": b1}, dense_layers={"m2": (16, 8)})  # m2 left dense in B: all kept
    where = {"m1": (0, "q"), "m2": (1, "down")}
    rows = compare.overlaps(masks_a, masks_b, where)
    by = {r["name"]: r for r in rows}
    assert by["m1"]["jaccard"] == pytest.approx(compare.jaccard(a1, b1))
    assert by["m2"]["kept_both"] == int(a2.sum()) and by["m2"]["only_a"] == 0 and by["m2"]["block"] == 1
    whole = compare.whole_model(rows)
    both = int((a1 & b1).sum()) + int(a2.sum())
    union = int((a1 | b1).sum()) + a2.numel()
    assert whole["jaccard"] == pytest.approx(both / union) and whole["size"] == a1.numel() + a2.numel()
    assert compare.whole_model(compare.overlaps(masks_a, masks_a, where))["jaccard"] == 1.0
    with pytest.raises(ValueError, match="different matrices"):
        compare.overlaps(masks_a, MaskSet(masks={"m1": b1}), where)


def _z(trace) -> np.ndarray:
    z = trace["z"]
    dtype = {"u1": np.uint8, "f4": np.float32, "i4": np.int32}[z["dtype"]]
    shape = [int(s) for s in z["shape"].split(",")]
    return np.frombuffer(base64.b64decode(z["bdata"]), dtype=dtype).reshape(shape)


def test_comparison_figures_are_plain_plotly_json():
    a, b = _pair((600, 300), 3)
    dominant, agree, tile = compare.pooled_agreement(a, b)
    counts = compare.agreement_counts(a, b)
    fig = figures.agreement_figure(dominant, agree, (600, 300), tile, "m", "wanda", "owl", counts)
    assert "A = wanda, B = owl" in figures.title_of(fig) and "pooled 3x2 tiles" in figures.title_of(fig)
    assert _z(fig["data"][0]).shape == (200, 150) and fig["data"][0]["colorbar"]["ticktext"][2].startswith("kept only by A")
    rows = [{"block": b, "type": t, "jaccard": 0.1 * b + (0.05 if t == "up" else 0)} for b in range(3)
            for t in ("up", "q")]
    heat = figures.jaccard_figure(rows, 0.42, "wanda", "owl")
    assert heat["data"][0]["y"] == ["q", "up"] and heat["data"][0]["x"] == [0, 1, 2]  # matrix types in model order
    assert np.allclose(_z(heat["data"][0])[1], [0.05, 0.15, 0.25]) and "whole model 0.420" in figures.title_of(heat)
    json.loads(figures.to_plot(heat).plot)
    json.loads(figures.to_plot(fig).plot)


def test_overlay_has_one_trace_per_run_with_its_own_allocation():
    def rows(offset):
        return [{"block": b, "type": t, "params": 100, "pruned": 30 + offset + 10 * b, "name": f"{b}{t}"}
                for b in range(3) for t in ("q", "down")]

    series = [{"name": "wanda", "rows": rows(0)}, {"name": "owl", "rows": rows(5)}, {"name": "uni", "rows": rows(9)}]
    spec = figures.allocation_overlay_figure(series, 0.4)
    assert [t["name"] for t in spec["data"]] == ["wanda: total 40.0%", "owl: total 45.0%", "uni: total 49.0%"]
    assert spec["data"][1]["y"] == pytest.approx([0.35, 0.45, 0.55]) and spec["data"][1]["x"] == [0, 1, 2]
    assert len({t["line"]["color"] for t in spec["data"]}) == 3 and "target 40%" in json.dumps(spec["layout"])
    by_type = figures.allocation_overlay_figure(series, 0.4, mode="type")
    assert by_type["data"][0]["x"][:3] == ["0 q", "0 down", "1 q"] and by_type["data"][2]["y"][0] == pytest.approx(0.39)
    assert figures.title_of(figures.allocation_overlay_figure([], 0.4)) == ""  # an empty chart that says why
