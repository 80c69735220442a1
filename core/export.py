"""Export a pruned model as a transformers folder (written atomically)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .models import LoadedModel


def export_pruned_model(lm: LoadedModel, out: str | Path, meta: dict | None = None) -> Path:
    """save_pretrained the model as it is now (masks applied) plus a PRUNING.json of metadata.

    The folder appears only once complete: it is written beside the target and renamed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        lm.model.save_pretrained(staging)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(staging)
        (staging / "PRUNING.json").write_text(json.dumps({"source_model": lm.model_id,
                                                          "source_fingerprint": lm.fingerprint,
                                                          **(meta or {})}, indent=2, default=str))
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
