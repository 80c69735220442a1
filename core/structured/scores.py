"""Unit importance scores and budget rules for structured pruning (pure tensor functions).

Scores are per input column of an output projection (o_proj / down_proj, canonical
(d_out, d_in)); a unit's score aggregates its columns (an MLP channel is one column, an
attention unit `cols_per_unit` consecutive columns).
"""
from __future__ import annotations


import torch


def wanda_sp_columns(weight: torch.Tensor, mean_x2: torch.Tensor) -> torch.Tensor:
    """Wanda-sp: mean over output rows of the Wanda score |W_ij| * ||X_j||."""
    return weight.abs().float().mean(0) * mean_x2.float().sqrt()


def flap_columns(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation metric: Var(x_j) * ||W[:, j]||^2 (a column whose input barely moves
    can be replaced by its mean, which the bias compensation does)."""
    return variance.float() * weight.float().pow(2).sum(0)


def group_columns(column_scores: torch.Tensor, cols_per_unit: int, reduce: str = "sum") -> torch.Tensor:
    """(d_in,) -> (units,): aggregate consecutive column groups."""
    grouped = column_scores.reshape(-1, cols_per_unit)
    return grouped.mean(1) if reduce == "mean" else grouped.sum(1)


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std, so scores of different layers and modules share one threshold."""
    scores = scores.double()
    std = scores.std() if scores.numel() > 1 else torch.tensor(1.0, dtype=scores.dtype)
    return (scores - scores.mean()) / (std if std > 0 else 1.0)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool keep mask of the n_keep highest scores (ties broken by index, deterministic)."""
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if n_keep > 0:
        order = torch.argsort(scores.double(), descending=True, stable=True)
        keep[order[:n_keep]] = True
    return keep


def global_removal(scores: list[torch.Tensor], unit_params: list[int], budget: int) -> list[torch.Tensor]:
    """One threshold over every unit of every group (FLAP): remove the lowest-scoring units,
    each weighted by its parameter count, until `budget` parameters are removed (to the
    nearest unit). Returns keep masks per group."""
    flat = torch.cat([s.double() for s in scores])
    sizes = torch.cat([torch.full((s.numel(),), p, dtype=torch.long) for s, p in zip(scores, unit_params)])
    order = torch.argsort(flat, stable=True)
    cumulative = torch.cumsum(sizes[order], 0)
    # the first prefix that reaches the budget, or the one before it if that lands closer
    n_remove = int(torch.searchsorted(cumulative, torch.tensor(budget), right=False)) + 1 if budget > 0 else 0
    n_remove = min(n_remove, flat.numel())
    if n_remove > 0 and int(cumulative[n_remove - 1]) - budget > budget - (int(cumulative[n_remove - 2]) if n_remove > 1 else 0):
        n_remove -= 1
    keep_flat = torch.ones(flat.numel(), dtype=torch.bool)
    keep_flat[order[:n_remove]] = False
    return list(keep_flat.split([s.numel() for s in scores]))


def block_unit_counts(attn_units: int, attn_unit_params: int, channels: int, channel_params: int,
                      sparsity: float, min_keep: int = 1) -> tuple[int, int]:
    """Units to remove from one block so that it loses `sparsity` of its parameters: attention
    units at the nearest whole number, MLP channels fill the rest of the block's budget.
    At least `min_keep` unit of each sublayer stays."""
    budget = sparsity * (attn_units * attn_unit_params + channels * channel_params)
    attn = min(max(round(sparsity * attn_units), 0), attn_units - min_keep)
    rest = budget - attn * attn_unit_params
    chans = min(max(round(rest / channel_params), 0), channels - min_keep)
    return attn, chans


def softmax_allocation(energies: list[float], sizes: list[int], sparsity: float, temperature: float,
                       low: float = 0.0, high: float = 0.95) -> list[float]:
    """Per-layer sparsity s_l = clip(c * exp(-e_l / T), low, high) with c set by bisection so that
    sum_l n_l s_l = sparsity * sum_l n_l. Energies are standardised first (T is scale-free):
    a layer whose pruning costs more (higher energy) is pruned less. T -> infinity gives the
    uniform allocation, T -> 0 a greedy one."""
    e = standardise(torch.tensor(energies, dtype=torch.float64)) if len(energies) > 1 else torch.zeros(len(energies), dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    target = sparsity * float(n.sum())
    weights = torch.exp(-(e - e.min()) / max(temperature, 1e-6))  # in (0, 1]: no overflow for small T

    def removed(c: float) -> float:
        return float((n * (c * weights).clamp(low, high)).sum())

    if target <= removed(0.0):
        return [float(x) for x in torch.full_like(n, low)]
    hi = 1.0
    while removed(hi) < target and hi < 1e12:
        hi *= 2
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if removed(mid) < target:
            lo = mid
        else:
            hi = mid
    return [float(x) for x in (hi * weights).clamp(low, high)]


