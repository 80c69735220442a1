"""MaskSet: one model's masks (plain, lazy or packed), new weights and biases, metadata, and
what it reports: pruned counts, sparsity per matrix and in total, the allocation table, the
note on matrices left dense.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .cutting import LazyMasks
from .loaded_model import LoadedModel
from .packing import PackedMasks
from .patterns import recorded_nm_pattern


def mask_shapes(masks: Mapping) -> dict[str, tuple[int, int]]:
    """Every mask's shape, without making lazy masks or unpacking packed ones."""
    if isinstance(masks, (LazyMasks, PackedMasks)):
        return masks.shapes()
    return {name: tuple(mask.shape) for name, mask in masks.items()}


def count_pruned(masks: Mapping) -> dict[str, int]:
    """Pruned entries per mask; packed masks are counted without unpacking."""
    if isinstance(masks, PackedMasks):
        return {name: math.prod(shape) - masks.kept_count(name) for name, shape in masks.shapes().items()}
    # count_nonzero, not (~mask).sum(): no temporary tensor, ~30x faster on big masks
    return {name: mask.numel() - int(mask.count_nonzero()) for name, mask in masks.items()}


@dataclass
class MaskSet:
    """Masks for one model, optional updated weights (methods that update weights), metadata."""

    masks: Mapping[str, torch.Tensor]  # a dict, LazyMasks (made on first read) or PackedMasks
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    pruned: dict[str, int] | None = None  # pruned weights per matrix; counted once, on demand
    # output biases to set (structured bias compensation, FLAP); a module without a bias gets one
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    # prunable matrices deliberately left dense (N:M misfits skipped): no mask, 0 pruned, but
    # counted in the whole-model sparsity, the allocation and the saved file's metadata
    dense_layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self):
        # the masks `pruned` counts: counts given with other masks (the mapping replaced since) are stale
        self._counted = self.masks if self.pruned is not None else None

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each mask's shape (no lazy mask is made)."""
        return mask_shapes(self.masks)

    @property
    def skipped_layers(self) -> list[str]:
        """Names of the matrices left dense on purpose (see dense_layers)."""
        return list(self.dense_layers)

    def pruned_counts(self) -> dict[str, int]:
        """Pruned weights per matrix. Counted once per mask set (a pass over ~100M mask entries
        costs tens of ms, and the explorer needs the counts three times per slider move); a cut
        knows them without counting, and then no lazy mask is made for them; packed masks are
        counted on their bits, none unpacked."""
        if self.pruned is None or self._counted is not self.masks or set(self.pruned) != set(self.masks):
            self.pruned = count_pruned(self.masks)
            self._counted = self.masks
        return self.pruned

    def sparsity_per_matrix(self) -> dict[str, float]:
        """Every matrix's pruned fraction, the layers left dense (0.0) included."""
        counts = self.pruned_counts()
        out = {name: counts[name] / math.prod(shape) for name, shape in self.shapes().items()}
        out.update({name: 0.0 for name in self.dense_layers if name not in out})
        return out

    def total_sparsity(self) -> float:
        """Pruned fraction of every matrix the set covers: masked ones and those left dense."""
        pruned = sum(self.pruned_counts().values())
        shapes = self.shapes()
        total = sum(math.prod(shape) for shape in shapes.values())
        total += sum(math.prod(shape) for name, shape in self.dense_layers.items() if name not in shapes)
        return pruned / max(total, 1)


def allocation_table(masks: "dict[str, torch.Tensor] | MaskSet", lm: LoadedModel) -> list[dict]:
    """One row per matrix: block, matrix type, size, achieved sparsity."""
    if isinstance(masks, MaskSet):
        counts, shapes = masks.pruned_counts(), masks.shapes()  # no lazy mask is made
    else:
        counts, shapes = count_pruned(masks), mask_shapes(masks)
    rows = []
    prefix = lm.family.blocks_path + "."
    dense_left = masks.dense_layers if isinstance(masks, MaskSet) else {}
    for name, shape in shapes.items():
        block_text, rel = name[len(prefix):].split(".", 1)
        pruned, params = counts[name], math.prod(shape)
        rows.append({"name": name, "block": int(block_text), "type": lm.family.matrix_type(rel),
                     "params": params, "pruned": pruned, "sparsity": pruned / params, "skipped": False})
    for name, shape in dense_left.items():  # left dense on purpose: 0 pruned, still the model's weights
        if name in shapes:
            continue
        block_text, rel = name[len(prefix):].split(".", 1)
        rows.append({"name": name, "block": int(block_text), "type": lm.family.matrix_type(rel),
                     "params": math.prod(shape), "pruned": 0, "sparsity": 0.0, "skipped": True})
    return rows



def dense_note(mask_set: MaskSet) -> str | None:
    """One line naming the matrices a mask set leaves dense on purpose, or None."""
    names = mask_set.skipped_layers
    if not names:
        return None
    total = len(names) + len(mask_set.shapes())
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    pattern = recorded_nm_pattern(mask_set.meta)
    why = f"{pattern} does not fit their width" if pattern is not None else "as recorded; no N:M pattern is recorded"
    return (f"{len(names)} of {total} matrices left dense ({why}): {shown}; "
            f"whole-model sparsity {mask_set.total_sparsity():.1%}.")
