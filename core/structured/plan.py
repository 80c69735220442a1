"""A structured pruning decision and its conversion to ordinary masks.

Methods produce a `StructuredPlan`: which attention units and MLP channels each block keeps,
optionally refitted output-projection weights (reconstruction) and compensation biases (FLAP).
`to_maskset` turns it into a MaskSet, so applying, restoring, evaluating, saving masks and the
explorer's allocation view all work as for unstructured masks; `core.structured.slicing` turns
the same plan into a physically smaller model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..maskset import MaskSet
from ..loaded_model import LoadedModel
from .units import BlockUnits, all_block_units, block_masks


@dataclass
class StructuredPlan:
    keep_attn: list[torch.Tensor]  # per block: bool (attn_units,)
    keep_channels: list[torch.Tensor]  # per block: bool (channels,)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> canonical weight
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> output bias
    meta: dict = field(default_factory=dict)

    @classmethod
    def dense(cls, units: list[BlockUnits]) -> "StructuredPlan":
        return cls([torch.ones(u.attn_units, dtype=torch.bool) for u in units],
                   [torch.ones(u.channels, dtype=torch.bool) for u in units])

    def removed_params(self, units: list[BlockUnits]) -> int:
        return sum(u.removed(a, c) for u, a, c in zip(units, self.keep_attn, self.keep_channels))

    def structured_sparsity(self, units: list[BlockUnits]) -> float:
        """Fraction of the decoder's attention + MLP parameters removed."""
        return self.removed_params(units) / max(sum(u.params for u in units), 1)

    def allocation(self, units: list[BlockUnits]) -> list[dict]:
        """Per block: units kept and the block's removed-parameter fraction."""
        rows = []
        for u, a, c in zip(units, self.keep_attn, self.keep_channels):
            removed = u.removed(a, c)
            rows.append({"block": u.index, "attn_units_kept": int(a.sum()), "attn_units": u.attn_units,
                         "heads_kept": int(a.sum()) * u.q_heads_per_unit, "heads": u.attn_units * u.q_heads_per_unit,
                         "channels_kept": int(c.sum()), "channels": u.channels,
                         "sparsity": removed / max(u.params, 1)})
        return rows

    def to_maskset(self, lm: LoadedModel, units: list[BlockUnits] | None = None) -> MaskSet:
        units = units or all_block_units(lm)
        masks = {}
        for u, a, c in zip(units, self.keep_attn, self.keep_channels):
            masks.update(block_masks(lm, u, a, c))
        meta = {**self.meta, "pattern": "structured",
                "structured_sparsity": f"{self.structured_sparsity(units):.6f}",
                "structure": {"attn_units_kept": [int(a.sum()) for a in self.keep_attn],
                              "channels_kept": [int(c.sum()) for c in self.keep_channels]}}
        weights = {n: w * masks[n] for n, w in self.weights.items()}
        return MaskSet(masks=masks, weights=weights, meta=meta, biases=dict(self.biases))


def plan_from_maskset(lm: LoadedModel, mask_set: MaskSet, units: list[BlockUnits] | None = None) -> StructuredPlan:
    """Read the kept units back from structured masks (o/down input columns decide)."""
    units = units or all_block_units(lm)
    family = lm.family
    keep_attn, keep_channels = [], []
    for u in units:
        prefix = family.block_prefix(u.index)
        o_cols = mask_set.masks[f"{prefix}.{family.attention.out}"].any(0)
        keep_attn.append(o_cols.reshape(u.attn_units, -1).any(1))
        keep_channels.append(mask_set.masks[f"{prefix}.{family.mlp.out}"].any(0))
    return StructuredPlan(keep_attn, keep_channels, dict(mask_set.weights), dict(mask_set.biases), dict(mask_set.meta))
