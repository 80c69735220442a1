"""Does a model fit? Its parameter count from the config alone, the memory free, and the check
that refuses a load which cannot fit before anything is allocated, saying what would fit."""
from __future__ import annotations

import torch

from .errors import ModelLoadError
from .families import family_for_config


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
    # accelerate and transformers on first use: seconds that importing core need not cost
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


def block_weight_bytes(config, dtype: torch.dtype) -> int:
    """The bytes of the decoder blocks' weights in `dtype` (what --offload disk may write); 0 when
    the config cannot be sized."""
    try:
        _, in_blocks = count_parameters(config)
    except Exception:  # the size is advice (a free-space check); the real load reports real errors
        return 0
    return in_blocks * (torch.finfo(dtype).bits // 8)


def check_fits(config, dtype: torch.dtype, device: str, offload: str) -> None:
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
