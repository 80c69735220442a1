"""What a run is counted to hold (the app's memory check for a new run adds it up): packed masks
one bit a weight, a lazy mapping only the masks it made, plain tensors their bytes."""
from __future__ import annotations

import torch

from core.cutting import LazyMasks
from core.packing import PackedMasks
from explorer.tabs.calibrate import masks_nbytes


def test_a_million_packed_weights_count_as_125_000_bytes():
    masks = PackedMasks({"a": torch.rand(1000, 1000) > 0.5})
    assert masks_nbytes(masks) == 125_000


def test_a_lazy_mapping_counts_only_what_it_made_and_plain_masks_their_bytes():
    shapes = {"a": (100, 64), "b": (200, 64)}
    lazy = LazyMasks(shapes, lambda name: torch.ones(shapes[name], dtype=torch.bool))
    assert masks_nbytes(lazy) == 0
    lazy["b"]
    assert masks_nbytes(lazy) == 200 * 64
    assert masks_nbytes({"a": torch.ones(10, 8)}) == 10 * 8 * 4
