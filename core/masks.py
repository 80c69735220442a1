"""Masks: cut them from scores, apply and restore them reversibly, count, save and load.

Masks are bool tensors in the canonical (d_out, d_in) layout, True = keep, keyed by the
prunable module's full name (e.g. 'model.layers.3.mlp.up_proj').
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MaskFileError, PatternError
from .models import LoadedModel

FORMAT_VERSION = "1"


# ---------------------------------------------------------------- patterns and sparsity checks

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


# ---------------------------------------------------------------- cutting (pure functions)

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


# ---------------------------------------------------------------- a set of masks

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
                 done: dict[str, torch.Tensor] | None = None):
        self._shapes = {name: tuple(shape) for name, shape in shapes.items()}
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


def mask_shapes(masks: Mapping) -> dict[str, tuple[int, int]]:
    """Every mask's shape, without making lazy masks."""
    if isinstance(masks, LazyMasks):
        return masks.shapes()
    return {name: tuple(mask.shape) for name, mask in masks.items()}


@dataclass
class MaskSet:
    """Masks for one model, optional updated weights (methods that update weights), metadata."""

    masks: Mapping[str, torch.Tensor]  # a dict, or LazyMasks (made on first read)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    pruned: dict[str, int] | None = None  # pruned weights per matrix; counted once, on demand
    # output biases to set (structured bias compensation, FLAP); a module without a bias gets one
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    # prunable matrices deliberately left dense (N:M misfits skipped): no mask, 0 pruned, but
    # counted in the whole-model sparsity, the allocation and the saved file's metadata
    dense_layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each mask's shape (no lazy mask is made)."""
        return mask_shapes(self.masks)

    @property
    def skipped_layers(self) -> list[str]:
        """Names of the matrices left dense on purpose (see dense_layers)."""
        return list(self.dense_layers)

    def pruned_counts(self) -> dict[str, int]:
        """Pruned weights per matrix. Counted once per mask set (a pass over ~100M mask entries
        costs tens of ms, and the explorer needs the counts three times per slider move); a cut
        knows them without counting, and then no lazy mask is made for them."""
        if self.pruned is None or set(self.pruned) != set(self.masks):
            # count_nonzero, not (~mask).sum(): no temporary tensor, ~30x faster on big masks
            self.pruned = {name: mask.numel() - int(mask.count_nonzero()) for name, mask in self.masks.items()}
        return self.pruned

    def sparsity_per_matrix(self) -> dict[str, float]:
        """Every matrix's pruned fraction, the layers left dense (0.0) included."""
        counts = self.pruned_counts()
        out = {name: counts[name] / math.prod(shape) for name, shape in self.shapes().items()}
        out.update({name: 0.0 for name in self.dense_layers if name not in out})
        return out

    def total_sparsity(self) -> float:
        """Pruned fraction of every matrix the set covers: masked ones and those left dense."""
        pruned = sum(self.pruned_counts().values())
        shapes = self.shapes()
        total = sum(math.prod(shape) for shape in shapes.values())
        total += sum(math.prod(shape) for name, shape in self.dense_layers.items() if name not in shapes)
        return pruned / max(total, 1)


def allocation_table(masks: "dict[str, torch.Tensor] | MaskSet", lm: LoadedModel) -> list[dict]:
    """One row per matrix: block, matrix type, size, achieved sparsity."""
    if isinstance(masks, MaskSet):
        counts, shapes = masks.pruned_counts(), masks.shapes()  # no lazy mask is made
    else:
        counts = {name: mask.numel() - int(mask.count_nonzero()) for name, mask in masks.items()}
        shapes = mask_shapes(masks)
    rows = []
    prefix = lm.family.blocks_path + "."
    dense_left = masks.dense_layers if isinstance(masks, MaskSet) else {}
    for name, shape in shapes.items():
        block_text, rel = name[len(prefix):].split(".", 1)
        pruned, params = counts[name], math.prod(shape)
        rows.append({"name": name, "block": int(block_text), "type": lm.family.matrix_type(rel),
                     "params": params, "pruned": pruned, "sparsity": pruned / params, "skipped": False})
    for name, shape in dense_left.items():  # left dense on purpose: 0 pruned, still the model's weights
        if name in shapes:
            continue
        block_text, rel = name[len(prefix):].split(".", 1)
        rows.append({"name": name, "block": int(block_text), "type": lm.family.matrix_type(rel),
                     "params": math.prod(shape), "pruned": 0, "sparsity": 0.0, "skipped": True})
    return rows


# ---------------------------------------------------------------- files

