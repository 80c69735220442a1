"""A session in one file: every run (its calibration artifact, or its masks where it has none),
each run's settings and the perplexities measured. safetensors (tensors) plus JSON in its string
metadata: never a pickle. Reopening it on the same model restores the runs without calibrating.

Per run i the file holds, under the prefix "run{i}/":
- "artifact/<key>": the calibration artifact's own tensors (as core.artifacts writes them; its
  metadata is kept in the run's JSON), where the run has one;
- "mask/<matrix>" (core.packing.pack_mask's bits: uint8 (d_out, ceil(d_in / 8)), 8 inputs per byte
  along each row, 1 = keep), "weight/<matrix>", "bias/<matrix>": the run's current masks, where
  they cannot be cut again in a moment: imported mask files, structured runs, and methods that
  re-solve weights (SparseGPT), so that reopening never solves or prunes. They reopen as
  core.packing.PackedMasks (1 bit per weight). Files of format version 1 held each mask as one
  flat np.packbits row (d_out * d_in bits); they still open, packed per row as they are read;
- "windows": a structured run's calibration token ids (the slider prunes it again from them).
A run with a score artifact (Wanda, OWL, UniPruning ...) is cut again on reopening (lazily: a
fraction of a second), at the sparsity and pattern it was saved at.

The metadata says which model made the file (fingerprint, as mask files do): a file for another
model is refused, so is a file that is truncated, not this format, or whose tensors do not match
the loaded model.
"""
from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path

import numpy as np
import torch

from core.artifacts import ARTIFACT_FORMAT, ARTIFACT_VERSION, artifact_from_tensors, artifact_tensors
from core.errors import MaskFileError
from core.fingerprint import mismatch, written_with
from core.maskset import MaskSet
from core.patterns import parse_pattern
from core.run_source import ArtifactCut, FixedMasks, StructuredReprune
from core.outputs import atomic_write
from core.packing import PackedMasks, pack_mask, packed_shape
from core.tensor_store import FileStore, write_safetensors

from .state import ModelEntry, Run, Session
from .structured_view import reprune_source

FORMAT = "pruning-explorer-session"
VERSION = "2"  # what save_session writes: masks packed per row, as core.packing.pack_mask packs them
READABLE_VERSIONS = ("1", "2")  # 1: each mask one flat np.packbits row


class SessionFileError(MaskFileError):
    """A session file that cannot be reopened here (the message says why and what to do)."""


# ---------------------------------------------------------------- masks of version-1 files

def unpack_flat_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    """A version-1 file's mask: one flat np.packbits row of the whole (d_out, d_in) matrix, as bool."""
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != -(-n // 8):
        raise ValueError(f"{bits.numel()} bytes cannot hold a {tuple(shape)} mask")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(np.bool_)).reshape(tuple(shape))


# ---------------------------------------------------------------- save

def _keeps_masks(run: Run) -> bool:
    """Whether a run's masks go into the file: they cannot be cut again in a moment (a fixed mask,
    a structured prune, a weight-updating solve)."""
    return run.source is None or not run.source.cheap


def _meta_json(meta):
    return json.loads(json.dumps(meta, default=str))


def _entry(key: str, tensor: torch.Tensor) -> tuple:
    """A tensor already in memory (or mapped), as write_safetensors' (key, reader, dtype, shape)."""
    tensor = tensor.detach()
    return key, lambda: tensor, tensor.dtype, tuple(tensor.shape)


def _once(entries: list[tuple]) -> list[tuple]:
    """Each key once (its first entry). core.artifacts.artifact_tensors lists the statistics of an
    artifact read from a file (a reopened run's) twice: as keys of that file and as the artifact's
    statistics; written twice, the header would keep one and leave a gap safetensors refuses."""
    seen: set[str] = set()
    return [e for e in entries if not (e[0] in seen or seen.add(e[0]))]


def _mask_entry(key: str, masks: MaskSet, name: str, shape) -> tuple:
    """A run's mask of one matrix as pack_mask packs it, packed when the file is written (one matrix
    at a time); masks held packed are written as held, nothing unpacked."""
    held = masks.masks
    if isinstance(held, PackedMasks):
        return key, lambda: held.packed(name).contiguous(), torch.uint8, packed_shape(shape)
    return key, lambda: pack_mask(held[name]), torch.uint8, packed_shape(shape)


