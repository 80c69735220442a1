"""UniPruning's maths (Ding et al., 2025) as pure functions: local saliency per calibration
window, the mirror-descent (linearised Bregman / inverse scale space) update that turns a stream
of saliencies into a sparse importance Gamma, and the global controller that spends one
sparsity budget over all matrices.

Everything here takes tensors and returns tensors; the engine (core.calibrate) supplies the
per-window statistics and core.methods.unipruning wires it into the registry.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SALIENCIES = ("stochria", "ria", "wanda")


# ---------------------------------------------------------------- local saliency of one window

def subset_size(d_out: int, d_in: int, fraction: float = 0.2) -> int:
    """stochRIA's tau: max(1, floor(fraction * min(d_out, d_in)))."""
    return max(1, math.floor(fraction * min(d_out, d_in)))


def window_saliency(abs_w: torch.Tensor, mean_x2: torch.Tensor, kind: str, exponent: float = 0.35,
                    tau: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Saliency of every weight for one calibration window, divided by its mean (so matrices of
    different scale share one budget).

    abs_w: |W| (d_out, d_in); mean_x2: the window's mean x_j^2 per input channel (d_in,).
    - wanda:    |W_ij| * sqrt(mean x_j^2)
    - ria:      (|W_ij| / row sum + |W_ij| / column sum) * (mean x_j^2)^exponent
    - stochria: RIA whose row sums run over tau random columns and column sums over tau random
                rows, redrawn every call (the released code's cheap, noisy relative term).
    """
    s = raw_window_saliency(abs_w, mean_x2, kind, exponent, tau, generator)
    mean = s.mean()
    return s.div_(mean) if mean > 0 else s


def raw_window_saliency(abs_w: torch.Tensor, mean_x2: torch.Tensor, kind: str, exponent: float = 0.35,
                        tau: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """window_saliency before its division by the mean (the mirror descent folds that into its
    step size: one pass less over every matrix, every step)."""
    d_out, d_in = abs_w.shape
    x2 = mean_x2.clamp_min(0).float()
    if kind == "wanda":
        return abs_w * x2.sqrt().unsqueeze(0)
    if kind not in ("ria", "stochria"):
        raise ValueError(f"unknown saliency {kind!r}; known: {', '.join(SALIENCIES)}")
    if kind == "ria":
        row_sum, col_sum = abs_w.sum(dim=1), abs_w.sum(dim=0)
    else:
        tau = tau or subset_size(d_out, d_in)
        cols = torch.randperm(d_in, generator=generator)[:tau]
        rows = torch.randperm(d_out, generator=generator)[:tau]
        row_sum = abs_w.index_select(1, cols).sum(dim=1)
        col_sum = abs_w.index_select(0, rows).sum(dim=0)
    act = x2.pow(exponent)
    # |W| * (1/r_i + 1/c_j) * a_j = |W| * (outer(1/r, a) + (a/c)_j): two passes over the matrix
    factor = torch.addr((act / col_sum.clamp_min(1e-12)).expand(d_out, d_in),
                        1.0 / row_sum.clamp_min(1e-12), act)
    return factor.mul_(abs_w)


# ---------------------------------------------------------------- mirror descent

def quantile_threshold(values: torch.Tensor, q: float, max_samples: int = 100_000,
                       generator: torch.Generator | None = None, nonnegative: bool = False) -> torch.Tensor:
    """The q-quantile of |values| (exact up to max_samples entries, else from a random sample)."""
    flat = values.reshape(-1)
    if flat.numel() > max_samples:
        flat = flat.index_select(0, torch.randint(flat.numel(), (max_samples,), generator=generator))
    k = min(flat.numel(), max(1, math.ceil(q * flat.numel())))
    if not nonnegative:
        flat = flat.abs()
    return flat.topk(k, largest=False, sorted=True).values[-1]


def mirror_descent_step(z: torch.Tensor, gamma: torch.Tensor, saliency: torch.Tensor, kappa: float,
                        lam: float, generator: torch.Generator | None = None, scale: float = 1.0,
                        nonnegative: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One linearised-Bregman step, in place: z += kappa (scale * S - Gamma); Gamma = soft(z, t)
    with t the lam-quantile of |z|, so Gamma is exactly zero where |z| is in the lowest lam
    fraction. nonnegative: the caller knows S >= 0, hence z >= 0 (kappa <= 1): no sign/abs passes."""
    z.add_(saliency, alpha=kappa * scale).sub_(gamma, alpha=kappa)
    t = quantile_threshold(z, lam, generator=generator, nonnegative=nonnegative)
    if nonnegative:
        torch.sub(z, t, out=gamma).clamp_(min=0)
    else:
        torch.sub(z.abs(), t, out=gamma).clamp_(min=0).mul_(z.sign())
    return z, gamma


class FirstStep:
    """Per weight, the step at which Gamma first became non-zero (never: n_steps + 1). After
    the first step almost every weight is active, so only the still-pending ones are checked."""

    def __init__(self, shape, n_steps: int):
        self.n_steps = n_steps
        self.first = torch.full(shape, n_steps + 1, dtype=torch.int16 if n_steps < 32000 else torch.int32)
        self.pending: torch.Tensor | None = None  # flat indices not yet active

    def update(self, gamma: torch.Tensor, step: int) -> None:
        flat_gamma, flat_first = gamma.reshape(-1), self.first.view(-1)
        if self.pending is None:
            active = flat_gamma != 0
            flat_first.masked_fill_(active, step)
            self.pending = (~active).nonzero().squeeze(1)
            return
        if self.pending.numel():
            now = flat_gamma.index_select(0, self.pending) != 0
            flat_first.index_fill_(0, self.pending[now], step)
            self.pending = self.pending[~now]


def mirror_descent(abs_w: torch.Tensor, window_mean_x2: torch.Tensor, kind: str = "stochria",
                   kappa: float = 0.01, lam: float = 1e-3, exponent: float = 0.35, tau_fraction: float = 0.2,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one step per calibration window over a frozen weight.

    window_mean_x2: (n_windows, d_in). Returns (Gamma, first_step): first_step[i, j] is the step
    (1-based) at which Gamma_ij first became non-zero, n_windows + 1 if it never did.
    """
    generator = torch.Generator().manual_seed(seed)
    abs_w = abs_w.float()
    tau = subset_size(*abs_w.shape, tau_fraction)
    n_steps = window_mean_x2.shape[0]
    z = torch.zeros_like(abs_w)
    gamma = torch.zeros_like(abs_w)
    first = FirstStep(abs_w.shape, n_steps)
    for step in range(n_steps):
        s = raw_window_saliency(abs_w, window_mean_x2[step], kind, exponent, tau, generator)
        mean = float(s.mean())
        mirror_descent_step(z, gamma, s, kappa, lam, generator, scale=1.0 / mean if mean > 0 else 1.0,
                            nonnegative=kappa <= 1.0)
        first.update(gamma, step + 1)
    return gamma, first.first


def first_step_scores(gamma: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Scores that order by earliest activation first, ties broken by |Gamma| (for N:M)."""
    g = gamma.abs()
    return (-first.float()) + g / (g.max() + 1)  # the |Gamma| term stays below one step


# ---------------------------------------------------------------- global controller

def prune_counts(sorted_scores: dict[str, torch.Tensor], n_prune: int,
                 bounds: dict[str, tuple[int, int]] | None = None,
                 scales: dict[str, float] | None = None) -> dict[str, int]:
    """How many weights each matrix loses so that exactly n_prune are pruned in total, pruning
    the globally lowest scores first; a matrix's count is held within its (low, high) bounds.
    scales: each matrix's scores are compared divided by its scale (default 1), without copies.

    sorted_scores: each matrix's scores sorted ascending (flat). Ties at the threshold are
    split in the dict's order, so the total is exact to one weight.
    """
    total = sum(s.numel() for s in sorted_scores.values())
    if not 0 <= n_prune <= total:
        raise ValueError(f"cannot prune {n_prune} of {total} weights")
    bounds = bounds or {}
    lo = {n: bounds.get(n, (0, s.numel()))[0] for n, s in sorted_scores.items()}
    hi = {n: bounds.get(n, (0, s.numel()))[1] for n, s in sorted_scores.items()}
    if sum(lo.values()) > n_prune or sum(hi.values()) < n_prune:
        raise ValueError("the per-matrix bounds cannot meet the budget")

    # numpy views: 210 searchsorted calls per bisection step cost ~0.5 ms there (torch: ~10x more)
    arrays = {name: s.numpy() for name, s in sorted_scores.items()}
    scale = {name: float((scales or {}).get(name, 1.0)) for name in arrays}
    if any(not (v > 0 and math.isfinite(v)) for v in scale.values()):
        raise ValueError("every matrix's scale must be positive and finite")

    def count(v: float, side: str) -> dict[str, int]:
        return {name: min(max(int(a.searchsorted(np.float32(v * scale[name]), side)), lo[name]), hi[name])
                for name, a in arrays.items()}

    # Bisection over float32 values in their integer order: at most 32 steps, however the
    # scores are spread (bisecting floats as reals can take ~1000 steps near zero).
    low = _order_key(min(float(a[0]) / scale[n] for n, a in arrays.items() if a.size)) - 1
    high = _order_key(max(float(a[-1]) / scale[n] for n, a in arrays.items() if a.size))
    if sum(count(_from_key(low), "right").values()) >= n_prune:  # the lower bounds alone meet it
        return count(_from_key(low), "right")
    while high - low > 1:  # invariant: total(<= low) < n_prune <= total(<= high)
        mid = (low + high) // 2
        if sum(count(_from_key(mid), "right").values()) >= n_prune:
            high = mid
        else:
            low = mid
    # Weights above the last value under budget (low) and at most high: ties (unscaled, no float32
    # lies between the two), or within one float32 step of the threshold (scaled).
    at_or_below, below = count(_from_key(high), "right"), count(_from_key(low), "right")
    counts = dict(below)
    short = n_prune - sum(below.values())
    for name in sorted_scores:  # the tied weights at the threshold, taken in order
        take = min(short, at_or_below[name] - below[name])
        counts[name] += take
        short -= take
    return counts


BUDGET_SCALES = ("mean", "median", "rms")


def budget_scales(sorted_scores: dict[str, torch.Tensor], kind: str) -> dict[str, float] | None:
    """Per matrix, the statistic of its (mean-normalised, sorted) scores that the global threshold
    is measured in: None for mean (already 1), the middle value for median, sqrt(mean s^2) for rms.
    Under one threshold, a matrix with a heavy tail has a mean far above most of its weights, so
    mean units prune it more; median units do not; rms units prune it more still."""
    if kind == "mean":
        return None
    if kind == "median":
        return {name: max(float(s[s.numel() // 2]), 1e-30) for name, s in sorted_scores.items() if s.numel()}
    if kind == "rms":
        return {name: max(float(s.double().square().mean().sqrt()), 1e-30)
                for name, s in sorted_scores.items() if s.numel()}
    raise ValueError(f"unknown budget scale {kind!r}; known: {', '.join(BUDGET_SCALES)}")


def _order_key(value: float) -> int:
    """An integer with the same order as the float32 value (negative floats mirrored; -0.0 and
    0.0 share key 0, as they compare equal)."""
    bits = int(np.float32(value).view(np.int32))
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF)


def _from_key(key: int) -> np.float32:
    bits = key if key >= 0 else (-key) | -0x80000000
    return np.int32(bits).view(np.float32)


def cut_rows_by_count(row_ranks: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask pruning n_prune weights of a matrix spread evenly over its rows (the first
    n_prune mod d_out rows lose one more), each row losing its lowest-ranked entries."""
    d_out = row_ranks.shape[0]
    per_row = torch.full((d_out, 1), n_prune // d_out, dtype=row_ranks.dtype)
    per_row[: n_prune % d_out] += 1
    return row_ranks >= per_row


def keep_mask_from_count(scores: torch.Tensor, sorted_flat: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask pruning exactly the n_prune lowest scores of a matrix (ties split by position)."""
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_prune >= scores.numel():
        return torch.zeros_like(scores, dtype=torch.bool)
    thr = sorted_flat[n_prune - 1]
    keep = scores > thr
    at_or_below = int(torch.searchsorted(sorted_flat, thr.reshape(1), right=True))
    surplus = at_or_below - n_prune  # tied weights at the threshold that must stay
    if surplus > 0:
        tied = (scores == thr).reshape(-1).nonzero().squeeze(1)
        keep.view(-1)[tied[-surplus:]] = True
    return keep


# ---------------------------------------------------------------- released-code variant helpers

def prox_nm(weight: torch.Tensor, n: int, m: int, step: float) -> torch.Tensor:
    """Proximal step of an N:M-inducing penalty: in every group of M consecutive inputs of a row,
    the M - N smallest |w| are shrunk toward zero by `step` (soft threshold); the N largest stay.
    Returns a new tensor; weights whose width is not a multiple of M are returned unchanged."""
    d_out, d_in = weight.shape
    if d_in % m or step <= 0:
        return weight.clone()
    groups = weight.reshape(d_out, d_in // m, m)
    small = torch.ones_like(groups, dtype=torch.bool)
    small.scatter_(2, groups.abs().topk(n, dim=2).indices, False)
    shrunk = groups.sign() * (groups.abs() - step).clamp_min(0)
    return torch.where(small, shrunk, groups).reshape(d_out, d_in)


def backprop_memory_bytes(n_trainable: int, n_layers: int, hidden: int, heads: int, seqlen: int,
                          vocab: int, n_scored: int) -> int:
    """A rough upper estimate of what transient AdamW calibration adds to the loaded model:
    gradient + two Adam moments per trainable weight, fp32 activations kept for backward (the
    usual s*h*(34 + 5*a*s/h) per layer, doubled for fp32), the logits and their gradient, and
    the mirror-descent state (z, Gamma: fp32; first step: int16) per scored weight."""
    optimiser = 3 * 4 * n_trainable
    activations = 2 * n_layers * seqlen * hidden * (34 + 5 * heads * seqlen / max(hidden, 1))
    logits = 3 * 4 * seqlen * vocab
    mirror = (4 + 4 + 2) * n_scored
    return int(optimiser + activations + logits + mirror)
