"""Export a pruned model as a transformers folder (written atomically).

- `export_pruned_model`: the model as it is now (masks applied), full size.
- `export_sliced_model`: a structured plan turned into a physically smaller model
  (core.structured.slicing); `core.loading.load_model` reads the folder back.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from .loaded_model import LoadedModel
from .outputs import write_folder_atomically
from .structured.slicing import save_sliced, slice_model
from .structured.units import all_block_units


def _provenance(lm: LoadedModel, meta: dict | None) -> dict:
    return {"source_model": lm.model_id, "source_fingerprint": lm.fingerprint, **(meta or {})}


def export_pruned_model(lm: LoadedModel, out: str | Path, meta: dict | None = None, *, force: bool = False,
                        inputs: Iterable[str | Path] = ()) -> Path:
    """save_pretrained the model as it is now (masks applied) plus a PRUNING.json of metadata.

    The folder appears only once complete: it is written beside the target and renamed. `force`
    and `inputs`: see core.outputs.write_folder_atomically (what may be replaced)."""

    def write(staging: Path) -> None:
        if lm.offload != "none":  # offloaded blocks are read back one shard at a time: keep shards small
            lm.model.save_pretrained(staging, max_shard_size="2GB")
        else:
            lm.model.save_pretrained(staging)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(staging)
        (staging / "PRUNING.json").write_text(json.dumps(_provenance(lm, meta), indent=2, default=str))

    return write_folder_atomically(out, write, force=force, inputs=inputs, need=model_bytes(lm.model))


def model_bytes(model) -> int:
    """The bytes of a model's weights as save_pretrained writes them (tied ones once; offloaded
    ones, on the meta device, count by their shape and dtype)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def export_sliced_model(lm: LoadedModel, plan, out: str | Path, meta: dict | None = None, *, force: bool = False,
                        inputs: Iterable[str | Path] = ()) -> Path:
    """Slice `plan` out of `lm` (which is left unchanged) and save the smaller model, its
    tokenizer and a PRUNING.json (provenance, the kept attention units per block, parameter
    counts). Load it back with core.loading.load_model(out). `force` and `inputs`: see
    core.outputs.write_folder_atomically (what may be replaced)."""
    units = all_block_units(lm)
    model = slice_model(lm, plan)
    dense_params = sum(p.numel() for p in lm.model.parameters())
    sliced_params = sum(p.numel() for p in model.parameters())
    info = _provenance(lm, {**(plan.meta or {}), **(meta or {})})
    info.update({"pattern": "structured", "sliced": True,
                 "structured_sparsity": f"{plan.structured_sparsity(units):.6f}",
                 "kept_attention_units": [k.nonzero().flatten().tolist() for k in plan.keep_attn],
                 "channels_kept": [int(k.sum()) for k in plan.keep_channels],
                 "parameters_dense": dense_params, "parameters_sliced": sliced_params})
    return save_sliced(model, out, tokenizer=lm.tokenizer, meta=info, force=force, inputs=inputs)
