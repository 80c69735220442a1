"""Where an artifact's per-weight tensors live: in memory, spilled to disk while calibrating a big
model, or memory-mapped from a saved artifact file. All three answer `get(key)` with a tensor (or
None) and list their keys; the first two also take `put`.

A spilled or loaded tensor is read from the page cache on demand, so a cut that needs one matrix
at a time holds one matrix, and a cut that needs a few entries of every matrix (a global
threshold's bisection) touches only those pages. `write_safetensors` streams tensors from any
store into one safetensors file without holding them all.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import weakref
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .sources import WatchedFiles
from .outputs import process_folder, preallocate

# safetensors' dtype names
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_TORCH = {name: dtype for dtype, name in _DTYPES.items()}
# numpy dtypes of the same width, to memory-map them (bf16 read as int16 and viewed back)
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.int16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class MemoryStore:
    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        self._tensors[key] = tensor

    def get(self, key: str, random_access: bool = False) -> torch.Tensor | None:
        return self._tensors.get(key)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def drop(self, key: str) -> None:
        self._tensors.pop(key, None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


class SpillStore:
    """Tensors written to files in a folder of this process as they are put (one file each), read
    back memory-mapped; the folder is removed when the store is dropped."""

    def __init__(self, root: Path):
        self.folder = process_folder(root, "artifact-")
        weakref.finalize(self, shutil.rmtree, str(self.folder), True)
        self._files: dict[str, tuple[Path, str, list[int]]] = {}

    def put(self, key: str, tensor: torch.Tensor) -> None:
        path = self.folder / f"{len(self._files):07d}.bin"
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = _DTYPES[tensor.dtype]
        with open(path, "wb") as fh:
            fh.write(_as_bytes(tensor))
        self._files[key] = (path, dtype, list(tensor.shape))

    def get(self, key: str, random_access: bool = False) -> torch.Tensor | None:
        found = self._files.get(key)
        if found is None:
            return None
        path, dtype, shape = found
        return _mapped(path, 0, dtype, shape, random_access)

    def keys(self) -> list[str]:
        return list(self._files)

    def drop(self, key: str) -> None:
        found = self._files.pop(key, None)
        if found is not None:
            found[0].unlink(missing_ok=True)

    def nbytes(self) -> int:
        return 0  # on disk, not in memory


class FileStore:
    """The tensors of one safetensors file, memory-mapped (read-only to the artifact)."""

    def __init__(self, path: Path, what: str = "the tensors mapped from it"):
        self.path = Path(path)
        self._watch = WatchedFiles([self.path])  # before the header: a file changed after it is caught
        self._what = what
        self.metadata, self._entries, self._data_start = read_header(self.path)

    def get(self, key: str, random_access: bool = False) -> torch.Tensor | None:
        """The tensor, memory-mapped. random_access: the reader will touch a few scattered entries
        (a bisection), so the kernel should not read ahead around each one."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        # a file rewritten since its header was read would be read at stale offsets (or, truncated,
        # end the process with SIGBUS through the memory map)
        self._watch.check(self._what, "Open the file again, or make it again if it is gone.")
        begin, _ = entry["data_offsets"]
        return _mapped(self.path, self._data_start + begin, entry["dtype"], entry["shape"], random_access)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def nbytes(self) -> int:
        return 0


def read_header(path: Path) -> tuple[dict, dict, int]:
    """(string metadata, tensor entries, offset of the data) of a safetensors file."""
    with open(path, "rb") as fh:
        size_bytes = fh.read(8)
        if len(size_bytes) != 8:
            raise ValueError("the file is shorter than a safetensors header")
        (size,) = struct.unpack("<Q", size_bytes)
        if size > 100_000_000:
            raise ValueError("the safetensors header is implausibly large")
        header = json.loads(fh.read(size))
    metadata = header.pop("__metadata__", {}) or {}
    data_start = 8 + size
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    if data_start + end > os.path.getsize(path):
        raise ValueError("the file ends before its tensors do (truncated)")
    return metadata, header, data_start


def _mapped(path: Path, offset: int, dtype: str, shape: list[int], random_access: bool = False) -> torch.Tensor:
    count = int(np.prod(shape)) if shape else 1
    if count == 0:
        return torch.empty(shape, dtype=_TORCH[dtype])
    item = np.dtype(_NUMPY[dtype]).itemsize
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets must be page aligned
    with open(path, "rb") as fh:
        # copy-on-write: writable for torch (no warning), pages read on demand, the file untouched
        mapped = mmap.mmap(fh.fileno(), offset - start + count * item, access=mmap.ACCESS_COPY, offset=start)
    if random_access and hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_RANDOM)
    array = np.frombuffer(mapped, dtype=_NUMPY[dtype], count=count, offset=offset - start)
    tensor = torch.from_numpy(array)
    if dtype == "BF16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.view(shape)


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    return memoryview(flat.numpy()).cast("B")


def write_safetensors(path: str | Path, entries: Iterable[tuple[str, Callable[[], torch.Tensor], torch.dtype, tuple]],
                      metadata: dict[str, str]) -> None:
    """Write a safetensors file from (key, reader, dtype, shape) entries, one tensor in memory at a
    time: the header is known from the dtypes and shapes before any tensor is read, and so is the
    file's size, reserved first (a full disk fails at once with DiskFullError)."""

    entries = list(entries)
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, _, dtype, shape in entries:
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        preallocate(fh, 8 + len(text) + offset, path)  # a disk too small says so before any tensor is read
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for key, read, dtype, shape in entries:
            tensor = read().detach().to("cpu").contiguous()
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{key}: expected {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
            fh.write(_as_bytes(tensor))
