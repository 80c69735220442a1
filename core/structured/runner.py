"""Block-by-block structured pruning on the calibration engine.

`run_blockwise` walks the blocks with `run_layerwise`; for each block a `decide` function gets
the statistics of the block's output projections (inputs of o_proj and down_proj) and returns
which units to keep and any refitted weights. The block is pruned in place before the next
block's inputs are computed, so later blocks see pruned earlier ones (as Wanda and SparseGPT
do). `collect_dense` is the one-shot variant: statistics of every block on the dense model,
nothing changed (FLAP's global threshold and StructPrune's energies need all layers first).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..calibrate import BlockContext, run_layerwise
from ..layer_stats import LayerStats
from ..loaded_model import LoadedModel
from .plan import StructuredPlan
from .units import BlockUnits, all_block_units, block_masks


@dataclass
class BlockDecision:
    keep_attn: torch.Tensor  # bool (attn_units,)
    keep_channels: torch.Tensor  # bool (channels,)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # relative name -> canonical weight


@dataclass
class OutputStats:
    """Statistics of one block's output projections' inputs, with their dense weights."""

    units: BlockUnits
    o_weight: torch.Tensor
    o_stats: LayerStats
    down_weight: torch.Tensor
    down_stats: LayerStats
    # sum over calibration tokens of ||h||^2, h = the block's input (the residual stream): the
    # scale against which an output projection's error perturbs what later blocks read.
    # Measured by collect_dense only (StructPrune's energies); None elsewhere
    input_energy: float | None = None

    @property
    def cols_per_attn_unit(self) -> int:
        return self.units.q_heads_per_unit * self.units.head_dim


def solve_block(lm: LoadedModel, out: "OutputStats", n_attn: int, n_ch: int, select, **kwargs) -> BlockDecision:
    """Remove n_attn attention units and n_ch channels with a reconstruction solver
    `select(weight, H, n_keep, cols_per_unit, **kwargs) -> (keep, refitted weight)` on each
    output projection (SPAP's penalty method, StructPrune's ADMM); untouched sublayers stay whole."""
    u, family = out.units, lm.family
    weights = {}
    keep_attn = torch.ones(u.attn_units, dtype=torch.bool)
    keep_ch = torch.ones(u.channels, dtype=torch.bool)
    if n_attn:
        keep_attn, weights[family.attention.out] = select(out.o_weight, out.o_stats.xtx, u.attn_units - n_attn,
                                                          out.cols_per_attn_unit, **kwargs)
    if n_ch:
        keep_ch, weights[family.mlp.out] = select(out.down_weight, out.down_stats.xtx, u.channels - n_ch, 1, **kwargs)
    return BlockDecision(keep_attn, keep_ch, weights)


def _output_stats(lm: LoadedModel, ctx: BlockContext, units: BlockUnits) -> OutputStats:
    family = lm.family
    prefix = family.block_prefix(ctx.index)
    o_name, down_name = f"{prefix}.{family.attention.out}", f"{prefix}.{family.mlp.out}"
    return OutputStats(units, family.weight_view(ctx.linears[o_name]), ctx.stats[o_name],
                       family.weight_view(ctx.linears[down_name]), ctx.stats[down_name])


def run_blockwise(lm: LoadedModel, windows: torch.Tensor, stats: frozenset,
                  decide: Callable[[OutputStats], BlockDecision], progress=None, should_stop=None,
                  batch_size: int = 8) -> StructuredPlan:
    units = all_block_units(lm)
    plan = StructuredPlan.dense(units)
    family = lm.family

    @torch.no_grad()
    def on_block(ctx: BlockContext) -> bool:
        out = _output_stats(lm, ctx, units[ctx.index])
        decision = decide(out)
        plan.keep_attn[ctx.index] = decision.keep_attn
        plan.keep_channels[ctx.index] = decision.keep_channels
        prefix = family.block_prefix(ctx.index)
        for rel, weight in decision.weights.items():
            plan.weights[f"{prefix}.{rel}"] = weight
        for name, mask in block_masks(lm, units[ctx.index], decision.keep_attn, decision.keep_channels).items():
            view = family.weight_view(ctx.linears[name])
            source = plan.weights.get(name)
            if source is not None:
                view.copy_(source)
            view.mul_(mask)
        return True

    run_layerwise(lm, windows, stats, on_block, batch_size, progress, should_stop)
    return plan


def collect_dense(lm: LoadedModel, windows: torch.Tensor, stats: frozenset, progress=None, should_stop=None,
                  batch_size: int = 8, keep: Callable[[OutputStats], object] | None = None) -> list:
    """Per block, `keep(OutputStats)` (default: the OutputStats itself) over the dense model."""
    units = all_block_units(lm)
    kept = []

    def on_block(ctx: BlockContext) -> bool:
        out = _output_stats(lm, ctx, units[ctx.index])
        out.o_weight, out.down_weight = out.o_weight.clone(), out.down_weight.clone()
        out.input_energy = float(torch.square(ctx.inputs).sum(dtype=torch.float64))
        kept.append(keep(out) if keep else out)
        return False

    run_layerwise(lm, windows, stats, on_block, batch_size, progress, should_stop)
    return kept