def save_session(path: str | Path, session: Session) -> Path:
    """Write the session's runs, settings and perplexities to one safetensors file (atomically),
    streamed: one tensor in memory at a time, the artifacts' read from wherever they live."""
    if session.model is None or len(session.runs) == 0:
        raise ValueError("Nothing to save yet: calibrate (or import a mask file) first.")
    lm = session.model.lm
    path = Path(path)
    entries: list[tuple] = []
    runs_meta = []
    for i, run in enumerate(session.runs):
        prefix = f"run{i}/"
        item = {"id": run.id, "name": run.name, "method": run.method, "params": _meta_json(run.params),
                "pattern": run.pattern, "text": run.text, "origin": run.origin, "sparsity": run.sparsity,
                "visible": run.visible, "kind": run.kind, "stored": []}
        if run.artifact is not None:  # the artifact's own tensors and metadata, as core writes them
            tensors, item["artifact_meta"] = artifact_tensors(run.artifact, lm, prefix=f"{prefix}artifact/")
            entries += _once(tensors)
            item["stored"].append("artifact")
        if isinstance(run.source, StructuredReprune):
            srun = run.source
            entries.append(_entry(f"{prefix}windows", srun.windows))
            item["structured"] = {"method": srun.method, "params": _meta_json(srun.params),
                                  "protocol": _meta_json(srun.protocol), "seconds": srun.seconds}
            item["stored"].append("windows")
        if run.masks is not None and _keeps_masks(run):
            m = run.masks
            shapes = m.shapes()
            entries += [_mask_entry(f"{prefix}mask/{name}", m, name, shape) for name, shape in shapes.items()]
            entries += [_entry(f"{prefix}weight/{name}", w) for name, w in m.weights.items()]
            entries += [_entry(f"{prefix}bias/{name}", b) for name, b in m.biases.items()]
            item["masks_meta"] = _meta_json(m.meta)
            item["mask_shapes"] = {n: list(s) for n, s in shapes.items()}
            item["dense_layers"] = {n: list(s) for n, s in m.dense_layers.items()}
            item["stored"].append("masks")
        runs_meta.append(item)
    active = next((i for i, r in enumerate(session.runs) if r is session.active), 0)
    meta = {"format": FORMAT, "format_version": VERSION, **written_with(lm), "runs": json.dumps(runs_meta),
            "active": str(active),
            "slider": json.dumps({"sparsity": session.sparsity, "pattern": session.pattern,
                                  "alloc_mode": session.alloc_mode}),
            "ppl_runs": json.dumps(_meta_json(session.ppl_runs)), "ppl_dense": json.dumps(session.ppl_dense)}
    atomic_write(path, lambda tmp: write_safetensors(tmp, entries, meta))
    return path


# ---------------------------------------------------------------- reopen

