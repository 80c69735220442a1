"""Saliency scores and OWL allocation, against numbers worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from core.saliency import magnitude, outlier_ratio, owl_sparsities, ria, wanda


def test_magnitude_by_hand():
    w = torch.tensor([[1.0, -2.0], [0.0, -0.5]])
    assert torch.equal(magnitude(w), torch.tensor([[1.0, 2.0], [0.0, 0.5]]))
    assert magnitude(w.half()).dtype == torch.float32


def test_wanda_2x2_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    mean_x2 = torch.tensor([4.0, 9.0])  # ||X_j|| up to a constant: 2, 3
    # |W_ij| * sqrt(mean x_j^2): [[1*2, 2*3], [3*2, 4*3]]
    assert torch.allclose(wanda(w, mean_x2), torch.tensor([[2.0, 6.0], [6.0, 12.0]]))


def test_wanda_2x3_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    mean_x2 = torch.tensor([1.0, 4.0, 16.0])  # norms 1, 2, 4
    expected = torch.tensor([[1.0, 4.0, 12.0], [4.0, 10.0, 24.0]])
    assert torch.allclose(wanda(w, mean_x2), expected)
    # the activation term can reorder a row: |W| ranks column 0 last in row 0, but a large
    # enough input norm on column 0 puts it first
    assert magnitude(w)[0].argmin().item() == 0
    assert wanda(w, torch.tensor([10000.0, 1.0, 1.0]))[0].argmax().item() == 0


def test_ria_2x2_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    mean_x2 = torch.tensor([4.0, 9.0])
    # |W| = [[1, 2], [3, 4]]; column sums (4, 6), row sums (3, 7)
    # relative = |W|/colsum + |W|/rowsum
    #   [[1/4 + 1/3, 2/6 + 2/3], [3/4 + 3/7, 4/6 + 4/7]] = [[7/12, 1], [33/28, 26/21]]
    relative = torch.tensor([[7 / 12, 1.0], [33 / 28, 26 / 21]])
    # alpha = 1: times the norms (2, 3)
    assert torch.allclose(ria(w, mean_x2, alpha=1.0), relative * torch.tensor([2.0, 3.0]))
    assert torch.allclose(ria(w, mean_x2, alpha=1.0), torch.tensor([[7 / 6, 3.0], [33 / 14, 26 / 7]]))
    # alpha = 0: the activations drop out
    assert torch.allclose(ria(w, mean_x2, alpha=0.0), relative)
    # alpha = 0.5 (the default): times sqrt of the norms
    assert torch.allclose(ria(w, mean_x2), relative * torch.tensor([math.sqrt(2), math.sqrt(3)]))


def test_ria_2x3_by_hand():
    w = torch.tensor([[2.0, 0.0, 2.0], [2.0, 4.0, 6.0]])
    mean_x2 = torch.ones(3)
    # column sums (4, 4, 8), row sums (4, 12)
    expected = torch.tensor([[2 / 4 + 2 / 4, 0.0, 2 / 8 + 2 / 4],
                             [2 / 4 + 2 / 12, 4 / 4 + 4 / 12, 6 / 8 + 6 / 12]])
    assert torch.allclose(ria(w, mean_x2, alpha=0.5), expected)


def test_ria_zero_column_is_finite():
    w = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    out = ria(w, torch.ones(2))
    assert torch.isfinite(out).all() and out[0, 0] == 0 and out[1, 0] == 0


def test_outlier_ratio_by_hand():
    scores = [torch.tensor([1.0] * 9 + [10.0])]  # mean 1.9
    assert outlier_ratio(scores, 5.0) == pytest.approx(0.1)  # > 9.5: only the 10
    assert outlier_ratio(scores, 0.5) == pytest.approx(1.0)  # > 0.95: all
    two = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [14.0]])]  # pooled mean 5
    assert outlier_ratio(two, 2.0) == pytest.approx(0.25)  # > 10: 14
    assert outlier_ratio(two, 0.5) == pytest.approx(0.5)  # > 2.5: 3, 14
    assert outlier_ratio(two, 3.0) == pytest.approx(0.0)  # > 15: none


def test_owl_sparsities_by_hand():
    # ratios spread to keep-offsets (0, 0.08, 0.16), centred on 1 - 0.5
    out = owl_sparsities([0.1, 0.2, 0.3], 0.5, 0.08)
    assert out == pytest.approx([0.58, 0.5, 0.42])
    # four blocks, one outlier-rich: keep offsets (0, 0, 0, 0.2), mean 0.05
    out = owl_sparsities([0.0, 0.0, 0.0, 1.0], 0.6, 0.1)
    assert out == pytest.approx([0.65, 0.65, 0.65, 0.45])


@pytest.mark.parametrize("target, lam", [(0.5, 0.08), (0.7, 0.05), (0.3, 0.2)])
def test_owl_sparsities_properties(target, lam):
    g = torch.Generator().manual_seed(0)
    ratios = (torch.rand(12, generator=g) * 0.05).tolist()
    out = owl_sparsities(ratios, target, lam)
    assert sum(out) / len(out) == pytest.approx(target, abs=1e-9)
    assert max(out) - min(out) == pytest.approx(2 * lam, abs=1e-9)
    # more outliers -> lower sparsity, strictly ordered opposite to the ratios
    order_ratio = sorted(range(12), key=lambda i: ratios[i])
    order_sparsity = sorted(range(12), key=lambda i: -out[i])
    assert order_ratio == order_sparsity
    i_max, i_min = ratios.index(max(ratios)), ratios.index(min(ratios))
    assert out[i_max] == pytest.approx(target - lam * 2 * (max(ratios) - sum(ratios) / 12) / (max(ratios) - min(ratios)))
    assert out[i_min] > out[i_max]


def test_owl_sparsities_equal_ratios_uniform():
    assert owl_sparsities([0.02, 0.02, 0.02], 0.6, 0.08) == [0.6, 0.6, 0.6]
    assert owl_sparsities([0.3], 0.5, 0.1) == [0.5]
    assert owl_sparsities([0.1, 0.3], 0.5, 0.0) == pytest.approx([0.5, 0.5])  # lam 0: uniform


def test_owl_sparsities_stay_in_range():
    out = owl_sparsities([0.0, 1.0], 0.95, 0.1)  # would go to 1.05 and 0.85
    assert all(0.0 <= s < 1.0 for s in out)
    assert out[1] == pytest.approx(0.85)
