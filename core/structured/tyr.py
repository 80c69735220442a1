"""Týr-the-Pruner's building blocks, as pure functions on tensors (the method itself, which
walks a model, is `core.methods.tyr`).

Conventions (as in `core.structured.solve`): W is a canonical (d_out, d_in) output-projection
weight (o_proj / down_proj and their counterparts); H = X^T X (d_in, d_in) over that layer's
calibration inputs; a *unit* is a group of `unit_size` consecutive input columns (an attention
unit: q_heads_per_unit * head_dim columns; an MLP channel: one column), so d_in = units * size.

Local pruning (one sublayer)
----------------------------
The loss is the reconstruction error of the layer's output against a reference weight W_ref
(the dense weight): E(W) = 1/2 tr((W - W_ref) H_d (W - W_ref)^T), H_d = H damped as in
`core.hessian.damped`. With A the still-active columns, Hinv = (H_d[A, A])^-1 and, for unit g,
M_g = ([Hinv]_gg)^-1 (unit_size x unit_size), the group OBS score is

    score_g = sum over rows r and columns j in g of  W_rj * ( (W_g M_g)_rj / 2 - G_rj ),
    G = dE/dW = (W - W_ref) H_d,

i.e. ALGORITHMS.md's `sum_g W ⊙ ([H^-1]_gg^-1 W / 2 + G)` with its G taken as the negative
gradient (W_ref - W) H. The first term is the exact increase of E when unit g is set to zero
and the other active columns are re-optimised (OBS); the second is the first-order term when W
is away from the optimum. The pruning below starts from W = W_ref and every OBS update keeps
W optimal on the active set, so G = 0 there and is only computed when a different starting
weight is given (`start`).

Progressive removal: each round removes the `per_round` lowest-scoring active units (never past
the next requested count), applies the joint OBS update to the remaining weights
    W <- W - W_S ([Hinv]_SS)^-1 [Hinv]_S,:      (S = the removed columns)
and downdates the inverse the same way (Hinv <- Hinv - Hinv_:,S ([Hinv]_SS)^-1 Hinv_S,:), so no
matrix is re-inverted. The removal order makes the levels nested. Each level's weights are
then refitted exactly on its kept columns with `solve.refit_columns`
(W_K = W H_d[:, K] (H_d[K, K])^-1, the least-squares optimum).

Search
------
State = one level index per sublayer (higher index = more units removed). A mutation moves one
sublayer one level up and another sublayer of the same kind one level down, only when the two
moves change the removed parameter count by the same non-zero amount, so every mutation keeps
the total removed parameter count exactly (levels clipped at 0 or all units have smaller
steps; such moves pair only with an equal move).

Fitness: KL(dense || candidate) of the next-token distributions, coarse-grained to the dense
model's top-k tokens plus one "everything else" bucket: a proper KL over k + 1 outcomes
(>= 0, exactly 0 for the dense model, a lower bound of the full-vocabulary KL), averaged over
tokens.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..hessian import damped
from .solve import refit_columns


# ---------------------------------------------------------------- local pruning

def group_obs_scores(weight: torch.Tensor, hinv: torch.Tensor, unit_size: int,
                     grad: torch.Tensor | None = None) -> torch.Tensor:
    """(units,) group OBS scores of the active columns (see the module docstring).

    `weight` (d_out, n*s) and `hinv` (n*s, n*s) hold only the active columns, in unit order;
    `grad` (d_out, n*s) is dE/dW, or None for zero (W optimal on the active set)."""
    n = weight.shape[1] // unit_size
    return _scores(weight.double(), hinv.double(), unit_size, torch.ones(n, dtype=torch.bool), grad)


def _scores(w: torch.Tensor, hinv: torch.Tensor, s: int, active: torch.Tensor,
            grad: torch.Tensor | None) -> torch.Tensor:
    """Scores over all units of full-width `w` / `hinv` (removed units: zero rows and columns
    of hinv, score +inf). Reads only the diagonal blocks of hinv: no submatrix copies."""
    d_out, d_in = w.shape
    n = d_in // s
    score = torch.full((n,), math.inf, dtype=torch.float64)
    if s == 1:
        diag = torch.diagonal(hinv)[active]
        score[active] = 0.5 * (w[:, active] * w[:, active]).sum(0) / diag
    else:
        blocks = torch.diagonal(hinv.view(n, s, n, s), dim1=0, dim2=2).permute(2, 0, 1)[active]  # (a, s, s)
        m = torch.linalg.inv(blocks)
        wg = w.view(d_out, n, s)[:, active].transpose(0, 1)  # (a, d_out, s)
        score[active] = 0.5 * (torch.bmm(wg, m) * wg).sum((1, 2))
    if grad is not None:
        score[active] -= (w * grad.double()).view(d_out, n, s).sum((0, 2))[active]
    return score


def unit_columns(keep_units: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Bool (units,) -> bool (units * size,) column mask."""
    return keep_units.repeat_interleave(unit_size)