def read_header(path: str | Path) -> dict:
    """The file's metadata (no tensor read): refuses what is not a readable session file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SessionFileError(f"No session file at {path}.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if meta.get("format") != FORMAT:
        kind = {"pruning-explorer-masks": "a mask file (import it with Import masks)",
                "pruning-explorer-artifact": "a calibration artifact"}.get(meta.get("format"), "not a session file")
        raise SessionFileError(f"{path.name} is {kind}, not a session file saved by the explorer.")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise SessionFileError(f"{path.name} has session format {meta.get('format_version')}; this explorer reads "
                               f"{' and '.join(READABLE_VERSIONS)}.")
    return meta


def _unreadable(path: Path, exc: Exception) -> SessionFileError:
    return SessionFileError(f"{path.name} is not a readable safetensors session file ({exc}). It may be "
                            "truncated or corrupt: save the session again.")


def _json(meta: dict, key: str, path: Path, default=None):
    try:
        return json.loads(meta[key]) if key in meta else default
    except (TypeError, ValueError) as exc:
        raise SessionFileError(f"{path.name}: its {key!r} metadata is not valid JSON ({exc}); the file was "
                               "altered. Save the session again.") from None


def _open(path: Path) -> FileStore:
    """The session file's tensors, memory-mapped where they lie (nothing is copied), through a
    file descriptor kept open as long as the store lives (the runs' artifacts read from it lazily):
    gradio deletes an uploaded file from its cache after a while (DELETE_CACHE), and a file saved
    over it would replace it, but an open file stays readable as it was. Where the system has no
    /proc/self/fd (not Linux) the store reads the file by its path: a reopened run cannot be cut
    again once that file is deleted or replaced (its masks as they were stay usable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        through = Path(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else path
        store = FileStore(through, "the session's runs")
    except BaseException:
        os.close(fd)
        raise
    weakref.finalize(store, os.close, fd)
    return store


def _packed_mask(tensor: torch.Tensor, shape: tuple[int, int], version: str) -> torch.Tensor:
    """A stored mask as pack_mask's bits, in memory (so that the run's masks outlive the file): as
    stored (version 2), or packed per row from a version-1 file's flat bits."""
    if version == "1":
        return pack_mask(unpack_flat_mask(tensor, shape))
    if tensor.dtype != torch.uint8 or tuple(tensor.shape) != packed_shape(shape):
        raise ValueError(f"a {tuple(shape)} mask packs to uint8 {packed_shape(shape)}, not {tensor.dtype} "
                         f"{tuple(tensor.shape)}")
    return tensor.clone()


def _masks_from(store: FileStore, prefix: str, item: dict, shapes: dict, path: Path, version: str) -> MaskSet:
    """A run's stored masks (as PackedMasks), weights and biases, checked against the loaded model."""
    name_of = item.get("name")
    recorded = item.get("mask_shapes") or {}
    masks, weights, biases = {}, {}, {}
    for key in sorted(k for k in store.keys() if k.startswith(prefix)):
        kind, _, name = key[len(prefix):].partition("/")
        if kind not in ("mask", "weight", "bias"):
            continue
        if name not in shapes:
            raise SessionFileError(f"{path.name}: run {name_of!r} has a mask for {name!r}, which the loaded model "
                                   "does not have.")
        tensor = store.get(key)
        if kind == "mask":
            if list(recorded.get(name, [])) != list(shapes[name]):
                raise SessionFileError(f"{path.name}: run {name_of!r}: {name} is recorded as {recorded.get(name)}, "
                                       f"the model's is {list(shapes[name])}; the file was altered.")
            try:
                masks[name] = _packed_mask(tensor, shapes[name], version)
            except ValueError as exc:
                raise SessionFileError(f"{path.name}: run {name_of!r}: the mask of {name} is damaged ({exc}).") from None
            continue
        expected = shapes[name][:1] if kind == "bias" else shapes[name]
        if tuple(tensor.shape) != tuple(expected):
            raise SessionFileError(f"{path.name}: run {name_of!r}: {name} has shape {tuple(tensor.shape)}, the "
                                   f"model's is {tuple(expected)}; the file was altered.")
        (biases if kind == "bias" else weights)[name] = tensor
    dense_layers = {n: tuple(s) for n, s in (item.get("dense_layers") or {}).items()}
    missing = [n for n in shapes if n not in masks and n not in dense_layers]
    if missing:
        raise SessionFileError(f"{path.name}: run {name_of!r} lacks the masks of {len(missing)} matrices "
                               f"(e.g. {missing[0]}); the file is incomplete. Save the session again.")
    packed = PackedMasks(packed=masks, shapes={n: shapes[n] for n in masks})
    return MaskSet(masks=packed, weights=weights, meta=dict(item.get("masks_meta") or {}), biases=biases,
                   dense_layers=dense_layers)


def _artifact_from(store: FileStore, path: Path, prefix: str, item: dict, entry: ModelEntry, run_name: str):
    """A run's artifact: core's Artifact over the session file's keys under "run{i}/artifact/"
    (memory-mapped, read when a cut needs them), refused as core.artifacts.load_artifact refuses an
    artifact file of another format or model."""
    meta = item.get("artifact_meta")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SessionFileError(f"{path.name}: run {run_name!r}'s calibration metadata is damaged; the file was altered.")
    refused = (f"{path.name}: run {run_name!r}'s calibration cannot be restored ({{}}); the file was altered: save "
               "the session again.")
    if meta.get("format") != ARTIFACT_FORMAT or meta.get("format_version") != ARTIFACT_VERSION:
        raise SessionFileError(refused.format(f"it is not a calibration artifact of format version {ARTIFACT_VERSION}"))
    problem = mismatch(meta, entry.lm, "it", "calibrate again on this one.", made="calibrated on")
    if problem is not None:
        raise SessionFileError(f"{path.name}: run {run_name!r}'s calibration cannot be restored: {problem}")
    try:
        return artifact_from_tensors(store, meta, entry.lm, entry.dense, prefix=prefix + "artifact/",
                                     where="its artifact")
    except MaskFileError as exc:
        raise SessionFileError(refused.format(str(exc).replace("its artifact: ", ""))) from None
    except Exception as exc:
        raise SessionFileError(f"{path.name}: run {run_name!r}'s calibration is damaged ({type(exc).__name__}: "
                               f"{exc}); save the session again.") from None


def read_session(path: str | Path, entry: ModelEntry, workdir: Path | None = None) -> dict:
    """Everything a session file holds, for the loaded model: {"runs": [Run], "active": int,
    "slider": {...}, "ppl_runs": [...], "ppl_dense": {...}}. Refuses (SessionFileError) a file
    for another model, a truncated or altered one. Nothing is copied and no file is written: the
    runs' artifacts read the session file itself (see _open). workdir: unused (reopening used to
    copy the artifacts there), kept for callers."""
    path = Path(path)
    meta = read_header(path)
    lm = entry.lm
    problem = mismatch(meta, lm, path.name, "start a new session on this one.", made="saved with")
    if problem is not None:
        raise SessionFileError(problem)
    items = _json(meta, "runs", path, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise SessionFileError(f"{path.name}: its run list is not what the explorer writes; the file was altered.")
    slider = _json(meta, "slider", path, {}) or {}
    ppl_runs = _json(meta, "ppl_runs", path, []) or []
    ppl_dense = _json(meta, "ppl_dense", path, {}) or {}
    try:
        store = _open(path)
    except (OSError, ValueError) as exc:
        raise _unreadable(path, exc) from exc
    shapes = entry.dense.shapes()
    version = meta["format_version"]
    runs = [_run_from(store, path, i, item, entry, shapes, version) for i, item in enumerate(items)]
    try:
        active = int(meta.get("active", "0"))
    except ValueError:
        active = 0
    return {"runs": runs, "active": active, "slider": slider if isinstance(slider, dict) else {},
            "ppl_runs": ppl_runs if isinstance(ppl_runs, list) else [],
            "ppl_dense": ppl_dense if isinstance(ppl_dense, dict) else {}}


def _run_from(store: FileStore, path: Path, i: int, item: dict, entry: ModelEntry, shapes: dict,
              version: str) -> Run:
    prefix = f"run{i}/"
    stored = item.get("stored") or []
    try:
        run = Run(id=str(item.get("id") or ""), name=str(item.get("name") or f"run {i + 1}"),
                  method=str(item.get("method") or "imported"), params=dict(item.get("params") or {}),
                  pattern=str(item.get("pattern") or "unstructured"), text=str(item.get("text") or ""),
                  origin="reopened", visible=bool(item.get("visible", True)),
                  sparsity=None if item.get("sparsity") is None else float(item["sparsity"]))
    except (TypeError, ValueError) as exc:
        raise SessionFileError(f"{path.name}: run {i + 1}'s settings are not valid ({exc}).") from None
    if "masks" in stored:
        run.masks = _masks_from(store, prefix, item, shapes, path, version)
    if "windows" in stored:
        s = item.get("structured") or {}
        windows = store.get(prefix + "windows")
        if windows is None:
            raise SessionFileError(f"{path.name}: run {run.name!r} lacks its calibration windows.")
        if windows.dim() != 2:
            raise SessionFileError(f"{path.name}: run {run.name!r}'s calibration windows are damaged.")
        run.source = reprune_source(entry, str(s.get("method", run.method)), dict(s.get("params") or {}), windows,
                                    dict(s.get("protocol") or {}))
        run.source.seconds = float(s.get("seconds") or 0.0)
    if "artifact" in stored:
        run.source = ArtifactCut(_artifact_from(store, path, prefix, item, entry, run.name), skip_misfits=True)
        if run.masks is None:  # a score method: cut again at the saved settings (lazily: a moment)
            if run.sparsity is None:
                raise SessionFileError(f"{path.name}: run {run.name!r} has no sparsity to cut at.")
            try:
                run.masks = run.source.masks_at(run.sparsity, parse_pattern(run.pattern))
            except Exception as exc:
                raise SessionFileError(f"{path.name}: run {run.name!r} cannot be cut at its saved settings "
                                       f"({exc}); the file was altered.") from None
    if run.masks is None:
        raise SessionFileError(f"{path.name}: run {run.name!r} has neither a calibration nor masks; the file "
                               "is incomplete.")
    if run.source is None:
        run.source = FixedMasks(run.masks)
    return run


def restore(session: Session, content: dict) -> None:
    """Replace the session's runs and perplexities with a reopened file's."""
    session.reset_pruning()  # the session's own runs (and their files) go
    ids = {}
    for run in content["runs"]:
        old = run.id
        session.runs.add(run, activate=False)
        ids[old] = run.id
    runs = list(session.runs)
    if runs:
        session.runs.active_id = runs[min(max(content["active"], 0), len(runs) - 1)].id
    slider = content["slider"]
    try:
        session.sparsity = float(slider.get("sparsity", session.sparsity))
    except (TypeError, ValueError):
        pass
    session.pattern = str(slider.get("pattern", session.pattern))
    session.alloc_mode = "type" if slider.get("alloc_mode") == "type" else "block"
    points = [p for p in content["ppl_runs"] if isinstance(p, dict) and {"sparsity", "ppl", "protocol", "method", "pattern"} <= set(p)]
    for p in points:
        if p.get("run_id") in ids:
            p["run_id"] = ids[p["run_id"]]
    session.ppl_runs[:] = points
    session.ppl_dense.clear()
    session.ppl_dense.update({str(k): float(v) for k, v in content["ppl_dense"].items()
                              if isinstance(v, (int, float))})
