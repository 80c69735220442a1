"""Two runs' masks compared: pure tensor maths (no gradio, no model), unit-tested on their own.

A mask is a bool tensor, True = weight kept. For two masks A and B of one matrix:

- the agreement counts: kept by both, kept only by A, kept only by B, pruned by both (they sum
  to the matrix size);
- the Jaccard overlap of the kept weights, |A and B| / |A or B| (1: the same weights kept; 0:
  no weight kept by both). Two masks that keep nothing are identical: 1;
- the agreement map: each weight's case as a code (CLASSES), pooled in whole tiles like the
  explorer's heatmaps (figures.tile_sides): per tile the most common case and the percentage
  of weights on which A and B agree.

Counts come from one AND per matrix: the kept counts are known (MaskSet.pruned_counts), so
|A or B| = |A| + |B| - |A and B|.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .figures import MAX_SIDE, tile_sides

# The agreement map's codes: 2 * kept_by_A + kept_by_B
CLASSES = ("pruned_both", "only_b", "only_a", "kept_both")


def jaccard_from_counts(both: int, kept_a: int, kept_b: int) -> float:
    """|A and B| / |A or B| from the counts; 1.0 when neither keeps anything (identical masks)."""
    union = kept_a + kept_b - both
    return 1.0 if union == 0 else both / union


def counts_from(both: int, kept_a: int, kept_b: int, size: int) -> dict:
    """The four agreement counts (and the Jaccard) of one matrix, from what the masks keep."""
    if not (0 <= both <= min(kept_a, kept_b) and max(kept_a, kept_b) <= size):
        raise ValueError(f"inconsistent counts: both {both}, A {kept_a}, B {kept_b}, size {size}")
    out = {"kept_both": both, "only_a": kept_a - both, "only_b": kept_b - both,
           "pruned_both": size - kept_a - kept_b + both, "size": size}
    out["jaccard"] = jaccard_from_counts(both, kept_a, kept_b)
    out["agreement"] = (out["kept_both"] + out["pruned_both"]) / max(size, 1)
    return out


def agreement_counts(a: torch.Tensor, b: torch.Tensor) -> dict:
    """The four agreement counts, the Jaccard and the agreeing fraction of two masks of one matrix."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.bool(), b.bool()
    both = int(torch.count_nonzero(a & b))
    return counts_from(both, int(torch.count_nonzero(a)), int(torch.count_nonzero(b)), a.numel())


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return agreement_counts(a, b)["jaccard"]


def agreement_codes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Each weight's case as a uint8 code: 0 pruned by both, 1 only B keeps, 2 only A, 3 both."""
    return a.bool().to(torch.uint8) * 2 + b.bool().to(torch.uint8)


def pooled_agreement(a: torch.Tensor, b: torch.Tensor, max_side: int = MAX_SIDE
                     ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(most common case per tile (codes), percent of each tile's weights on which A and B agree
    (uint8), (rows, cols) per tile) for the agreement map: whole tiles as figures.downsample."""
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    h, w = a.shape
    kh, kw = tile_sides(h, w, max_side)
    codes = agreement_codes(a, b)
    if kh == kw == 1:
        agree = ((codes == 0) | (codes == 3)).to(torch.uint8) * 100
        return codes.numpy(), agree.numpy(), (1, 1)
    onehot = torch.stack([(codes == c).float() for c in range(len(CLASSES))])[None]  # 1 x 4 x h x w
    # mean over each tile's real weights (a last, partial tile: only what it covers)
    fractions = F.avg_pool2d(onehot, (kh, kw), (kh, kw), ceil_mode=True, count_include_pad=False)[0]
    dominant = fractions.argmax(0).to(torch.uint8)
    agree = torch.round((fractions[0] + fractions[3]) * 100).to(torch.uint8)
    return dominant.numpy(), agree.numpy(), (kh, kw)


def _kept(mask_set, name: str, shape) -> int:
    size = math.prod(shape)
    if name not in mask_set.masks:  # left dense (an N:M misfit): every weight kept
        return size
    return size - mask_set.pruned_counts()[name]


def _mask(mask_set, name: str, shape) -> torch.Tensor:
    if name in mask_set.masks:
        return mask_set.masks[name]
    return torch.ones(shape, dtype=torch.bool)


def matrix_shapes(mask_set) -> dict[str, tuple[int, int]]:
    """Every matrix a mask set covers: masked ones and those left dense on purpose."""
    shapes = dict(mask_set.shapes())
    shapes.update({n: tuple(s) for n, s in mask_set.dense_layers.items() if n not in shapes})
    return shapes


def overlaps(masks_a, masks_b, block_and_type: Mapping[str, tuple[int, str]]) -> list[dict]:
    """Per matrix of two core.maskset.MaskSet (same model): block, type and the agreement counts.

    block_and_type: matrix name -> (block, matrix type). Matrices one set leaves dense count as
    all kept there."""
    shapes_a, shapes_b = matrix_shapes(masks_a), matrix_shapes(masks_b)
    if set(shapes_a) != set(shapes_b) or any(shapes_a[n] != shapes_b[n] for n in shapes_a):
        raise ValueError("the two runs' masks cover different matrices: they were made for different models")
    rows = []
    for name, shape in shapes_a.items():
        ka, kb = _kept(masks_a, name, shape), _kept(masks_b, name, shape)
        size = math.prod(shape)
        if ka == size or kb == size:  # one keeps everything: the overlap is the other's kept count
            both = min(ka, kb)
        elif ka == 0 or kb == 0:
            both = 0
        else:
            both = int(torch.count_nonzero(_mask(masks_a, name, shape) & _mask(masks_b, name, shape)))
        block, kind = block_and_type[name]
        rows.append({"name": name, "block": block, "type": kind, **counts_from(both, ka, kb, size)})
    return rows


def whole_model(rows: list[dict]) -> dict:
    """The four counts over every matrix, the whole model's Jaccard and agreeing fraction."""
    total = {k: sum(r[k] for r in rows) for k in ("kept_both", "only_a", "only_b", "pruned_both", "size")}
    kept_a = total["kept_both"] + total["only_a"]
    kept_b = total["kept_both"] + total["only_b"]
    return counts_from(total["kept_both"], kept_a, kept_b, total["size"])
