"""The Live view: the sparsity slider and pattern re-cut every shown run, the run list (show,
hide, rename, delete, choose the active run), the allocation (per block or per matrix type),
the active run's heatmap and histogram."""
from __future__ import annotations

import gradio as gr

from core.errors import Cancelled, PatternError
from core.patterns import parse_pattern

from ..common import checked_sparsity, fail, progress_fn
from ..state import Run, Session
from ..views import cancelled_status, status, views

RUN_HEADERS = ["name", "method", "parameters", "pattern", "kind", "text", "shown"]
ALLOC_MODES = ["per block", "per matrix type"]


# ---------------------------------------------------------------- cutting runs

def is_cheap(run: Run) -> bool:
    """A re-cut in well under a second (ranks compared): no solve, no structured prune."""
    return run.source is not None and run.source.cheap


def recut_run(session: Session, run: Run, sparsity: float, pattern: str, progress=None) -> None:
    """Bring one run to (sparsity, pattern), as its source cuts: a fixed mask stays; a structured run
    is pruned again at the new sparsity (its pattern is its own); N:M masks do not depend on the
    sparsity, so at the same N:M pattern nothing is cut. Raises PatternError for a pattern the
    method cannot make, Cancelled if the session's Cancel is pressed (the run keeps its previous
    masks)."""
    sparsity, pattern = float(sparsity), str(pattern)
    source = run.source
    if source is None or not source.follows_sparsity:
        return
    if run.masks is not None and source.same_masks((sparsity, pattern), (run.sparsity, run.pattern)):
        run.sparsity = sparsity
        return
    label = f"{run.name} at {sparsity:.0%}"
    if not source.cheap and progress is not None:
        progress(0, desc=f"{label}: {source.method} {'prunes' if source.structured else 're-solves'} again: "
                         "this takes a while")
    run.masks = source.masks_at(sparsity, None if source.structured else parse_pattern(pattern),
                                progress_fn(progress, label), session.cancel.is_set)
    run.sparsity = sparsity
    if not source.structured:
        run.pattern = pattern


def sync_cheap_runs(session: Session, skip: Run | None = None) -> list[str]:
    """Re-cut the shown runs that re-cut in well under a second to the slider's (sparsity,
    pattern) (after a calibration made at another value); notes for those that cannot take it."""
    notes = []
    for run in session.runs.visible():
        if run is skip or not is_cheap(run):
            continue
        try:
            recut_run(session, run, session.sparsity, session.pattern)
        except PatternError as exc:
            notes.append(f"{run.name}: {exc} Its masks are unchanged.")
    return notes


def recut_shown(session: Session, sparsity, pattern, progress=None) -> list[str]:
    """Re-cut every shown run that can be cut, and the active run: notes for runs left as they were."""
    active = session.active
    targets = [r for r in session.runs.visible() if r.cuttable]
    if active is not None and active.cuttable and active not in targets:
        targets.insert(0, active)
    notes = []
    for run in targets:
        try:
            recut_run(session, run, sparsity, pattern, progress)
        except PatternError as exc:
            if len(targets) == 1:
                raise
            notes.append(f"{run.name}: {exc} Its masks are unchanged.")
    return notes


# ---------------------------------------------------------------- handlers

def on_cut(session: Session, sparsity, pattern, block, mtype, progress=gr.Progress()):
    """The slider (or the pattern) moved: re-cut every shown run that can be cut."""
    sparsity = checked_sparsity(sparsity)
    active = session.active
    cuttable = [r for r in session.runs if r.cuttable and (r.visible or r is active)]
    if not cuttable:
        if active is not None and active.masks is not None:  # imported masks: nothing to re-cut from
            return ("Imported masks cannot be re-cut; calibrate to use the slider.", *views(session, block, mtype))
        raise gr.Error("Nothing to cut yet: calibrate first (Calibration panel).")
    session.cancel.clear()
    try:
        notes = recut_shown(session, sparsity, pattern, progress)
        session.sparsity, session.pattern = float(sparsity), str(pattern)
    except Cancelled as exc:
        gr.Warning(str(exc))
        return (cancelled_status(session, exc, resume="move the slider back to it"),
                *views(session, block, mtype, skip_shown=True))
    except Exception as exc:
        raise fail(exc) from exc
    return (" ".join([status(session), *notes]), *views(session, block, mtype, skip_shown=True))


