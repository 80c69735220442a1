"""The layer Hessian the second-order methods solve with, as pure functions of tensors.

One rule for every caller (SparseGPT's solve and its heatmap scores, the structured refits and
Týr's reconstructions): H = 2/n X^T X in float64, inputs never active (zero diagonal) given a
unit diagonal, then percdamp * mean(diag H) added to the diagonal. Made on the statistics' own
device, so the same code runs on CUDA."""
from __future__ import annotations

import torch


def layer_hessian(xtx: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """2/n X^T X in float64 (a new tensor: the statistics stay as they are)."""
    return xtx.detach().double() * (2.0 / max(n_tokens, 1))


def dead_inputs(h: torch.Tensor) -> torch.Tensor:
    """The inputs never active in the calibration data (zero diagonal), as a bool vector."""
    return torch.diagonal(h) == 0


def damped(h: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """H + percdamp * mean(diag H) * I in float64, dead inputs given a unit diagonal first."""
    h = h.double().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += percdamp * diag.mean()
    return h