def progressive_removal(weight: torch.Tensor, h: torch.Tensor, unit_size: int, n_remove: int,
                        per_round: int | None = None, percdamp: float = 0.01,
                        stops: list[int] | None = None, start: torch.Tensor | None = None) -> list[int]:
    """The order in which units are removed, `n_remove` of them, by progressive group OBS.

    `per_round` units per round (default: 1/48 of the units, at least one: 32 of 1536 channels); a round never
    removes past a count in `stops` (the level counts), so each level is reached exactly.
    `weight` is the reference (dense) weight; `start` an optional different starting weight
    (the gradient term G is then non-zero). Cost: one inverse of H, then per round
    O(d_in^2 * removed columns) for the downdate."""
    d_out, d_in = weight.shape
    s = unit_size
    if d_in % s:
        raise ValueError(f"{d_in} input columns are not whole units of {s}.")
    n = d_in // s
    n_remove = max(0, min(int(n_remove), n))
    per_round = per_round or max(1, n // 48)
    stops = sorted({int(c) for c in (stops or []) if 0 < c < n_remove} | {n_remove})
    hd = damped(h, percdamp)
    ref = weight.double()
    w = ref.clone() if start is None else start.double().clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hd))
    active = torch.ones(n, dtype=torch.bool)
    order: list[int] = []
    for stop in stops:
        while len(order) < stop:
            grad = None if start is None else (w - ref) @ hd
            scores = _scores(w, hinv, s, active, grad)
            take = min(per_round, stop - len(order))
            chosen = torch.argsort(scores, stable=True)[:take]
            order.extend(int(u) for u in chosen)
            sc = (chosen.unsqueeze(1) * s + torch.arange(s)).reshape(-1)
            rows = hinv[sc]  # (|S|, d_in)
            m = torch.linalg.inv(rows[:, sc])
            w -= (w[:, sc] @ m) @ rows
            hinv -= rows.t() @ (m @ rows)
            w[:, sc] = 0
            hinv[sc] = 0
            hinv[:, sc] = 0
            active[chosen] = False
    return order


def level_counts(centre: int, step: int, n_levels: int, n_units: int) -> list[int]:
    """Units removed at each of `n_levels` levels: centre + (i - n_levels // 2) * step, clipped
    to [0, n_units]."""
    half = n_levels // 2
    return [min(max(centre + (i - half) * step, 0), n_units) for i in range(n_levels)]


def step_units(fraction: float, n_units: int) -> int:
    """A level step given as a fraction of the sublayer's units: at least one unit."""
    return max(1, round(fraction * n_units))


@dataclass
class SublayerLevels:
    counts: list[int]  # units removed per level (non-decreasing)
    keeps: list[torch.Tensor]  # bool (units,) per level, nested
    weights: list[torch.Tensor]  # refitted canonical weight per level (removed columns zero)
    order: list[int]  # units in removal order


def sublayer_levels(weight: torch.Tensor, h: torch.Tensor, unit_size: int, centre: int, step: int,
                    n_levels: int, per_round: int | None = None, percdamp: float = 0.01) -> SublayerLevels:
    """The supernet entry of one sublayer: `n_levels` nested sparsity levels centred on
    `centre` units removed, `step` units apart, each with its exactly refitted weight."""
    n = weight.shape[1] // unit_size
    counts = level_counts(centre, step, n_levels, n)
    order = progressive_removal(weight, h, unit_size, max(counts), per_round, percdamp, stops=counts)
    keeps, weights, cache = [], [], {}
    for c in counts:
        if c not in cache:
            keep = torch.ones(n, dtype=torch.bool)
            keep[order[:c]] = False
            if c == 0:
                w = weight.clone()
            elif c == n:
                w = torch.zeros_like(weight)
            else:
                w = refit_columns(weight, h, unit_columns(keep, unit_size), percdamp)
            cache[c] = (keep, w)
        keeps.append(cache[c][0])
        weights.append(cache[c][1])
    return SublayerLevels(counts, keeps, weights, order)


