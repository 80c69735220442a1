"""What calibration gathers about one linear layer's input: the sums the methods score and solve
with (a plain record; core.calibrate fills it block by block)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

STAT_KINDS = frozenset({"sum_x2", "sum_x", "xtx", "window_x2"})


@dataclass
class LayerStats:
    """Statistics of one linear layer's input over the calibration tokens (float32)."""

    n_tokens: int = 0
    sum_x2: torch.Tensor | None = None  # (d_in,)
    sum_x: torch.Tensor | None = None  # (d_in,)
    xtx: torch.Tensor | None = None  # (d_in, d_in)
    window_x2: list[torch.Tensor] | None = None  # per batch (windows, d_in): mean x^2 of each window

    def mean_x2(self) -> torch.Tensor:
        return self.sum_x2 / max(self.n_tokens, 1)

    def window_mean_x2(self) -> torch.Tensor:
        """(n_windows, d_in): each calibration window's own mean x^2 (for per-window methods)."""
        return torch.cat(self.window_x2)

    def variance(self) -> torch.Tensor:
        mean = self.sum_x / max(self.n_tokens, 1)
        return (self.sum_x2 / max(self.n_tokens, 1) - mean * mean).clamp_min(0)
