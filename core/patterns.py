"""Pruning patterns and sparsity values: what a cut is asked for, checked before any work.

A pattern is 'unstructured' or N:M (keep N of every M consecutive inputs of a row); a sparsity is
a number in [0, 1). N:M needs input widths that are multiples of M: the misfits are named, and
either refused or left dense on request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import PatternError


@dataclass(frozen=True)
class Pattern:
    """'unstructured' or N:M (keep N of every M consecutive inputs of a row)."""

    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    @property
    def sparsity(self) -> float | None:
        return 1 - self.n / self.m if self.is_nm else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"


def parse_pattern(text: str) -> Pattern:
    text = str(text).strip().lower()
    if text in ("", "unstructured", "none"):
        return Pattern()
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError:
        raise PatternError(f"Pattern {text!r} is not understood; use 'unstructured' or N:M such as 2:4.") from None
    if not (0 < n < m):
        raise PatternError(f"N:M needs 0 < N < M; {n}:{m} does not prune anything sensible. Try 2:4 or 4:8.")
    return Pattern(n, m)


def check_sparsity(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PatternError(f"Sparsity must be a number in [0, 1), such as 0.5; got {value!r}.") from None
    if math.isnan(value) or not 0 <= value < 1:
        raise PatternError(f"Sparsity must be in [0, 1) (0.5 prunes half the weights); got {value}.")
    return value


def nm_misfits(shapes: dict[str, tuple[int, int]], pattern: Pattern) -> list[str]:
    """Names of matrices whose input width is not a multiple of M."""
    if not pattern.is_nm:
        return []
    return [name for name, (_, d_in) in shapes.items() if d_in % pattern.m]


def check_nm_fits(shapes: dict[str, tuple[int, int]], pattern: Pattern, skip_misfits: bool = False) -> list[str]:
    """Raise PatternError naming the layers N:M cannot cover, unless asked to skip them."""
    bad = nm_misfits(shapes, pattern)
    if bad and not skip_misfits:
        shown = ", ".join(f"{n} (width {shapes[n][1]})" for n in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PatternError(
            f"{pattern} needs input widths that are multiples of {pattern.m}; these layers are not: "
            f"{shown}{more}. Pick another M, or skip them (--skip-misfit-layers / the explorer's "
            "'skip layers that do not fit' box) to leave them dense.", bad_layers=bad)
    return bad



def recorded_nm_pattern(meta: dict) -> Pattern | None:
    """The N:M pattern a mask set's metadata records; None for any other (or none)."""
    text = meta.get("pattern")
    try:
        pattern = parse_pattern(text) if isinstance(text, str) else None
    except PatternError:
        return None
    return pattern if pattern is not None and pattern.is_nm else None

