"""A session in one file: every run (its calibration artifact, or its masks where it has none),
each run's settings and the perplexities measured. safetensors (tensors) plus JSON in its string
metadata: never a pickle. Reopening it on the same model restores the runs without calibrating.

Per run i the file holds, under the prefix "run{i}/":
- "artifact/<key>": the calibration artifact's own tensors (as core.artifacts writes them; its
  metadata is kept in the run's JSON), where the run has one;
- "mask/<matrix>" (uint8, 1 = keep), "weight/<matrix>", "bias/<matrix>": the run's current masks,
  where they cannot be cut again in a moment: imported mask files, structured runs, and methods
  that re-solve weights (SparseGPT), so that reopening never solves or prunes;
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
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from core.errors import MaskFileError
from core.masks import MaskSet, parse_pattern
from core.pruning import cut

from .state import ModelEntry, Run, Session
from .structured_view import StructuredRun

FORMAT = "pruning-explorer-session"
VERSION = "1"


class SessionFileError(MaskFileError):
    """A session file that cannot be reopened here (the message says why and what to do)."""


# ---------------------------------------------------------------- safetensors, streamed

# safetensors' dtype names
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_COPY_CHUNK = 16 * 2**20


def read_layout(path: str | Path) -> tuple[dict, dict, int]:
    """(tensors {key: {"dtype", "shape", "data_offsets"}}, metadata, where the data starts) of a
    safetensors file, from its header alone."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("the file is shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError("the header is too large")
        text = fh.read(n)
        if len(text) != n:
            raise ValueError("the header is cut short")
    header = json.loads(text)
    meta = header.pop("__metadata__", None) or {}
    return header, meta, 8 + n


