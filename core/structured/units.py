"""Structured units per family.

An *attention unit* is one KV group under GQA (its query heads plus its one K and one V head),
or one head without GQA: pruning whole KV groups keeps every remaining group the same size, so
a sliced layer still runs transformers' own attention (query heads sharing a pruned KV head
cannot be sliced out without breaking the equal-group layout). An *MLP channel* is one row of
each MLP input projection (up/gate/fc1) plus the matching input column of the output
projection (down/fc2).

The function of a block only depends on the output projections' input columns (o, down):
a pruned unit's q/k/v or up/gate rows feed nothing once its o/down columns are zero. Row masks
are still produced so the accounting (and the sliced model) drop them too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..loaded_model import LoadedModel
from .scores import block_unit_counts


@dataclass(frozen=True)
class BlockUnits:
    """The structured units of one decoder block and where they sit in its matrices."""

    index: int
    hidden: int
    attn_units: int  # KV groups (GQA) or heads
    q_heads_per_unit: int
    kv_heads_per_unit: int  # 1 under GQA/MHA-as-groups
    head_dim: int
    channels: int
    attn_unit_params: int  # weights (+ biases) removed with one attention unit
    channel_params: int  # weights (+ biases) removed with one MLP channel

    @property
    def attn_params(self) -> int:
        return self.attn_units * self.attn_unit_params

    @property
    def mlp_params(self) -> int:
        return self.channels * self.channel_params

    @property
    def params(self) -> int:
        return self.attn_params + self.mlp_params

    def removal_counts(self, sparsity: float) -> tuple[int, int]:
        """(attention units, MLP channels) to remove so this block loses `sparsity` of its parameters."""
        return block_unit_counts(self.attn_units, self.attn_unit_params, self.channels, self.channel_params, sparsity)

    def removed(self, keep_attn: torch.Tensor, keep_channels: torch.Tensor) -> int:
        """Parameters removed from this block by these keep masks."""
        return ((self.attn_units - int(keep_attn.sum())) * self.attn_unit_params
                + (self.channels - int(keep_channels.sum())) * self.channel_params)


def _has_bias(module) -> bool:
    return getattr(module, "bias", None) is not None


def block_units(lm: LoadedModel, index: int) -> BlockUnits:
    family, heads = lm.family, lm.heads
    block = lm.blocks[index]
    linears = family.linear_modules(block)
    hidden = family.weight_view(linears[family.attention.out]).shape[0]
    hd = heads.head_dim
    gqa = heads.num_kv_heads < heads.num_heads
    units = heads.num_kv_heads if gqa else heads.num_heads
    q_per = heads.group_size if gqa else 1
    rows_per_unit = (q_per + 2) * hd  # q heads + one k + one v
    attn_params = rows_per_unit * hidden + q_per * hd * hidden  # q/k/v rows + o columns
    att = family.attention
    qkv_modules = [linears[att.qkv]] if att.qkv else [linears[att.q], linears[att.k], linears[att.v]]
    if any(_has_bias(m) for m in qkv_modules):
        attn_params += rows_per_unit
    mlp = family.mlp
    channels = family.weight_view(linears[mlp.out]).shape[1]
    channel_params = (len(mlp.inputs) + 1) * hidden + sum(_has_bias(linears[n]) for n in mlp.inputs)
    return BlockUnits(index, hidden, units, q_per, 1, hd, channels, attn_params, channel_params)


def all_block_units(lm: LoadedModel) -> list[BlockUnits]:
    return [block_units(lm, i) for i in range(len(lm.blocks))]


def decoder_params(units: list[BlockUnits]) -> int:
    """Parameters the structured budget is a fraction of: all attention units and MLP channels."""
    return sum(u.params for u in units)


def unit_rows(lm: LoadedModel, units: BlockUnits, keep_attn: torch.Tensor) -> dict[str, torch.Tensor]:
    """Kept output rows (bool) of the q/k/v (or fused qkv) matrices, by relative name."""
    att, hd = lm.family.attention, units.head_dim
    q_heads = keep_attn.repeat_interleave(units.q_heads_per_unit)  # (num_q_heads,)
    kv_heads = keep_attn  # one K and one V head per unit
    q_rows = q_heads.repeat_interleave(hd)
    kv_rows = kv_heads.repeat_interleave(hd)
    if att.qkv is None:
        return {att.q: q_rows, att.k: kv_rows, att.v: kv_rows}
    if att.fused_interleaved:  # GPT-NeoX: per head [q_h | k_h | v_h] (no GQA in this family)
        return {att.qkv: keep_attn.repeat_interleave(3 * hd)}
    return {att.qkv: torch.cat([q_rows, kv_rows, kv_rows])}  # GPT-2: [q | k | v]


def unit_out_columns(units: BlockUnits, keep_attn: torch.Tensor) -> torch.Tensor:
    """Kept input columns (bool) of the attention output projection."""
    return keep_attn.repeat_interleave(units.q_heads_per_unit * units.head_dim)


def attn_unit_of_column(units: BlockUnits) -> torch.Tensor:
    """(o_proj d_in,): the attention unit each input column of o_proj belongs to."""
    return torch.arange(units.attn_units).repeat_interleave(units.q_heads_per_unit * units.head_dim)


def block_masks(lm: LoadedModel, units: BlockUnits, keep_attn: torch.Tensor,
                keep_channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full (d_out, d_in) bool masks of every prunable matrix of one block, by full name."""
    family = lm.family
    prefix = family.block_prefix(units.index)
    shapes = {rel: tuple(family.weight_view(m).shape) for rel, m in family.linear_modules(lm.blocks[units.index]).items()}
    masks = {}
    for rel, rows in unit_rows(lm, units, keep_attn).items():
        masks[rel] = rows.unsqueeze(1).expand(shapes[rel]).clone()
    masks[family.attention.out] = unit_out_columns(units, keep_attn).unsqueeze(0).expand(shapes[family.attention.out]).clone()
    for rel in family.mlp.inputs:
        masks[rel] = keep_channels.unsqueeze(1).expand(shapes[rel]).clone()
    masks[family.mlp.out] = keep_channels.unsqueeze(0).expand(shapes[family.mlp.out]).clone()
    return {f"{prefix}.{rel}": mask for rel, mask in masks.items()}
