"""Export a pruned model as a transformers folder (written atomically).

- `export_pruned_model`: the model as it is now (masks applied), full size.
- `export_sliced_model`: a structured plan turned into a physically smaller model
  (core.structured.slicing); `core.models.load_model` reads the folder back.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .models import LoadedModel
from .outputs import (EXPORT_MARKER, OutputError, check_free_space, check_replaceable, disk_full_error, fix_modes,
                      is_no_space, reporting_disk_full)


def write_folder_atomically(out: str | Path, write: Callable[[Path], None], *, force: bool = False,
                            inputs: Iterable[str | Path] = (), need: int | None = None) -> Path:
    """Run `write(staging)` on a fresh folder beside `out`, then rename it to `out`: the folder
    appears only once complete, and a failed write leaves no trace.

    An existing `out` is replaced only if it is empty or an earlier export (it carries
    EXPORT_MARKER, which every folder written here gets); any other folder needs `force`, and a
    folder holding one of `inputs` is never replaced (core.outputs.check_replaceable). The old
    folder is moved aside under a unique name, removed only once the new one is in place, and put
    back if that fails. Files and folders get the umask's ordinary modes (0644 / 0755).

    `need`: the bytes the folder will take (its weights), checked against the free space before
    anything is written; a disk that fills anyway ends in one DiskFullError, the partial folder gone."""
    out = check_replaceable(out, inputs, force)
    what = f"the export {out.name}/"
    if need:
        check_free_space(out.parent, need, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-", suffix=".partial"))
    except OSError as exc:
        if is_no_space(exc):
            raise disk_full_error(out.parent, what, need) from exc
        raise OutputError(f"Cannot write the export folder {out}: {exc.strerror or exc}. Choose a folder "
                          f"you can write to.") from None
    with reporting_disk_full(out.parent, what, need):  # outside the finally below: the space free after it
        _fill_and_rename(out, staging, write)
    return out


def _fill_and_rename(out: Path, staging: Path, write: Callable[[Path], None]) -> None:
    """write_folder_atomically's work: fill `staging`, move it to `out` (the old `out` moved aside,
    removed once the new one is in place); `staging` is gone afterwards whatever happened."""
    try:
        write(staging)
        if not (staging / EXPORT_MARKER).exists():
            (staging / EXPORT_MARKER).write_text(json.dumps({"written_by": "pruning-explorer export"}))
        fix_modes(staging)
        if out.exists() or out.is_symlink():
            # A unique name for the old folder (no fixed "out.old" to collide with): inside a
            # fresh folder beside it, so the rename never lands on something that exists.
            holder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-", suffix=".old"))
            backup = holder / out.name
            os.rename(out, backup)
            try:
                os.rename(staging, out)
            except BaseException:
                os.rename(backup, out)  # put the old folder back
                os.rmdir(holder)
                raise
            shutil.rmtree(holder, ignore_errors=True)  # the new folder is in place: now the old goes
        else:
            os.rename(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _provenance(lm: LoadedModel, meta: dict | None) -> dict:
    return {"source_model": lm.model_id, "source_fingerprint": lm.fingerprint, **(meta or {})}


def export_pruned_model(lm: LoadedModel, out: str | Path, meta: dict | None = None, *, force: bool = False,
                        inputs: Iterable[str | Path] = ()) -> Path:
    """save_pretrained the model as it is now (masks applied) plus a PRUNING.json of metadata.

    The folder appears only once complete: it is written beside the target and renamed. `force`
    and `inputs`: see write_folder_atomically (what may be replaced)."""

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
    counts). Load it back with core.models.load_model(out). `force` and `inputs`: see
    write_folder_atomically (what may be replaced)."""
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
    return save_sliced(model, out, tokenizer=lm.tokenizer, meta=info, force=force, inputs=inputs)
