"""Models bigger than the compute device: accelerate's device maps and offload hooks.

A model loaded with `--offload cpu` or `--offload disk` keeps its decoder blocks' weights off
the compute device: transformers dispatches it through accelerate, whose AlignDevicesHook on
every leaf module loads that module's weights from a weights map (CPU tensors, or the
checkpoint's safetensors / an offload folder on disk) before its forward and drops them (back
to the meta device) after. `device_map(config, family, device, offload)` is the placement such a
load asks for. This module adds the three things pruning needs on top:

- `onloaded(block)`: the block's weights materialised once for as long as the engine works on
  it (every calibration batch, the pruning, the re-run), not once per forward call;
- `write_offloaded(module, weight)`: a changed weight written into the weights map (a `.dat` file
  of the offload folder in accelerate's layout, or the CPU tensor), so later forwards see it;
- `offload_entry` / `set_offload_entry`: where a weight's original lives (the checkpoint file),
  so restore points back to it instead of keeping a copy.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .families import Family
from .outputs import preallocate, reporting_disk_full

OFFLOAD_CHOICES = ("none", "cpu", "disk")  # where decoder blocks live: --offload, the app's Model panel


def device_map(config, family: Family, device: str, offload: str) -> dict[str, str]:
    """Every decoder block on "cpu" or "disk" (offloaded, run on `device`), the rest on `device`."""
    # accelerate and transformers on first use: seconds that importing core need not cost
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


def _hook(module: nn.Module):
    hook = getattr(module, "_hf_hook", None)
    return hook if hook is not None and getattr(hook, "offload", False) else None


def is_offloaded(module: nn.Module) -> bool:
    """Whether the module's own weights live in an accelerate weights map (not on the module)."""
    return _hook(module) is not None or (
        getattr(module, "_hf_hook", None) is not None and getattr(module, "_pe_onloaded", False))


@contextmanager
def onloaded(block: nn.Module) -> Iterator[None]:
    """Within the with-block, the block's offloaded weights are on its execution device and stay
    there across forward calls (one load, not one per batch). Changes to them are dropped on exit
    unless written with `write_offloaded`. A no-op for a block held in memory."""
    hooked = [m for m in block.modules() if _hook(m) is not None]
    done = []
    try:
        for module in hooked:
            module._hf_hook.pre_forward(module)  # loads the weights from the weights map
            module._hf_hook.offload = False  # forwards now reuse them instead of reloading
            module._pe_onloaded = True
            done.append(module)
        yield
    finally:
        for module in done:
            module._hf_hook.offload = True
            module._pe_onloaded = False
            module._hf_hook.post_forward(module, None)  # back to the meta device


def _weights_map(module: nn.Module):
    """(the mapping holding the module's weights, its full key of `weight`)."""
    hook = module._hf_hook
    wmap = hook.weights_map
    prefix = getattr(wmap, "prefix", "")
    return getattr(wmap, "dataset", wmap), f"{prefix}weight"


def offload_entry(module: nn.Module) -> dict | None:
    """Where the offloaded weight is read from: an index entry of accelerate's
    OffloadedWeightsLoader ({'safetensors_file': ..., 'weight_name': ..., 'dtype': ...} for a
    weight read straight from the checkpoint); None when it is a tensor in CPU memory."""
    loader, key = _weights_map(module)
    state = getattr(loader, "state_dict", None)
    if state is not None and key in state or not hasattr(loader, "index"):
        return None
    entry = loader.index.get(key)
    return dict(entry) if entry is not None else None


def set_offload_entry(module: nn.Module, entry: dict) -> None:
    """Point the module's weight back at `entry` (from offload_entry), e.g. the checkpoint."""
    loader, key = _weights_map(module)
    loader.index[key] = dict(entry)


def read_offloaded(module: nn.Module) -> torch.Tensor:
    """The module's weight as its weights map holds it now (parameter layout, on the CPU)."""
    loader, key = _weights_map(module)
    return loader[key]


@torch.no_grad()
def write_offloaded(module: nn.Module, weight: torch.Tensor) -> None:
    """Store a changed weight (parameter layout) where the module's hook will load it from, and
    on the module itself when it is onloaded now."""
    loader, key = _weights_map(module)
    state = getattr(loader, "state_dict", None)
    if state is not None and key in state:  # --offload cpu: the weights map is CPU tensors
        state[key].copy_(weight)
    elif hasattr(loader, "index"):  # --offload disk: a .dat file in the offload folder, read next time
        _write_dat(weight, key, loader.save_folder, loader.index)
    else:  # a plain mapping of tensors
        loader[key].copy_(weight)
    if module.weight.device.type != "meta":
        module.weight.data.copy_(weight.to(module.weight.device))


def _write_dat(weight: torch.Tensor, key: str, folder: str, index: dict) -> None:
    """What accelerate's `offload_weight` does (the raw array in `<key>.dat`, its dtype and shape in
    `index`), but written with plain file writes into a reserved file, then renamed into place.
    offload_weight writes into an np.memmap of a new file: on a disk that fills meanwhile the
    kernel cannot back a mapped page and kills the process with SIGBUS, with no message and the
    folder left behind; plain writes raise ENOSPC instead (core.outputs.DiskFullError). The rename
    keeps the previous file whole until the new one is complete. Reading stays accelerate's
    memory map of a complete file, which is safe."""
    tensor = weight.detach().to("cpu").contiguous()
    dtype = str(tensor.dtype).split(".")[-1]  # "float32", "bfloat16", "float8_e4m3fn" as accelerate names them
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16 / float8: their bytes as ints of that width
        tensor = tensor.view(torch.int16)
    elif dtype.startswith("float8_"):
        tensor = tensor.view(torch.int8)
    array = tensor.numpy()
    index_entry = {"dtype": dtype, "shape": list(array.shape)}
    path = os.path.join(folder, f"{key}.dat")
    partial = path + ".partial"
    with reporting_disk_full(folder, f"the pruned weight {key} (--offload disk)", array.nbytes,
                             "Free some space there, or point --offload-folder at a disk with more room."):
        try:
            with open(partial, "wb") as fh:
                preallocate(fh, array.nbytes, partial)
                fh.write(memoryview(array.reshape(-1)).cast("B"))
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    index[key] = index_entry


def param_source(model: nn.Module, name: str):
    """(the mapping holding an offloaded parameter `name` of `model`, its key there)."""
    module_name, _, attr = name.rpartition(".")
    wmap = model.get_submodule(module_name)._hf_hook.weights_map
    return getattr(wmap, "dataset", wmap), f"{getattr(wmap, 'prefix', '')}{attr}"