def on_view(session: Session, block, mtype):
    _, heat, hist, _ = views(session, block, mtype, skip_shown=True)  # the allocation is not an output here
    return heat, hist


def on_alloc_mode(session: Session, mode, block, mtype):
    """Per block, or per matrix type within each block (the overlaid chart of several runs)."""
    session.alloc_mode = "type" if str(mode).endswith("matrix type") else "block"
    return views(session, block, mtype, skip_shown=True)[0]


def on_select_run(session: Session, run_id, block, mtype):
    """Make a run the active one: the status, heatmap, histogram and exports show it."""
    if not run_id:
        return (status(session), *views(session, block, mtype, skip_shown=True))
    try:
        run = session.runs.activate(run_id)
        if is_cheap(run):
            recut_run(session, run, session.sparsity, session.pattern)
    except PatternError:
        pass  # it keeps its masks; the status says which
    except Exception as exc:
        raise fail(exc) from exc
    return (status(session), *views(session, block, mtype, skip_shown=True))


def on_show_runs(session: Session, run_ids, block, mtype, progress=gr.Progress()):
    """Show the ticked runs (overlaid) and hide the others; a run shown again is re-cut at the slider."""
    ids = set(run_ids or [])
    unknown = [i for i in ids if i not in session.runs and session.runs.by_name(i) is None]
    if unknown:
        raise gr.Error(f"No run {unknown[0]!r} in this session.")
    ids = {session.runs.require(i).id for i in ids}
    notes = []
    session.cancel.clear()
    try:
        for run in session.runs:
            appearing = run.id in ids and not run.visible
            run.visible = run.id in ids
            if appearing and run.cuttable:
                try:
                    recut_run(session, run, session.sparsity, session.pattern, progress)
                except PatternError as exc:
                    notes.append(f"{run.name}: {exc} Its masks are unchanged.")
    except Cancelled as exc:
        gr.Warning(str(exc))
    except Exception as exc:
        raise fail(exc) from exc
    return (" ".join([status(session), *notes]), *views(session, block, mtype, skip_shown=True))


def on_rename_run(session: Session, run_id, new_name, block, mtype):
    try:
        run = session.runs.rename(run_id, new_name)
    except Exception as exc:
        raise fail(exc) from exc
    for point in session.ppl_runs:  # its perplexity line keeps following it
        if point.get("run_id") == run.id:
            point["run"] = run.name
    return (status(session), *views(session, block, mtype, skip_shown=True))


def on_delete_run(session: Session, run_id, block, mtype):
    try:
        run = session.drop_run(session.runs.require(run_id).id)
    except Exception as exc:
        raise fail(exc) from exc
    text = f"Deleted run {run.name}. " + (status(session) if session.active else "No runs left: calibrate again.")
    return (text, *views(session, block, mtype))


def runs_table(session: Session) -> list[list]:
    rows = []
    for run in session.runs:
        d = run.describe()
        params = ", ".join(f"{k}={v}" for k, v in d["params"].items())
        rows.append([run.name + (" (active)" if run is session.active else ""), d["method"], params, d["pattern"],
                     d["kind"], d["text"], "yes" if run.visible else "no"])
    return rows


def _pick(session: Session, value, default):
    return value if value in session.runs else default


def on_refresh_runs(session: Session, compare_a=None, compare_b=None, gen_a=None, gen_b=None):
    """The run list and every run chooser, after runs were made, renamed or deleted.

    Outputs: (table, active run, shown runs, compare A, compare B, generate A, generate B, JSON)."""
    choices = session.runs.choices()
    ids = [i for _, i in choices]
    active = session.runs.active_id
    a = _pick(session, compare_a, active)
    b = compare_b if compare_b in session.runs and compare_b != a else None
    if b is None:  # the newest other run: a new calibration is compared with what came before
        b = next((i for i in reversed(ids) if i != a), None)
    ga = _pick(session, gen_a, active)
    gb = _pick(session, gen_b, None)
    none = [("(none)", "")]
    return (runs_table(session),
            gr.update(choices=choices, value=active),
            gr.update(choices=choices, value=[r.id for r in session.runs if r.visible]),
            gr.update(choices=choices, value=a), gr.update(choices=choices, value=b),
            gr.update(choices=choices, value=ga), gr.update(choices=none + choices, value=gb or ""),
            [run.describe() for run in session.runs])