# ---------------------------------------------------------------- budget

def spread(total: int, capacities: list[int]) -> list[int]:
    """Split `total` units over sublayers in proportion to their capacities, evenly spaced
    (floor of the cumulative share), never above a capacity; sums to `total` exactly."""
    cap_sum = sum(capacities)
    total = max(0, min(int(total), cap_sum))
    out, cum = [], 0
    for cap in capacities:
        lo = cum * total // cap_sum
        cum += cap
        out.append(cum * total // cap_sum - lo)
    return out


def initial_counts(target_params: float, attn_units: list[int], attn_unit_params: list[int],
                   channels: list[int], channel_params: list[int]) -> tuple[list[int], list[int]]:
    """Uniform start: units removed per block (attention, MLP) so that the removed parameters
    are as close to `target_params` as whole units allow. Attention takes its proportional
    share in whole units; MLP channels (the finer unit) take the rest, rounded to the nearest
    channel."""
    total = sum(a * p for a, p in zip(attn_units, attn_unit_params)) + \
        sum(c * p for c, p in zip(channels, channel_params))
    fraction = target_params / max(total, 1)
    attn = spread(round(fraction * sum(attn_units)), attn_units)
    attn_removed = sum(a * p for a, p in zip(attn, attn_unit_params))
    mean_cp = sum(c * p for c, p in zip(channels, channel_params)) / max(sum(channels), 1)
    n_ch = round((target_params - attn_removed) / mean_cp) if mean_cp else 0
    return attn, spread(n_ch, channels)


def removed_params(state: list[int], counts: list[list[int]], unit_params: list[int]) -> int:
    return sum(c[l] * p for l, c, p in zip(state, counts, unit_params))


def feasible_moves(state: list[int], counts: list[list[int]], unit_params: list[int],
                   kinds: list[str]) -> list[tuple[int, int]]:
    """(a, b) pairs: a one level up, b one level down, same kind, equal non-zero parameter change."""
    ups: dict[tuple, list[int]] = {}
    downs: dict[tuple, list[int]] = {}
    for s, level in enumerate(state):
        c, p = counts[s], unit_params[s]
        if level + 1 < len(c) and c[level + 1] > c[level]:
            ups.setdefault((kinds[s], (c[level + 1] - c[level]) * p), []).append(s)
        if level > 0 and c[level] > c[level - 1]:
            downs.setdefault((kinds[s], (c[level] - c[level - 1]) * p), []).append(s)
    return [(a, b) for key, up in ups.items() for a in up for b in downs.get(key, ()) if a != b]


def mutate(state: list[int], counts: list[list[int]], unit_params: list[int], kinds: list[str],
           rng: random.Random, n_moves: int = 1) -> list[int]:
    """A copy of `state` after up to `n_moves` budget-preserving moves (fewer if none fit)."""
    new = list(state)
    for _ in range(n_moves):
        moves = feasible_moves(new, counts, unit_params, kinds)
        if not moves:
            break
        a, b = moves[rng.randrange(len(moves))]
        new[a] += 1
        new[b] -= 1
    return new


# ---------------------------------------------------------------- fitness

def topk_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense model's reference: top-k token ids (..., k) and log-probabilities (..., k+1)
    of those tokens plus the "everything else" bucket (last)."""
    logits = logits.float()
    k = min(k, logits.shape[-1])
    vals, idx = logits.topk(k, dim=-1)
    logp = vals - logits.logsumexp(-1, keepdim=True)
    return idx, torch.cat([logp, _log_rest(logp)], -1)


def _log_rest(logp: torch.Tensor) -> torch.Tensor:
    return torch.log1p(-logp.exp().sum(-1, keepdim=True).clamp(max=1.0)).clamp_min(math.log(1e-30))


def kl_to_reference(logits: torch.Tensor, idx: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(dense || candidate) over the reference's top-k tokens + the rest bucket."""
    logits = logits.float()
    logq = logits.gather(-1, idx) - logits.logsumexp(-1, keepdim=True)
    logq = torch.cat([logq, _log_rest(logq)], -1)
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1).clamp_min(0)
