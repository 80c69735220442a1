"""Saliency scores: pure functions from a weight (d_out, d_in) and input statistics to a score
of the same shape. Higher = more important = kept longer."""
from __future__ import annotations

import torch


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().float()


def wanda(weight: torch.Tensor, mean_x2: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j|| (the input-norm term up to a constant, which no ranking sees)."""
    return weight.abs().float() * mean_x2.sqrt().unsqueeze(0)


def ria(weight: torch.Tensor, mean_x2: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Relative importance (|W| over its row sum plus over its column sum) times ||X_j||^alpha."""
    a = weight.abs().float()
    relative = a / a.sum(dim=0, keepdim=True).clamp_min(1e-12) + a / a.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return relative * mean_x2.sqrt().pow(alpha).unsqueeze(0)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """OWL's layer outlier ratio: the fraction of scores above m times their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return (flat > m * flat.mean()).float().mean().item()


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """Per-block sparsity: outlier ratios scaled to [0, 2*lam], centred so the mean is `target`.

    More outliers -> more kept. Degenerate case (all ratios equal) gives the uniform target.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    if spread <= 0:
        return [target] * len(ratios)
    keep = (r - r.min()) / spread * (2 * lam)
    keep = keep - keep.mean() + (1 - target)
    return [min(max(1 - k, 0.0), 0.999) for k in keep.tolist()]