def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: never a half file. The
    file gets the umask's ordinary mode (0644 under umask 022), not mkstemp's 0600."""
    from .outputs import file_mode

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_masks(path: str | Path, mask_set: MaskSet, lm: LoadedModel) -> Path:
    """safetensors: one uint8 tensor per mask (canonical layout), string metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {f"mask/{name}": mask.to(torch.uint8).contiguous() for name, mask in mask_set.masks.items()}
    tensors.update({f"weight/{name}": w.contiguous() for name, w in mask_set.weights.items()})
    tensors.update({f"bias/{name}": b.contiguous() for name, b in mask_set.biases.items()})
    # The mask set's own metadata first: the keys below describe this file and this model and
    # must win over stale copies carried in by a mask set that was itself loaded from a file.
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in mask_set.meta.items()}
    meta.update({
        "format": "pruning-explorer-masks",
        "format_version": FORMAT_VERSION,
        "model_id": lm.model_id,
        "model_fingerprint": lm.fingerprint,
        "model_type": lm.config.model_type,
        "layout": "canonical (d_out, d_in), True/1 = keep",
        "achieved_sparsity": f"{mask_set.total_sparsity():.6f}",
        "allocation": json.dumps({n: round(s, 6) for n, s in mask_set.sparsity_per_matrix().items()}),
        # the matrices this file has no mask for on purpose (left dense); load_masks refuses others
        "skipped_layers": json.dumps(mask_set.skipped_layers),
    })
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_masks(path: str | Path, lm: LoadedModel, allow_other_model: bool = False) -> MaskSet:
    """Read a mask file; refuse it clearly if it is corrupt or made for another model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"No mask file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise MaskFileError(
            f"{path} is not a readable safetensors mask file ({exc}). It may be truncated or "
            "corrupt; export the masks again.") from exc
    if meta.get("format") != "pruning-explorer-masks":
        raise MaskFileError(f"{path} is a safetensors file but not a mask file written by this tool.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MaskFileError(f"{path} has mask format version {meta.get('format_version')}; this tool "
                            f"reads version {FORMAT_VERSION}.")
    if not allow_other_model and meta.get("model_fingerprint") != lm.fingerprint:
        raise MaskFileError(
            f"{path} was made for model {meta.get('model_id')!r} (fingerprint "
            f"{meta.get('model_fingerprint')}), not for the loaded {lm.model_id!r} (fingerprint "
            f"{lm.fingerprint}). Load the model it was made for.")
    shapes = {name: tuple(lm.family.weight_view(m).shape) for name, m in lm.prunable().items()}
    masks, weights, biases = {}, {}, {}
    for key, tensor in tensors.items():
        kind, name = key.split("/", 1)
        if name not in shapes:
            raise MaskFileError(f"{path} has a mask for {name!r}, which the loaded model does not have.")
        expected = shapes[name][:1] if kind == "bias" else shapes[name]
        if tuple(tensor.shape) != expected:
            raise MaskFileError(f"{path}: {name} has shape {tuple(tensor.shape)} but the model's is "
                                f"{expected}; the file belongs to another model.")
        if kind == "mask":
            masks[name] = tensor.bool()
        else:
            (biases if kind == "bias" else weights)[name] = tensor
    # A matrix without a mask would silently stay dense: only those the file records as left
    # dense on purpose (N:M misfits skipped) may be missing.
    recorded = set(_json_list(meta.get("skipped_layers")))
    missing = [name for name in shapes if name not in masks]
    unexplained = [name for name in missing if name not in recorded]
    if unexplained:
        shown = ", ".join(unexplained[:5]) + (f" and {len(unexplained) - 5} more" if len(unexplained) > 5 else "")
        raise MaskFileError(
            f"{path} has no mask for {len(unexplained)} of the model's {len(shapes)} prunable matrices "
            f"({shown}), and does not record them as left dense; applying it would leave them dense. "
            "The file is incomplete: export the masks again.")
    keep = {k: v for k, v in meta.items() if k not in ("allocation",)}
    return MaskSet(masks=masks, weights=weights, meta=keep, biases=biases,
                   dense_layers={name: shapes[name] for name in missing})


def _json_list(value) -> list:
    """A list kept in metadata: a list, or its JSON text (as files store it); else []."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    return list(value) if isinstance(value, (list, tuple)) else []


def dense_note(mask_set: MaskSet) -> str | None:
    """One line naming the matrices a mask set leaves dense on purpose, or None."""
    names = mask_set.skipped_layers
    if not names:
        return None
    total = len(names) + len(mask_set.shapes())
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (f"{len(names)} of {total} matrices left dense (N:M does not fit their width): {shown}; "
            f"whole-model sparsity {mask_set.total_sparsity():.1%}.")
