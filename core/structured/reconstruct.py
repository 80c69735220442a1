"""Structured selection with reconstruction (pure tensor functions).

Both solvers pick which input-column groups (units) of an output projection W (d_out, d_in)
to keep so that X W'^T stays close to the dense X W^T, with H = X^T X, then refit the kept
columns exactly (`refit_columns`). Columns come in groups of `cols_per_unit` (1 for MLP
channels, heads x head_dim for attention units).

- `spap_select` (SPAP): penalty method + alternating minimisation. Z is the free weight,
  V the group-sparse one; the penalty mu/2 ||Z - V||^2 couples them and mu grows each round
  until Z is forced onto V's support.
- `admm_select` (StructPrune's per-module solve): ADMM with a fixed rho, a scaled dual U, a
  ridge step for the free weight and a projection onto k groups for the auxiliary one.
"""
from __future__ import annotations

import torch

from ..hessian import damped
from .solve import refit_columns


def _group_error(z: torch.Tensor, h_diag: torch.Tensor, cols_per_unit: int) -> torch.Tensor:
    """Per unit: output error of dropping its columns of z, diagonal approximation
    sum_{j in unit} ||z[:, j]||^2 H_jj (the closed-form score of the s step)."""
    col = z.pow(2).sum(0) * h_diag
    return col.reshape(-1, cols_per_unit).sum(1)


def _project(z: torch.Tensor, keep_units: torch.Tensor, cols_per_unit: int) -> torch.Tensor:
    return z * keep_units.repeat_interleave(cols_per_unit).to(z.dtype).unsqueeze(0)


class _Ridge:
    """Solves X (2H + c I) = B for the penalties c of the iterations: one float32 Cholesky per
    penalty (the iterations only choose a support; the final refit is float64). Cheaper here
    than one eigendecomposition reused: LAPACK's eigh on a 1536 x 1536 matrix costs ~50x a
    Cholesky on this CPU."""

    def __init__(self, hd: torch.Tensor):
        self.h2 = 2 * hd.float()

    def solve_right(self, b: torch.Tensor, c: float) -> torch.Tensor:
        """b (d_out, d_in) -> b (2H + c I)^-1 (H symmetric)."""
        eye = torch.eye(self.h2.shape[0], dtype=self.h2.dtype, device=self.h2.device)
        chol = torch.linalg.cholesky(self.h2 + c * eye)
        return torch.cholesky_solve(b.float().t(), chol).t()


def _top_units(score: torch.Tensor, n_keep: int) -> torch.Tensor:
    keep = torch.zeros(score.numel(), dtype=torch.bool)
    keep[torch.argsort(score, descending=True, stable=True)[:n_keep]] = True
    return keep


def spap_select(weight: torch.Tensor, h: torch.Tensor, n_keep: int, cols_per_unit: int = 1,
                iterations: int = 10, mu0: float = 0.01, growth: float = 2.0,
                percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep mask over units and the refitted weight (removed columns zero).

    Objective ||X W^T - X V^T||^2 = tr((W - V) H (W - V)^T) with V supported on n_keep units.
    Per round: Z step (ridge, closed form) argmin_Z tr((W-Z)H(W-Z)^T) + mu/2 ||Z - V||^2
    => Z = (2 W H + mu V)(2H + mu I)^-1; s step: keep the n_keep units whose removal from Z
    costs most; V step: V = Z on the kept units. mu is relative to mean(diag H)."""
    hd = damped(h, percdamp)
    w = weight.float()
    ridge = _Ridge(hd)
    scale = float(torch.diagonal(hd).mean())
    h_diag = torch.diagonal(hd).float()
    keep = _top_units(_group_error(w, h_diag, cols_per_unit), n_keep)
    v = _project(w, keep, cols_per_unit)
    whd = 2 * w @ hd.float()
    mu = mu0 * scale
    for _ in range(iterations):
        z = ridge.solve_right(whd + mu * v, mu)
        keep = _top_units(_group_error(z, h_diag, cols_per_unit), n_keep)
        v = _project(z, keep, cols_per_unit)
        mu *= growth
    cols = keep.repeat_interleave(cols_per_unit)
    return keep, refit_columns(weight, h, cols, percdamp)


def admm_select(weight: torch.Tensor, h: torch.Tensor, n_keep: int, cols_per_unit: int = 1,
                iterations: int = 10, rho: float = 0.01, growth: float = 1.5,
                percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """ADMM for min tr((W-V)H(W-V)^T) s.t. V has n_keep column groups:
    V = (2 W H + rho (Z - U))(2H + rho I)^-1;  Z = project(V + U) onto the top groups;
    U += V - Z. rho is relative to mean(diag H) and grows each step (the problem is not
    convex: a growing rho makes the iterates settle on one support)."""
    hd = damped(h, percdamp)
    w = weight.float()
    ridge = _Ridge(hd)
    rho_abs = rho * float(torch.diagonal(hd).mean())
    h_diag = torch.diagonal(hd).float()
    whd = 2 * w @ hd.float()
    keep = _top_units(_group_error(w, h_diag, cols_per_unit), n_keep)
    z = _project(w, keep, cols_per_unit)
    u = torch.zeros_like(w)
    for _ in range(iterations):
        v = ridge.solve_right(whd + rho_abs * (z - u), rho_abs)
        keep = _top_units(_group_error(v + u, h_diag, cols_per_unit), n_keep)
        z = _project(v + u, keep, cols_per_unit)
        u = u + v - z
        rho_abs *= growth
        u /= growth  # the scaled dual is in units of 1/rho
    cols = keep.repeat_interleave(cols_per_unit)
    return keep, refit_columns(weight, h, cols, percdamp)
