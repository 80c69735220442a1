"""Pure linear algebra shared by the structured methods (tensors in, tensors out).

Conventions: W is a canonical (d_out, d_in) weight; H = X^T X (d_in, d_in) over the
calibration inputs X of that layer (unnormalised sums are fine: the solves are scale-free).
"""
from __future__ import annotations

import torch

from ..hessian import damped


def refit_columns(weight: torch.Tensor, h: torch.Tensor, keep: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Least-squares refit of the kept input columns so the layer reproduces its dense output.

    min_V || X W^T - X_K V^T ||^2  =>  V = W H[:, K] H_KK^-1. Returns a full-width weight with
    the removed columns zero. Never worse than plain masking on the calibration data (it is
    the optimum over all weights on K; masking is one candidate)."""
    hd = damped(h, percdamp)
    w = weight.double()
    k = keep.nonzero().squeeze(1)
    rhs = w @ hd[:, k]  # (d_out, |K|)
    chol = torch.linalg.cholesky(hd[k][:, k])
    v = torch.cholesky_solve(rhs.t(), chol).t()
    out = torch.zeros_like(w)
    out[:, k] = v
    return out.to(weight.dtype)


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, h: torch.Tensor) -> float:
    """|| X (W - W')^T ||_F^2 = trace((W - W') H (W - W')^T)."""
    d = (weight - new_weight).double()
    return float(((d @ h.double()) * d).sum())
