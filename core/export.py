"""Export a pruned model as a transformers folder (written atomically).

- `export_pruned_model`: the model as it is now (masks applied), full size.
- `export_sliced_model`: a structured plan turned into a physically smaller model
  (core.structured.slicing); `core.models.load_model` reads the folder back.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .models import LoadedModel


def write_folder_atomically(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(staging)` on a fresh folder beside `out`, then rename it to `out` (replacing
    an old one): the folder appears only once complete, and a failed write leaves no trace."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        write(staging)
        if out.exists():
            backup = out.with_name(out.name + ".old")
            out.rename(backup)
            staging.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _provenance(lm: LoadedModel, meta: dict | None) -> dict:
    return {"source_model": lm.model_id, "source_fingerprint": lm.fingerprint, **(meta or {})}


def export_pruned_model(lm: LoadedModel, out: str | Path, meta: dict | None = None) -> Path:
    """save_pretrained the model as it is now (masks applied) plus a PRUNING.json of metadata.

    The folder appears only once complete: it is written beside the target and renamed."""

    def write(staging: Path) -> None:
        lm.model.save_pretrained(staging)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(staging)
        (staging / "PRUNING.json").write_text(json.dumps(_provenance(lm, meta), indent=2, default=str))

    return write_folder_atomically(out, write)


def export_sliced_model(lm: LoadedModel, plan, out: str | Path, meta: dict | None = None) -> Path:
    """Slice `plan` out of `lm` (which is left unchanged) and save the smaller model, its
    tokenizer and a PRUNING.json (provenance, the kept attention units per block, parameter
    counts). Load it back with core.models.load_model(out)."""
    from .structured.slicing import save_sliced, slice_model
    from .structured.units import all_block_units

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
    return save_sliced(model, out, tokenizer=lm.tokenizer, meta=info)
