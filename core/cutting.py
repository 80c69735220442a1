"""Cutting keep-masks from scores (pure functions of tensors), and LazyMasks: masks cut on first read.

Masks are bool tensors in the canonical (d_out, d_in) layout, True = keep, keyed by the
prunable module's full name (e.g. 'model.layers.3.mlp.up_proj').
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

import torch

from .errors import PatternError
from .patterns import Pattern


def ascending_ranks(scores: torch.Tensor, scope: str) -> torch.Tensor:
    """Rank of every score among its comparison group (0 = least important).

    scope 'row' ranks within each output row (Wanda, RIA), 'matrix' within the whole matrix
    (magnitude). Computing ranks once makes every later cut a single comparison.
    """
    flat = scores.reshape(1, -1) if scope == "matrix" else scores
    order = flat.argsort(dim=1, stable=True)
    dtype = torch.int16 if flat.shape[1] < 2**15 else torch.int32
    ranks = torch.empty_like(order, dtype=dtype)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], dtype=dtype).expand_as(order).contiguous())
    return ranks.view_as(scores)


def pruned_count(sparsity: float, group: int) -> int:
    """How many entries of a comparison group a cut prunes: floor(sparsity * group)."""
    return int(sparsity * group)


def cut_from_ranks(ranks: torch.Tensor, sparsity: float, scope: str) -> torch.Tensor:
    """Keep-mask pruning exactly floor(sparsity * group size) lowest-ranked entries per group."""
    group = ranks.numel() if scope == "matrix" else ranks.shape[1]
    return ranks >= pruned_count(sparsity, group)


def cut_unstructured(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    return cut_from_ranks(ascending_ranks(scores, scope), sparsity, scope)


def cut_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive inputs of each row."""
    d_out, d_in = scores.shape
    if d_in % m:
        raise PatternError(f"{n}:{m} needs an input width that is a multiple of {m}, not {d_in}.")
    groups = scores.reshape(d_out, d_in // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.view(d_out, d_in)


def cut_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, scope: str = "row",
             ranks: torch.Tensor | None = None) -> torch.Tensor:
    if pattern.is_nm:
        return cut_nm(scores, pattern.n, pattern.m)
    if ranks is not None:
        return cut_from_ranks(ranks, sparsity, scope)
    return cut_unstructured(scores, sparsity, scope)



# ---------------------------------------------------------------- masks cut on first read

class LazyMasks(Mapping):
    """Masks cut on first read, each once: a read-only dict to every reader.

    A cut knows every matrix's name, shape and pruned count without making a mask, and the
    explorer's live view needs only those and the one matrix it draws. Making all masks of a
    135M model costs ~100 ms and ~100 MB per slider move, so a cut returns this mapping and
    the other masks are made only when something reads them (apply for generation or
    perplexity, save, export), by the same function an eager cut would call.

    `done` may be shared between mappings whose masks are the same (N:M cuts of one
    calibration): a mask made by one is then found by the others."""

    def __init__(self, shapes: dict[str, tuple[int, int]], make: Callable[[str], torch.Tensor],
                 done: dict[str, torch.Tensor] | None = None, pruned: dict[str, int] | None = None):
        self._shapes = {name: tuple(shape) for name, shape in shapes.items()}
        # pruned entries per mask where the maker knows them without making the mask (a cut by
        # counts); MaskSet takes them instead of counting
        self.known_pruned = dict(pruned) if pruned is not None else None
        self._make = make
        self._done = {} if done is None else done
        self._lock = threading.Lock()  # two readers of one missing mask make it once

    def __getitem__(self, name: str) -> torch.Tensor:
        mask = self._done.get(name)
        if mask is not None:
            return mask
        if name not in self._shapes:
            raise KeyError(name)
        with self._lock:
            mask = self._done.get(name)
            if mask is None:
                mask = self._make(name)
                if tuple(mask.shape) != self._shapes[name]:
                    raise ValueError(f"{name}: made a mask of shape {tuple(mask.shape)}, expected "
                                     f"{self._shapes[name]}")
                self._done[name] = mask
        return mask

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name) -> bool:
        return name in self._shapes

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def made(self) -> list[str]:
        """Names whose masks exist already (the rest are made on first read)."""
        return [name for name in self._shapes if name in self._done]

    def make_all(self) -> dict[str, torch.Tensor]:
        """Every mask, made now where not made yet: a plain dict."""
        return {name: self[name] for name in self._shapes}

    def __repr__(self) -> str:
        return f"LazyMasks({len(self._shapes)} matrices, {len(self.made())} made)"