class _Writer:
    """A safetensors file written piece by piece: tensors from memory, or byte ranges copied from
    another safetensors file (an artifact), never all of it in memory."""

    def __init__(self):
        self.items: list[tuple[str, str, list, int, object]] = []  # key, dtype, shape, nbytes, source

    def tensor(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        self.items.append((key, _DTYPES[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size(),
                           tensor))

    def copy(self, key: str, dtype: str, shape: list, path: str, start: int, end: int) -> None:
        self.items.append((key, dtype, list(shape), end - start, (path, start)))

    def write(self, path: str | Path, metadata: dict[str, str]) -> None:
        header: dict = {"__metadata__": metadata}
        offset = 0
        for key, dtype, shape, n, _ in self.items:
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for _key, _dtype, _shape, n, source in self.items:
                if isinstance(source, torch.Tensor):
                    if n:
                        out.write(memoryview(source.reshape(-1).view(torch.uint8).numpy()))
                    continue
                src_path, start = source
                with open(src_path, "rb") as src:
                    src.seek(start)
                    left = n
                    while left:
                        chunk = src.read(min(left, _COPY_CHUNK))
                        if not chunk:
                            raise ValueError(f"{src_path} ended early")
                        out.write(chunk)
                        left -= len(chunk)


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as bits (uint8, 8 weights a byte): what the file stores."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy().astype(np.bool_)))


def unpack_mask(bits: torch.Tensor, shape) -> torch.Tensor:
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != -(-n // 8):
        raise ValueError(f"{bits.numel()} bytes cannot hold a {tuple(shape)} mask")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(np.bool_)).reshape(tuple(shape))


# ---------------------------------------------------------------- save

def _keeps_masks(run: Run) -> bool:
    """Whether a run's masks go into the file: they cannot be cut again in a moment (no
    calibration, a structured prune, a weight-updating solve)."""
    if run.artifact is None:
        return True
    return bool(run.artifact.method_obj.updates_weights)


def _meta_json(meta):
    return json.loads(json.dumps(meta, default=str))


def save_session(path: str | Path, session: Session) -> Path:
    """Write the session's runs, settings and perplexities to one safetensors file (atomically)."""
    from core.artifacts import save_artifact

    if session.model is None or len(session.runs) == 0:
        raise ValueError("Nothing to save yet: calibrate (or import a mask file) first.")
    lm = session.model.lm
    path = Path(path)
    workdir = Path(tempfile.mkdtemp(prefix="saving-", dir=session.tmpdir()))
    try:
        writer = _Writer()
        runs_meta = []
        for i, run in enumerate(session.runs):
            prefix = f"run{i}/"
            item = {"id": run.id, "name": run.name, "method": run.method, "params": _meta_json(run.params),
                    "pattern": run.pattern, "text": run.text, "origin": run.origin, "sparsity": run.sparsity,
                    "visible": run.visible, "kind": run.kind, "stored": []}
            if run.artifact is not None:  # core's own artifact file, copied in byte for byte
                art = workdir / f"run{i}.artifact.safetensors"
                save_artifact(art, run.artifact, lm)
                layout, meta, start = read_layout(art)
                for key, info in layout.items():
                    b, e = info["data_offsets"]
                    writer.copy(f"{prefix}artifact/{key}", info["dtype"], info["shape"], str(art), start + b, start + e)
                item["artifact_meta"] = meta
                item["stored"].append("artifact")
            if run.structured is not None:
                srun = run.structured
                writer.tensor(f"{prefix}windows", srun.windows)
                item["structured"] = {"method": srun.method, "params": _meta_json(srun.params),
                                      "protocol": _meta_json(srun.protocol), "seconds": srun.seconds}
                item["stored"].append("windows")
            if run.masks is not None and _keeps_masks(run):
                m = run.masks
                shapes = m.shapes()
                for name in shapes:
                    writer.tensor(f"{prefix}mask/{name}", pack_mask(m.masks[name]))
                for name, w in m.weights.items():
                    writer.tensor(f"{prefix}weight/{name}", w)
                for name, b in m.biases.items():
                    writer.tensor(f"{prefix}bias/{name}", b)
                item["masks_meta"] = _meta_json(m.meta)
                item["mask_shapes"] = {n: list(s) for n, s in shapes.items()}
                item["dense_layers"] = {n: list(s) for n, s in m.dense_layers.items()}
                item["stored"].append("masks")
            runs_meta.append(item)
        active = next((i for i, r in enumerate(session.runs) if r is session.active), 0)
        meta = {"format": FORMAT, "format_version": VERSION, "model_id": lm.model_id,
                "model_fingerprint": lm.fingerprint, "runs": json.dumps(runs_meta), "active": str(active),
                "slider": json.dumps({"sparsity": session.sparsity, "pattern": session.pattern,
                                      "alloc_mode": session.alloc_mode}),
                "ppl_runs": json.dumps(_meta_json(session.ppl_runs)), "ppl_dense": json.dumps(session.ppl_dense)}
        _atomic(path, lambda tmp: writer.write(tmp, meta))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
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
        raise SessionFileError(f"{path.name} is not a readable safetensors session file ({exc}). It may be "
                               "truncated or corrupt: save the session again.") from exc
    if meta.get("format") != FORMAT:
        kind = {"pruning-explorer-masks": "a mask file (import it with Import masks)",
                "pruning-explorer-artifact": "a calibration artifact"}.get(meta.get("format"), "not a session file")
        raise SessionFileError(f"{path.name} is {kind}, not a session file saved by the explorer.")
    if meta.get("format_version") != VERSION:
        raise SessionFileError(f"{path.name} has session format {meta.get('format_version')}; this explorer reads "
                               f"{VERSION}.")
    return meta


def _json(meta: dict, key: str, path: Path, default=None):
    try:
        return json.loads(meta[key]) if key in meta else default
    except (TypeError, ValueError) as exc:
        raise SessionFileError(f"{path.name}: its {key!r} metadata is not valid JSON ({exc}); the file was "
                               "altered. Save the session again.") from None


def _masks_from(fh, keys: set, prefix: str, item: dict, shapes: dict, path: Path) -> MaskSet:
    """A run's stored masks (bits), weights and biases, checked against the loaded model."""
    name_of = item.get("name")
    recorded = item.get("mask_shapes") or {}
    masks, weights, biases = {}, {}, {}
    for key in sorted(k for k in keys if k.startswith(prefix)):
        kind, _, name = key[len(prefix):].partition("/")
        if kind not in ("mask", "weight", "bias"):
            continue
        if name not in shapes:
            raise SessionFileError(f"{path.name}: run {name_of!r} has a mask for {name!r}, which the loaded model "
                                   "does not have.")
        tensor = fh.get_tensor(key)
        if kind == "mask":
            if list(recorded.get(name, [])) != list(shapes[name]):
                raise SessionFileError(f"{path.name}: run {name_of!r}: {name} is recorded as {recorded.get(name)}, "
                                       f"the model's is {list(shapes[name])}; the file was altered.")
            try:
                masks[name] = unpack_mask(tensor, shapes[name])
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
    return MaskSet(masks=masks, weights=weights, meta=dict(item.get("masks_meta") or {}), biases=biases,
                   dense_layers=dense_layers)


def _artifact_from(path: Path, layout: dict, start: int, prefix: str, item: dict, entry: ModelEntry,
                   workdir: Path, run_name: str) -> tuple[object, str]:
    """A run's artifact: its bytes copied out into an artifact file of core's own format (kept
    while the run lives: core may read it lazily), loaded by core.artifacts.load_artifact."""
    from core.artifacts import load_artifact

    meta = item.get("artifact_meta")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SessionFileError(f"{path.name}: run {run_name!r}'s calibration metadata is damaged; the file was altered.")
    writer = _Writer()
    head = prefix + "artifact/"
    for key, info in layout.items():
        if key.startswith(head):
            b, e = info["data_offsets"]
            writer.copy(key[len(head):], info["dtype"], info["shape"], str(path), start + b, start + e)
    fd, art = tempfile.mkstemp(dir=workdir, prefix="run-", suffix=".artifact.safetensors")
    os.close(fd)
    try:
        writer.write(art, meta)
        return load_artifact(art, entry.lm, entry.dense), art
    except MaskFileError as exc:
        os.remove(art)
        raise SessionFileError(f"{path.name}: run {run_name!r}'s calibration cannot be restored "
                               f"({str(exc).replace(art + ': ', '').replace(art, 'its artifact')}); the file was "
                               "altered: save the session again.") from None
    except Exception as exc:
        os.remove(art)
        raise SessionFileError(f"{path.name}: run {run_name!r}'s calibration is damaged ({type(exc).__name__}: "
                               f"{exc}); save the session again.") from None


def read_session(path: str | Path, entry: ModelEntry, workdir: Path) -> dict:
    """Everything a session file holds, for the loaded model: {"runs": [Run], "active": int,
    "slider": {...}, "ppl_runs": [...], "ppl_dense": {...}}. Refuses (SessionFileError) a file
    for another model, a truncated or altered one; files it made for runs that were not restored
    are removed."""
    from safetensors import safe_open

    path = Path(path)
    meta = read_header(path)
    lm = entry.lm
    if meta.get("model_fingerprint") != lm.fingerprint:
        raise SessionFileError(
            f"{path.name} was saved with model {meta.get('model_id')!r} (fingerprint {meta.get('model_fingerprint')}), "
            f"not the loaded {lm.model_id!r} (fingerprint {lm.fingerprint}). Load the model it was made for.")
    items = _json(meta, "runs", path, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise SessionFileError(f"{path.name}: its run list is not what the explorer writes; the file was altered.")
    slider = _json(meta, "slider", path, {}) or {}
    ppl_runs = _json(meta, "ppl_runs", path, []) or []
    ppl_dense = _json(meta, "ppl_dense", path, {}) or {}
    layout, _meta, start = read_layout(path)
    shapes = entry.dense.shapes()
    runs: list[Run] = []
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            for i, item in enumerate(items):
                runs.append(_run_from(fh, keys, layout, start, path, i, item, entry, shapes, workdir))
    except BaseException:
        for run in runs:
            for f in run.files:
                _remove(f)
        raise
    try:
        active = int(meta.get("active", "0"))
    except ValueError:
        active = 0
    return {"runs": runs, "active": active, "slider": slider if isinstance(slider, dict) else {},
            "ppl_runs": ppl_runs if isinstance(ppl_runs, list) else [],
            "ppl_dense": ppl_dense if isinstance(ppl_dense, dict) else {}}


def _remove(file: str) -> None:
    try:
        os.remove(file)
    except OSError:
        pass


def _run_from(fh, keys, layout, start, path: Path, i: int, item: dict, entry: ModelEntry, shapes: dict,
              workdir: Path) -> Run:
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
    try:
        if "masks" in stored:
            run.masks = _masks_from(fh, keys, prefix, item, shapes, path)
        if "windows" in stored:
            s = item.get("structured") or {}
            if prefix + "windows" not in keys:
                raise SessionFileError(f"{path.name}: run {run.name!r} lacks its calibration windows.")
            windows = fh.get_tensor(prefix + "windows")
            if windows.dim() != 2:
                raise SessionFileError(f"{path.name}: run {run.name!r}'s calibration windows are damaged.")
            run.structured = StructuredRun(str(s.get("method", run.method)), dict(s.get("params") or {}), windows,
                                           dict(s.get("protocol") or {}), sparsity=run.sparsity,
                                           seconds=float(s.get("seconds") or 0.0))
        if "artifact" in stored:
            run.artifact, art = _artifact_from(path, layout, start, prefix, item, entry, workdir, run.name)
            run.files.append(art)
            if run.masks is None:  # a score method: cut again at the saved settings (lazily: a moment)
                if run.sparsity is None:
                    raise SessionFileError(f"{path.name}: run {run.name!r} has no sparsity to cut at.")
                try:
                    run.masks = cut(run.artifact, run.sparsity, parse_pattern(run.pattern), skip_misfits=True)
                except Exception as exc:
                    raise SessionFileError(f"{path.name}: run {run.name!r} cannot be cut at its saved settings "
                                           f"({exc}); the file was altered.") from None
        if run.masks is None:
            raise SessionFileError(f"{path.name}: run {run.name!r} has neither a calibration nor masks; the file "
                                   "is incomplete.")
    except BaseException:
        for f in run.files:
            _remove(f)
        raise
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
