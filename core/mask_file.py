"""The mask file: save_masks / load_masks, and every check a file is held to before it loads.

safetensors: one packed uint8 tensor per mask (core.packing's PACKING, format version 2; version
1 held a uint8 per weight and still loads), a weight-updating method's new weights and biases,
and string metadata (the model's fingerprint, the method, pattern, allocation, pruned counts).
"""
from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MaskFileError
from .fingerprint import mismatch, written_with
from .maskset import MaskSet
from .loaded_model import LoadedModel
from .outputs import atomic_write
from .packing import PACKING, PackedMasks, pack_mask, packed_kept_count, packed_shape
from .patterns import recorded_nm_pattern
from .tensor_store import write_safetensors

FORMAT_VERSION = "2"  # what save_masks writes: masks packed 8 inputs per byte
READABLE_VERSIONS = ("1", "2")  # 1: one uint8 per weight, as written before packing
TENSOR_KINDS = ("mask", "weight", "bias")  # a file's tensors: f"{kind}/{matrix name}"


def save_masks(path: str | Path, mask_set: MaskSet, lm: LoadedModel) -> Path:
    """safetensors: one packed uint8 tensor per mask (canonical layout, PACKING), a weight-updating
    method's new weights and biases, string metadata. Written one tensor at a time: new weights that
    live in an offloaded model are read one matrix at a time, never all at once."""
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
    atomic_write(path, lambda tmp: write_safetensors(tmp, entries, meta))
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
    pattern = recorded_nm_pattern(meta)
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


