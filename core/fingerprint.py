"""The weights' fingerprint, which every mask file, artifact and session records and is checked
against: a hash of the architecture and of every byte of every tensor as loaded, so that files made
on other weights (even one weight apart) are refused.

xxh3-128 hashes memory far faster than the model can be read, so a model in memory is hashed in
full at every load. A tensor offloaded to disk (`--offload disk`) would need a full read of the
checkpoint instead: its digest is computed from the checkpoint file once and remembered in the
cache folder under the file's identity (device, inode, size, modification time), so a later load
of the same unchanged file reads nothing."""
from __future__ import annotations

import hashlib
import json
import threading

import torch
from torch import nn

from .offload import param_source
from .outputs import cache_dir, write_text_atomic
from .sources import FileIdentity

VERSION = "2"  # 1: a sample of 1024 values per tensor (missed unsampled changes)
_CACHE_NAME = "fingerprints.json"
_CACHE_FILES = 256  # checkpoint files remembered; the oldest are forgotten
_LOCK = threading.Lock()


def _hasher():
    try:
        import xxhash

        return xxhash.xxh3_128()
    except ImportError:  # xxhash comes with datasets; sha256 gives the same guarantee, slower
        return hashlib.sha256()


def tensor_digest(tensor: torch.Tensor) -> str:
    """A hash of the tensor's dtype, shape and every byte of its values."""
    t = tensor.detach()
    h = _hasher()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.to("cpu").contiguous().reshape(-1)
    raw = flat.to(torch.uint8) if flat.dtype == torch.bool else flat.view(torch.uint8)
    h.update(memoryview(raw.numpy()))
    return h.hexdigest()


def fingerprint(model: nn.Module) -> str:
    """A short hash of the architecture and of every weight in full (offloaded ones through the
    cache of checkpoint digests)."""
    digest = hashlib.sha256(VERSION.encode())
    cache = _DigestCache()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        if tensor.device.type == "meta":  # offloaded by accelerate: from its checkpoint entry
            digest.update(_offloaded_digest(model, name, cache).encode())
        else:
            digest.update(tensor_digest(tensor).encode())
    cache.save()
    return digest.hexdigest()[:16]


def _offloaded_digest(model: nn.Module, name: str, cache: "_DigestCache") -> str:
    loader, key = param_source(model, name)
    entry = getattr(loader, "index", {}).get(key) if key not in (getattr(loader, "state_dict", None) or {}) else None
    if not entry or not entry.get("safetensors_file"):
        return tensor_digest(loader[key])  # in CPU memory, or accelerate's own offload file: read it
    return cache.get(entry["safetensors_file"], f"{entry.get('weight_name', key)}|{entry.get('dtype', '')}",
                     lambda: tensor_digest(loader[key]))


class _DigestCache:
    """Digests of checkpoint tensors (as loaded), by the file's identity; a file changed in any
    way has a new identity, so nothing stale is ever reused."""

    def __init__(self):
        self._data: dict | None = None
        self._dirty = False

    def _path(self):
        return cache_dir() / _CACHE_NAME

    def _load(self) -> dict:
        if self._data is None:
            try:
                self._data = json.loads(self._path().read_text())
                if not isinstance(self._data, dict):
                    self._data = {}
            except (OSError, ValueError):
                self._data = {}
        return self._data

    def get(self, path: str, key: str, compute) -> str:
        ident = FileIdentity.of(path)
        file_key = f"{ident.path}|{ident.device}|{ident.inode}|{ident.size}|{ident.mtime_ns}"
        files = self._load()
        found = files.get(file_key, {}).get(key)
        if isinstance(found, str):
            return found
        value = compute()
        files.setdefault(file_key, {})[key] = value
        self._dirty = True
        return value

    def save(self) -> None:
        """Write the cache back (atomically); a cache that cannot be written is only a cost later."""
        if not self._dirty:
            return
        files = self._load()
        for stale in list(files)[:-_CACHE_FILES]:
            del files[stale]
        with _LOCK:
            try:
                write_text_atomic(self._path(), json.dumps(files))
            except Exception:
                pass


def sampled_fingerprint(model: nn.Module) -> str:
    """Version 1, which files written before version 2 record: 1024 values spread over each
    tensor. Only used to recognise those files (it misses a change between the samples)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        if tensor.device.type == "meta":
            loader, key = param_source(model, name)
            tensor = loader[key]
        flat = tensor.detach().flatten()
        k = min(1024, flat.numel())
        index = torch.arange(k, device=flat.device) * (flat.numel() - 1) // max(k - 1, 1)
        digest.update(flat[index].to(torch.float32).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def written_with(lm) -> dict[str, str]:
    """The metadata a file made on the loaded model records about it."""
    return {"model_id": lm.model_id, "model_fingerprint": lm.fingerprint, "fingerprint_version": VERSION}


def mismatch(meta: dict, lm, where: str, redo: str, made: str = "made for") -> str | None:
    """Why a file's recorded model (`meta`: model_id, model_fingerprint, fingerprint_version) is
    not the loaded one, in words that say what differs; None when it is the loaded model."""
    recorded, made_for = meta.get("model_fingerprint"), meta.get("model_id")
    version = meta.get("fingerprint_version", "1")
    if recorded == lm.fingerprint:
        return None
    if version == "1" and recorded == lm.sampled_fingerprint():
        return None  # a file from before version 2, on the model it records (as far as samples tell)
    if version not in ("1", VERSION):
        return (f"{where} records a weights fingerprint of version {version!r}, which this tool does not know: "
                f"it was written by another version of the tool. {redo}")
    now = lm.fingerprint if version == VERSION else lm.sampled_fingerprint()
    if made_for == lm.model_id:  # one name, other weights: say so, not the same name twice
        return (f"{where} was {made} model {made_for!r} with other weights (fingerprint {recorded}) than those "
                f"loaded from it now (fingerprint {now}): its weights changed since (on disk, or another model "
                f"under that name). Load the model it was made for, or {redo}")
    return (f"{where} was {made} model {made_for!r} (fingerprint {recorded}), not the loaded {lm.model_id!r} "
            f"(fingerprint {now}). Load the model it was made for, or {redo}")
