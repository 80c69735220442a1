"""Masks: cut them from scores, apply and restore them reversibly, count, save and load.

Masks are bool tensors in the canonical (d_out, d_in) layout, True = keep, keyed by the
prunable module's full name (e.g. 'model.layers.3.mlp.up_proj'). They can be held and saved
one bit per weight (pack_mask, PackedMasks): files of format version 2 store them that way.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MaskFileError, PatternError
from .fingerprint import mismatch, written_with
from .loaded_model import LoadedModel

FORMAT_VERSION = "2"  # what save_masks writes: masks packed 8 inputs per byte
READABLE_VERSIONS = ("1", "2")  # 1: one uint8 per weight, as written before packing
# How version 2 packs a row; written to every file so that other readers need not guess.
PACKING = ("rows along d_in, 8 inputs per byte, first input in the most significant bit "
           "(numpy.packbits bitorder='big'), last byte of a row zero-padded")
TENSOR_KINDS = ("mask", "weight", "bias")  # a file's tensors: f"{kind}/{matrix name}"


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


# ---------------------------------------------------------------- one bit per weight (pure functions)

def packed_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The packed tensor's shape for a (d_out, d_in) mask: (d_out, ceil(d_in / 8))."""
    d_out, d_in = shape
    return (d_out, -(-d_in // 8))


# Multiplying 8 bytes that are each 0 or 1, read as one little-endian int64, by this constant
# moves byte i's bit to bit 63 - i; every other partial product lands on a distinct lower bit
# or overflows away, so nothing carries into the top byte. The constant is 0x8040201008040201
# as a signed int64 (torch's int64 multiply wraps).
_GATHER_BITS = 0x8040201008040201 - (1 << 64)
_LITTLE_ENDIAN = sys.byteorder == "little"
# Mask entries handled per step: the int64 intermediates of a whole large matrix would be fresh
# memory pages on every call, whose first touch costs more than the arithmetic.
_STEP_ENTRIES = 1 << 22


def _row_steps(d_out: int, n_bytes: int) -> Iterator[slice]:
    rows = max(1, _STEP_ENTRIES // max(8 * n_bytes, 1))
    return (slice(start, start + rows) for start in range(0, d_out, rows))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A (d_out, d_in) keep-mask as uint8 (d_out, ceil(d_in / 8)), packed as PACKING says."""
    if mask.dim() != 2:
        raise ValueError(f"pack_mask needs a 2-D (d_out, d_in) mask, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask != 0
    d_out, d_in = mask.shape
    out = torch.empty(packed_shape((d_out, d_in)), dtype=torch.uint8, device=mask.device)
    if mask.numel() == 0:
        return out
    bytes_ = mask.contiguous().view(torch.uint8)  # bool is one byte, 0 or 1: no copy
    for rows in _row_steps(d_out, out.shape[1]):
        block = bytes_[rows]
        if d_in % 8:
            block = torch.nn.functional.pad(block, (0, -d_in % 8))
        if not _LITTLE_ENDIAN:
            out[rows] = _pack_shifts(block.view(block.shape[0], -1, 8))
            continue
        if block.storage_offset() % 8:  # an int64 view must start on a whole int64
            block = block.clone()
        gathered = block.view(torch.int64) * _GATHER_BITS
        out[rows] = gathered.bitwise_right_shift_(56)  # the copy keeps the low byte
    return out


def _pack_shifts(groups: torch.Tensor) -> torch.Tensor:
    """pack_mask's bytes from (d_out, n_bytes, 8) uint8 0/1 groups, any byte order (slower)."""
    out = groups[..., 0] << 7
    for i in range(1, 8):
        out |= groups[..., i] << (7 - i)
    return out


def _bit_table() -> torch.Tensor:
    """(256, 8) bool: row b is byte b's bits, most significant first."""
    return ((torch.arange(256).unsqueeze(1) >> torch.arange(7, -1, -1)) & 1).bool()


# Each byte's 8 bools read as one int64: unpacking is then one gather of 8 bytes per byte.
_UNPACK_TABLE = _bit_table().contiguous().view(torch.int64).squeeze(1)
_POPCOUNT_TABLE = _bit_table().sum(dim=1)
_tables_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpack and popcount tables on `device` (copied there once)."""
    if device.type == "cpu":
        return _UNPACK_TABLE, _POPCOUNT_TABLE
    if device not in _tables_on:
        _tables_on[device] = (_UNPACK_TABLE.to(device), _POPCOUNT_TABLE.to(device))
    return _tables_on[device]


def unpack_mask(packed: torch.Tensor, d_in: int) -> torch.Tensor:
    """The bool (d_out, d_in) mask pack_mask packed; padding bits are ignored."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"unpack_mask needs a 2-D uint8 tensor, got {packed.dtype} of shape "
                         f"{tuple(packed.shape)}")
    d_out, n_bytes = packed.shape
    if n_bytes != -(-d_in // 8):
        raise ValueError(f"a packed row of {n_bytes} bytes cannot hold {d_in} inputs "
                         f"(needs {-(-d_in // 8)})")
    unpack, _ = _tables(packed.device)
    out = torch.empty(d_out, d_in, dtype=torch.bool, device=packed.device)
    if out.numel() == 0:
        return out
    for rows in _row_steps(d_out, n_bytes):
        index = packed[rows].reshape(-1).int()
        if d_in == 8 * n_bytes:  # gather straight into the result, seen as int64
            torch.index_select(unpack, 0, index, out=out[rows].view(torch.int64).view(-1))
        else:
            out[rows] = unpack.index_select(0, index).view(torch.bool).view(-1, 8 * n_bytes)[:, :d_in]
    return out


def packed_kept_count(packed: torch.Tensor) -> int:
    """Kept entries (1 bits) of a packed mask, without unpacking: a histogram of its byte values
    weighted by each value's popcount. Padding bits must be 0, as pack_mask leaves them."""
    _, popcount = _tables(packed.device)
    return int(torch.bincount(packed.flatten(), minlength=256).mul_(popcount).sum())


def _clear_padding(packed: torch.Tensor, d_in: int) -> torch.Tensor:
    """`packed` with the bits past d_in in each row's last byte set to 0 (a copy only when
    some are set): counts read every bit, reads never see them."""
    spare = -d_in % 8
    if not spare or packed.numel() == 0:
        return packed
    junk = packed[:, -1] & ((1 << spare) - 1)
    if not bool(junk.any()):
        return packed
    packed = packed.clone()
    packed[:, -1] &= 0xFF ^ ((1 << spare) - 1)
    return packed


class PackedMasks(Mapping):
    """Masks held one bit per weight: a read-only dict of bool masks to every reader.

    A model's masks as bool take a byte per weight (8 GB for 8B parameters); packed they take
    1/8 of that. Each read unpacks a fresh bool mask and keeps nothing unpacked, so only the
    masks in use at a time cost a byte per weight. Shapes, kept counts (hence
    MaskSet.pruned_counts) and save_masks use the packed bits without unpacking.

    Built from bool masks (a dict, LazyMasks, another PackedMasks: packed here), and/or from
    tensors already packed by pack_mask with the masks' (d_out, d_in) shapes (d_in cannot be
    read from a packed row's byte count)."""

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None, *,
                 packed: Mapping[str, torch.Tensor] | None = None,
                 shapes: Mapping[str, tuple[int, int]] | None = None):
        self._packed: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        if isinstance(masks, PackedMasks):  # already packed: share, do not unpack
            self._packed.update(masks._packed)
            self._shapes.update(masks._shapes)
        elif masks is not None:
            for name, mask in masks.items():
                self._packed[name] = pack_mask(mask)
                self._shapes[name] = tuple(mask.shape)
        packed, shapes = dict(packed or {}), dict(shapes or {})
        if set(packed) != set(shapes):
            odd = sorted(set(packed) ^ set(shapes))
            raise ValueError(f"packed masks need a shape each and shapes a packed mask each; "
                             f"unmatched: {', '.join(odd[:5])}")
        for name, tensor in packed.items():
            if name in self._packed:
                raise ValueError(f"{name} is given both as a mask and as a packed mask")
            shape = tuple(int(n) for n in shapes[name])
            if tensor.dtype != torch.uint8 or tuple(tensor.shape) != packed_shape(shape):
                raise ValueError(f"{name}: a {shape} mask packs to uint8 {packed_shape(shape)}, "
                                 f"got {tensor.dtype} {tuple(tensor.shape)}")
            self._packed[name] = _clear_padding(tensor, shape[1])
            self._shapes[name] = shape

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(self._packed[name], self._shapes[name][1])

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __contains__(self, name) -> bool:
        return name in self._packed

    def shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def packed(self, name: str) -> torch.Tensor:
        """The packed uint8 tensor itself (shared, not a copy: do not modify it)."""
        return self._packed[name]

    def kept_count(self, name: str) -> int:
        """Kept entries of one mask, counted on the packed bits."""
        return packed_kept_count(self._packed[name])

    def nbytes(self) -> int:
        """Bytes the packed masks hold."""
        return sum(t.numel() for t in self._packed.values())

    def __repr__(self) -> str:
        return f"PackedMasks({len(self._packed)} matrices, {self.nbytes()} bytes packed)"


def mask_shapes(masks: Mapping) -> dict[str, tuple[int, int]]:
    """Every mask's shape, without making lazy masks or unpacking packed ones."""
    if isinstance(masks, (LazyMasks, PackedMasks)):
        return masks.shapes()
    return {name: tuple(mask.shape) for name, mask in masks.items()}


def count_pruned(masks: Mapping) -> dict[str, int]:
    """Pruned entries per mask; packed masks are counted without unpacking."""
    if isinstance(masks, PackedMasks):
        return {name: math.prod(shape) - masks.kept_count(name) for name, shape in masks.shapes().items()}
    # count_nonzero, not (~mask).sum(): no temporary tensor, ~30x faster on big masks
    return {name: mask.numel() - int(mask.count_nonzero()) for name, mask in masks.items()}


@dataclass
class MaskSet:
    """Masks for one model, optional updated weights (methods that update weights), metadata."""

    masks: Mapping[str, torch.Tensor]  # a dict, LazyMasks (made on first read) or PackedMasks
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    pruned: dict[str, int] | None = None  # pruned weights per matrix; counted once, on demand
    # output biases to set (structured bias compensation, FLAP); a module without a bias gets one
    biases: dict[str, torch.Tensor] = field(default_factory=dict)
    # prunable matrices deliberately left dense (N:M misfits skipped): no mask, 0 pruned, but
    # counted in the whole-model sparsity, the allocation and the saved file's metadata
    dense_layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self):
        # the masks `pruned` counts: counts given with other masks (the mapping replaced since) are stale
        self._counted = self.masks if self.pruned is not None else None

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
        knows them without counting, and then no lazy mask is made for them; packed masks are
        counted on their bits, none unpacked."""
        if self.pruned is None or self._counted is not self.masks or set(self.pruned) != set(self.masks):
            self.pruned = count_pruned(self.masks)
            self._counted = self.masks
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
        counts, shapes = count_pruned(masks), mask_shapes(masks)
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
    """Write through a temporary file in the same folder, then rename: never a half file; a disk
    that fills ends in one DiskFullError (core.outputs.atomic_write)."""
    from .outputs import atomic_write

    atomic_write(path, write)


def save_masks(path: str | Path, mask_set: MaskSet, lm: LoadedModel) -> Path:
    """safetensors: one packed uint8 tensor per mask (canonical layout, PACKING), a weight-updating
    method's new weights and biases, string metadata. Written one tensor at a time: new weights that
    live in an offloaded model are read one matrix at a time, never all at once."""
    from .tensor_store import write_safetensors

    path = Path(path)
    masks = mask_set.masks
    if isinstance(masks, PackedMasks):  # already packed: written as held, nothing unpacked
        tensors = {f"mask/{name}": masks.packed(name).contiguous() for name in masks}
    else:
        tensors = {f"mask/{name}": pack_mask(mask) for name, mask in masks.items()}
    entries = [(key, lambda t=tensor: t, tensor.dtype, tuple(tensor.shape)) for key, tensor in tensors.items()]
    # What the file records about its masks is counted on the very bits it holds (a popcount of
    # each packed mask), so that load_masks can hold every file to its own numbers.
    shapes_of = mask_set.shapes()
    pruned = {name: math.prod(shapes_of[name]) - packed_kept_count(tensors[f"mask/{name}"]) for name in masks}
    modules, shapes = lm.prunable(), mask_set.shapes()
    for name in mask_set.weights:
        if hasattr(mask_set.weights, "track"):  # the model's own (CurrentWeights): read when written
            dtype, shape = modules[name].weight.dtype, shapes[name]
        else:
            weight = mask_set.weights[name]
            dtype, shape = weight.dtype, tuple(weight.shape)
        entries.append((f"weight/{name}", lambda n=name: mask_set.weights[n], dtype, shape))
    entries += [(f"bias/{name}", lambda b=b: b, b.dtype, tuple(b.shape)) for name, b in mask_set.biases.items()]
    # The mask set's own metadata first: the keys below describe this file and this model and
    # must win over stale copies carried in by a mask set that was itself loaded from a file.
    meta = {key: value if isinstance(value, str) else json.dumps(value) for key, value in mask_set.meta.items()}
    meta.update({
        "format": "pruning-explorer-masks",
        "format_version": FORMAT_VERSION,
        **written_with(lm),
        "model_type": lm.config.model_type,
        "layout": "canonical (d_out, d_in), True/1 = keep",
        "packing": PACKING,
        "achieved_sparsity": f"{_total_sparsity(pruned, shapes_of, mask_set.dense_layers):.6f}",
        "allocation": json.dumps(_allocation(pruned, shapes_of, mask_set.dense_layers)),
        # pruned weights per mask, exactly: load_masks compares them with the bits
        "pruned_counts": json.dumps(pruned),
        # the matrices this file has no mask for on purpose (left dense); load_masks refuses others
        "skipped_layers": json.dumps(mask_set.skipped_layers),
    })
    _atomic_write(path, lambda tmp: write_safetensors(tmp, entries, meta))
    return path


def _allocation(pruned: dict[str, int], shapes: Mapping[str, tuple[int, int]],
                dense_layers: Mapping[str, tuple[int, int]]) -> dict[str, float]:
    """A file's `allocation`: every matrix's sparsity rounded to 6 decimals, those left dense 0.0."""
    out = {name: round(count / math.prod(shapes[name]), 6) for name, count in pruned.items()}
    out.update({name: 0.0 for name in dense_layers if name not in out})
    return out


def _total_sparsity(pruned: dict[str, int], shapes: Mapping[str, tuple[int, int]],
                    dense_layers: Mapping[str, tuple[int, int]]) -> float:
    """Pruned fraction of the masked matrices and those left dense (as MaskSet.total_sparsity)."""
    total = sum(math.prod(shapes[name]) for name in pruned)
    total += sum(math.prod(shape) for name, shape in dense_layers.items() if name not in pruned)
    return sum(pruned.values()) / max(total, 1)


def load_masks(path: str | Path, lm: LoadedModel, allow_other_model: bool = False) -> MaskSet:
    """Read a mask file; refuse it clearly if it is corrupt or made for another model.

    Reads format versions 2 (packed) and 1 (a uint8 per weight); the masks come back as
    PackedMasks either way, and a version-1 file is packed one mask at a time as it is read.

    A file is held to its own metadata before anything is returned: every tensor is a mask/,
    weight/ or bias/ entry of one of the model's matrices; new weights and biases are finite
    floating-point tensors of the matrix's shape; the matrices it leaves dense are misfits of
    its own N:M pattern; the pruned weights it records per matrix (`pruned_counts`, exactly;
    `allocation` and `achieved_sparsity`, to their 6 decimals) are what its bits hold, counted
    on the packed masks (a popcount each, nothing unpacked). Anything else is a MaskFileError
    naming the first thing that differs."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MaskFileError(f"No mask file at {path}.")
    with contextlib.ExitStack() as stack:
        try:
            fh = stack.enter_context(safe_open(str(path), framework="pt"))
            meta = fh.metadata() or {}
            keys = list(fh.keys())
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise _unreadable(path, exc) from exc
        _check_header(path, meta, lm, allow_other_model)
        packed_file = meta["format_version"] == "2"
        shapes = {name: tuple(lm.family.weight_view(m).shape) for name, m in lm.prunable().items()}
        packed, weights, biases = {}, {}, {}
        for key in keys:
            kind, slash, name = key.partition("/")
            if not slash or kind not in TENSOR_KINDS:
                raise MaskFileError(
                    f"{path} holds a tensor named {key!r}; a mask file holds only mask/, weight/ and bias/ "
                    "tensors of the model's matrices. The file is damaged or not written by this tool: export "
                    "the masks again.")
            if name not in shapes:
                what = {"mask": "a mask", "weight": "new weights", "bias": "a bias"}[kind]
                raise MaskFileError(f"{path} has {what} for {name!r}, which the loaded model does not have.")
            try:
                tensor = fh.get_tensor(key)
            except Exception as exc:
                raise _unreadable(path, exc) from exc
            if kind == "mask" and packed_file:
                packed[name] = _checked_packed(path, name, tensor, shapes[name])
                continue
            expected = shapes[name][:1] if kind == "bias" else shapes[name]
            if tuple(tensor.shape) != expected:
                raise MaskFileError(f"{path}: {name} has shape {tuple(tensor.shape)} but the model's is "
                                    f"{expected}; the file belongs to another model.")
            if kind == "mask":  # version 1: one uint8 per weight, packed now
                packed[name] = pack_mask(_checked_bytes(path, name, tensor))
            else:
                (biases if kind == "bias" else weights)[name] = _checked_values(path, key, tensor)
    # A matrix without a mask would silently stay dense: only those the file records as left
    # dense on purpose (N:M misfits skipped) may be missing.
    recorded = set(_json_list(meta.get("skipped_layers")))
    missing = [name for name in shapes if name not in packed]
    unexplained = [name for name in missing if name not in recorded]
    if unexplained:
        shown = ", ".join(unexplained[:5]) + (f" and {len(unexplained) - 5} more" if len(unexplained) > 5 else "")
        raise MaskFileError(
            f"{path} has no mask for {len(unexplained)} of the model's {len(shapes)} prunable matrices "
            f"({shown}), and does not record them as left dense; applying it would leave them dense. "
            "The file is incomplete: export the masks again.")
    _check_skipped(path, meta, shapes, packed, recorded, missing)
    pruned = _check_counts(path, meta, shapes, packed, missing)
    masks = PackedMasks(packed=packed, shapes={name: shapes[name] for name in packed})
    keep = {k: v for k, v in meta.items() if k not in ("allocation", "pruned_counts")}
    return MaskSet(masks=masks, weights=weights, meta=keep, biases=biases, pruned=pruned,
                   dense_layers={name: shapes[name] for name in missing})


def _unreadable(path: Path, exc: Exception) -> MaskFileError:
    return MaskFileError(
        f"{path} is not a readable safetensors mask file ({exc}). It may be truncated or "
        "corrupt; export the masks again.")


def _check_header(path: Path, meta: dict, lm: LoadedModel, allow_other_model: bool) -> None:
    """Refuse a file that is not ours, of a format version this tool cannot read, or (unless
    allowed) made for another model."""
    if meta.get("format") != "pruning-explorer-masks":
        raise MaskFileError(f"{path} is a safetensors file but not a mask file written by this tool.")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        found = f"mask format version {version}" if version is not None else "no mask format version"
        raise MaskFileError(
            f"{path} has {found}; this tool reads versions {' and '.join(READABLE_VERSIONS)} (it writes "
            f"{FORMAT_VERSION}). The file was written by another version of this tool: open it with "
            "that version, or export the masks again with this one.")
    if version == "2" and meta.get("packing", PACKING) != PACKING:
        raise MaskFileError(
            f"{path} records its masks packed as {meta['packing']!r}; this tool reads version 2 "
            f"packed as {PACKING!r}. Export the masks again with this tool.")
    problem = None if allow_other_model else mismatch(meta, lm, str(path), "make the masks again on this one.")
    if problem is not None:
        raise MaskFileError(problem)


def _checked_packed(path: Path, name: str, tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A version-2 mask tensor, refused unless it is uint8 of the model matrix's packed shape."""
    expected = packed_shape(shape)
    if tensor.dtype != torch.uint8:
        raise MaskFileError(f"{path}: the mask of {name} is stored as {tensor.dtype}, not as packed uint8 "
                            "bits; the file is damaged or not written by this tool. Export the masks again.")
    if tuple(tensor.shape) != expected:
        raise MaskFileError(
            f"{path}: {name} has a packed mask of shape {tuple(tensor.shape)} but the model's {shape} matrix "
            f"packs to {expected} (8 inputs per byte); the file belongs to another model.")
    spare = -shape[1] % 8
    if spare and tensor.numel() and bool((tensor[:, -1] & ((1 << spare) - 1)).any()):
        raise MaskFileError(
            f"{path}: the packed mask of {name} has bits set past the last of its {shape[1]} inputs in some "
            "rows; pack_mask leaves those padding bits 0, so the file was changed after it was written. "
            "Export the masks again.")
    return tensor


def _checked_bytes(path: Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A version-1 mask (one byte per weight): uint8 or bool, every entry 0 or 1."""
    if tensor.dtype not in (torch.uint8, torch.bool):
        raise MaskFileError(f"{path}: the mask of {name} is stored as {tensor.dtype}, not as uint8 0/1 entries; "
                            "the file is damaged or not written by this tool. Export the masks again.")
    if tensor.dtype == torch.uint8 and tensor.numel() and int(tensor.max()) > 1:
        raise MaskFileError(f"{path}: the mask of {name} holds entries other than 0 and 1 (up to "
                            f"{int(tensor.max())}); the file is damaged. Export the masks again.")
    return tensor.bool()


def _checked_values(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """New weights or a bias: a floating-point tensor, every entry finite (shape checked before)."""
    if not tensor.dtype.is_floating_point:
        raise MaskFileError(f"{path}: {key} is stored as {tensor.dtype}; new weights and biases are floating-point "
                            "tensors. The file is damaged or not written by this tool: export the masks again.")
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MaskFileError(f"{path}: {key} holds {bad} NaN or infinite value{'s' if bad > 1 else ''}; applying "
                            "it would break the model. The file is damaged: export the masks again.")
    return tensor


def _check_skipped(path: Path, meta: dict, shapes: dict[str, tuple[int, int]], packed: dict,
                   recorded: set, missing: list[str]) -> None:
    """The matrices a file records as left dense must be misfits of its own N:M pattern: only an
    N:M cut skips layers, and only those whose input width is not a multiple of M. A file that
    records no pattern at all (a MaskSet built by hand) keeps its dense layers; dense_note then
    does not call them misfits."""
    unknown = sorted(name for name in recorded if name not in shapes)
    if unknown:
        raise MaskFileError(f"{path} records {unknown[0]!r} as left dense, but the loaded model has no such matrix; "
                            "the file's metadata is damaged. Export the masks again.")
    masked = [name for name in shapes if name in recorded and name in packed]
    if masked:
        raise MaskFileError(f"{path} records {masked[0]} as left dense but also holds a mask for it; the file's "
                            "metadata is damaged. Export the masks again.")
    if not missing:
        return
    if "pattern" not in meta:
        return
    text = meta.get("pattern")
    pattern = _nm_pattern(meta)
    if pattern is None:
        raise MaskFileError(
            f"{path} leaves {len(missing)} matrices dense (e.g. {missing[0]}) as N:M misfits, but its pattern is "
            f"{text!r}: only an N:M pattern leaves layers dense. The file's metadata is damaged; export the "
            "masks again.")
    fitting = [name for name in missing if shapes[name][1] % pattern.m == 0]
    if fitting:
        name = fitting[0]
        raise MaskFileError(
            f"{path} leaves {name} dense as a {pattern} misfit, but its input width {shapes[name][1]} is a multiple "
            f"of {pattern.m}: {pattern} fits it. The file's metadata is damaged; export the masks again.")


def _nm_pattern(meta: dict) -> Pattern | None:
    """The N:M pattern a mask set's metadata records; None for any other (or none)."""
    text = meta.get("pattern")
    try:
        pattern = parse_pattern(text) if isinstance(text, str) else None
    except PatternError:
        return None
    return pattern if pattern is not None and pattern.is_nm else None


def _recorded_json(path: Path, meta: dict, key: str):
    """A dict kept in metadata as JSON text; None when the file has none (older files)."""
    if key not in meta:
        return None
    try:
        value = json.loads(meta[key])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise MaskFileError(f"{path} has damaged {key!r} metadata (not a JSON object); export the masks again.")
    return value


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _check_counts(path: Path, meta: dict, shapes: dict[str, tuple[int, int]], packed: dict,
                  missing: list[str]) -> dict[str, int]:
    """Hold a file to the pruned weights it records: `pruned_counts` exactly (files written since
    it exists), `allocation` per matrix and `achieved_sparsity` as save_masks rounded them (to 6
    decimals, from the same integer counts: a file save_masks wrote always matches). Counted on
    the packed bits, padding 0 (checked before): a popcount per matrix, nothing unpacked. Returns
    the counts (pruned weights per mask), which the MaskSet keeps instead of counting again."""
    names = [name for name in shapes if name in packed]
    pruned = {name: math.prod(shapes[name]) - packed_kept_count(packed[name]) for name in names}
    dense = {name: shapes[name] for name in missing}
    again = "; the masks or the metadata were changed after the file was written. Export the masks again."
    counts = _recorded_json(path, meta, "pruned_counts")
    if counts is not None:
        for name in names:
            value = counts.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value != pruned[name]:
                raise MaskFileError(f"{path}: the mask of {name} prunes {pruned[name]} of {math.prod(shapes[name])} "
                                    f"weights, but the file records {value!r}{again}")
        extra = [name for name in counts if name not in pruned]
        if extra:
            raise MaskFileError(f"{path} records pruned weights for {extra[0]!r}, which it has no mask for{again}")
    allocation = _recorded_json(path, meta, "allocation")
    if allocation is not None:
        counted = _allocation(pruned, shapes, dense)
        for name, value in counted.items():
            recorded = _number(allocation.get(name))
            if recorded is None or not abs(recorded - value) <= 1e-9:
                what = "left dense (sparsity 0)" if name in dense else f"sparsity {value:.6f}"
                raise MaskFileError(f"{path}: {name} is {what} in the file's masks, but its recorded allocation "
                                    f"says {allocation.get(name)!r}{again}")
        extra = [name for name in allocation if name not in counted]
        if extra:
            raise MaskFileError(f"{path}: its recorded allocation names {extra[0]!r}, which the file neither "
                                f"masks nor leaves dense{again}")
    if "achieved_sparsity" in meta:
        total = _total_sparsity(pruned, shapes, dense)
        try:
            recorded = float(meta["achieved_sparsity"])
        except (TypeError, ValueError):
            recorded = math.nan
        if not abs(recorded - float(f"{total:.6f}")) <= 1e-9:
            raise MaskFileError(f"{path}: its masks prune {total:.6f} of the weights, but the file records an "
                                f"achieved sparsity of {meta['achieved_sparsity']!r}{again}")
    return pruned


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
    pattern = _nm_pattern(mask_set.meta)
    why = f"{pattern} does not fit their width" if pattern is not None else "as recorded; no N:M pattern is recorded"
    return (f"{len(names)} of {total} matrices left dense ({why}): {shown}; "
            f"whole-model sparsity {mask_set.total_sparsity():.1%}.")
