"""The Export tab: the active run's mask file, allocation and pruned model; a mask file imported
as a run; the whole session saved to one file and reopened."""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import gradio as gr

from core.export import export_pruned_model, export_sliced_model
from core.mask_file import load_masks, save_masks
from core.maskset import allocation_table
from core.run_source import FixedMasks, is_structured
from core.structured.plan import plan_from_maskset

from .. import limits, session_file
from ..common import ensure_model, fail
from ..state import Run, Session, model_as
from ..views import status, views


def _need_masks(session: Session) -> Run:
    run = session.active
    if run is None or run.masks is None or session.model is None:
        raise gr.Error("Nothing to export yet: calibrate first (or import a mask file).")
    return run


def on_export_masks(session: Session):
    run = _need_masks(session)
    try:
        path = session.tmpdir() / f"masks-{int(time.time())}.safetensors"
        return str(save_masks(path, run.masks, session.model.lm))
    except Exception as exc:
        raise fail(exc) from exc


def on_export_allocation(session: Session):
    run = _need_masks(session)
    rows = allocation_table(run.masks, session.model.lm)
    folder = session.tmpdir()
    jpath, cpath = folder / "allocation.json", folder / "allocation.csv"
    jpath.write_text(json.dumps({"meta": run.masks.meta, "run": run.name, "total_sparsity": run.masks.total_sparsity(),
                                 "matrices": rows}, indent=2, default=str))
    with cpath.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["name"])
        writer.writeheader()
        writer.writerows(rows)
    return [str(jpath), str(cpath)]


def on_export_model(session: Session, progress=gr.Progress()):
    run = _need_masks(session)
    masks = run.masks
    entry = session.model
    folder = session.tmpdir() / "pruned-model"
    progress(0.1, desc="writing the pruned weights")
    try:
        structured = is_structured(masks)  # physically smaller: sliced from the dense
        with model_as(entry, None if structured else masks) as lm:
            if structured:
                progress(0.1, desc="slicing out the removed heads and channels")
                export_sliced_model(lm, plan_from_maskset(lm, masks), folder, {"masks": masks.meta})
            else:
                export_pruned_model(lm, folder, {"masks": masks.meta, "achieved_sparsity": masks.total_sparsity()})
        progress(0.7, desc="zipping")
        archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
        shutil.rmtree(folder, ignore_errors=True)
    except Exception as exc:
        raise fail(exc) from exc
    return archive


def _path_of(file) -> str:
    return file if isinstance(file, str) else getattr(file, "name", str(file))


def on_import(session: Session, file, block, mtype):
    """A mask file becomes a run of the session (a fixed mask: the slider leaves it as it is)."""
    entry = ensure_model(session)
    if file is None:
        raise gr.Error("Choose a mask file (.safetensors) to import.")
    path = _path_of(file)
    try:
        limits.check_new_run(session)
        masks = load_masks(path, entry.lm)
    except Exception as exc:
        raise fail(exc) from exc
    method = str(masks.meta.get("method", "imported"))
    params = masks.meta.get("params")
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except ValueError:
            params = {}
    session.runs.add(Run(id="", name=f"{method} (file)", method=method,
                         params=params if isinstance(params, dict) else {},
                         pattern=str(masks.meta.get("pattern", "?")), text=f"mask file {Path(path).name}",
                         origin="imported", source=FixedMasks(masks), masks=masks))
    msg = f"Imported {Path(path).name}. " + status(session)
    return (msg, *views(session, block, mtype))


def on_save_session(session: Session, progress=gr.Progress()):
    """Every run (artifacts, or masks where a run has none), its settings and the perplexities, in
    one safetensors file: (the file, a line saying what it holds)."""
    if session.model is None or len(session.runs) == 0:
        raise gr.Error("Nothing to save yet: calibrate (or import a mask file) first.")
    progress(0, desc="writing the session file")
    start = time.perf_counter()
    try:
        path = session.tmpdir() / f"session-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        session_file.save_session(path, session)
    except Exception as exc:
        raise fail(exc) from exc
    size = path.stat().st_size
    names = ", ".join(r.name for r in session.runs)
    return str(path), (f"Saved {len(session.runs)} runs ({names}) and {len(session.ppl_runs)} perplexities: "
                       f"{size / 2**20:.1f} MiB in {time.perf_counter() - start:.1f} s. Reopen it on "
                       f"{session.model.lm.model_id} to get them back without calibrating.")


def on_open_session(session: Session, file, block, mtype, progress=gr.Progress()):
    """Reopen a saved session on the loaded model: its runs replace this session's. Outputs as a
    cut: (status, allocation, heatmap, histogram, summary)."""
    entry = ensure_model(session)
    if file is None:
        raise gr.Error("Choose a session file (.safetensors) to open.")
    path = _path_of(file)
    progress(0, desc="reading the session file")
    start = time.perf_counter()
    try:
        content = session_file.read_session(path, entry, session.tmpdir())
        if len(content["runs"]) > limits.MAX_RUNS:
            raise limits.LimitError(f"{Path(path).name} holds {len(content['runs'])} runs; a session keeps at most "
                                    f"{limits.MAX_RUNS} on this server (EXPLORER_MAX_RUNS).")
    except Exception as exc:
        raise fail(exc) from exc
    session_file.restore(session, content)
    took = time.perf_counter() - start
    msg = (f"Opened {Path(path).name}: {len(session.runs)} runs ({', '.join(r.name for r in session.runs)}), "
           f"{len(session.ppl_runs)} perplexities, in {took:.1f} s. " + status(session))
    return (msg, *views(session, block, mtype))


def on_session_opened(session: Session):
    """After a session file was opened: the slider, the pattern, the allocation mode and the
    perplexity plot show the reopened session's."""
    from .. import figures
    from .live import ALLOC_MODES

    plot = figures.to_plot(figures.perplexity_figure(session.ppl_runs, session.ppl_dense))
    return (plot, session.ppl_runs, gr.update(value=session.sparsity), gr.update(value=session.pattern),
            gr.update(value=ALLOC_MODES[1] if session.alloc_mode == "type" else ALLOC_MODES[0]))
