"""What the Live view shows for a session: the status line, the allocation (one run's detailed
chart, or every shown run overlaid), the active run's heatmap and histogram, the cut summary.
Plots the page already shows are gr.skip() (not sent, not redrawn)."""
from __future__ import annotations

import gradio as gr
import torch

from core.errors import Cancelled
from core.maskset import allocation_table
from core.run_source import is_structured

from . import figures, structured_view
from .common import NO_MASKS, checked_number
from .state import Run, Session


def matrix_name(rows: list[dict], block, mtype: str) -> str | None:
    """The matrix of `block` (a block number the user sent: checked, gr.Error if it is none of the
    model's) and matrix type `mtype`; the first matrix where the type is not in the block."""
    last = max((r["block"] for r in rows), default=None)
    block = checked_number(block, "Block", 0, last, integer=True, default=0)
    for r in rows:
        if r["block"] == block and r["type"] == mtype:
            return r["name"]
    return rows[0]["name"] if rows else None


def target_of(masks) -> float | None:
    try:
        return float(masks.meta.get("target_sparsity"))
    except (TypeError, ValueError):
        return None


def run_allocation(run: Run, rows: list[dict], target, title: str) -> dict:
    """One run's detailed chart: structured masks per block as units removed, others per matrix type."""
    masks = run.masks
    structured = structured_view.allocation_of(masks) if is_structured(masks) else None
    if structured:
        return structured_view.allocation_figure(structured, target, title)
    return figures.allocation_figure(rows, target, title)


def overlay(session: Session, runs: list[Run], rows_of: dict) -> dict:
    """Every shown run's allocation on one chart (figures.allocation_overlay_figure)."""
    series = []
    for run in runs:
        structured = (structured_view.allocation_of(run.masks)
                      if is_structured(run.masks) else None)
        series.append({"name": run.name, "rows": rows_of[run.id], "structured": structured,
                       "pattern": run.current_pattern()})
    return figures.allocation_overlay_figure(series, overlay_target(session, runs), session.alloc_mode)


def overlay_target(session: Session, runs: list[Run]):
    """The overlaid chart's target line: the slider's sparsity, none when every run is N:M."""
    patterns = {run.current_pattern() for run in runs}
    return None if patterns and all(":" in p for p in patterns) else session.sparsity


def summary_of(session: Session, run: Run, rows: list[dict]) -> dict:
    summ = figures.summary(rows)
    summ.update(target=target_of(run.masks), pattern=run.masks.meta.get("pattern", ""),
                method=run.masks.meta.get("method", "imported"), run=run.name)
    return summ


def views(session: Session, block, mtype, skip_shown: bool = False) -> tuple:
    """(allocation, heatmap, histogram, summary) for the session's runs.

    The allocation shows the visible runs: one run as its detailed chart, several overlaid. The
    heatmap, the histogram and the summary are the active run's. skip_shown: plots the page
    already shows (same masks, same matrix: e.g. the slider moved at an N:M pattern, which the
    slider does not change) are gr.skip(), not sent and redrawn."""
    active = session.active
    shown_runs = session.runs.visible()
    if session.model is None or ((active is None or active.masks is None) and not shown_runs):
        session.shown = (None, None)
        empty = figures.to_plot(figures.empty_figure(NO_MASKS))
        return empty, empty, empty, {}
    lm = session.model.lm
    rows_of = {run.id: allocation_table(run.masks, lm) for run in shown_runs}
    if active is not None and active.masks is not None and active.id not in rows_of:
        rows_of[active.id] = allocation_table(active.masks, lm)
    if len(shown_runs) > 1:
        signature = ("overlay", session.alloc_mode, overlay_target(session, shown_runs),
                     tuple((r.id, r.name, id(r.masks)) for r in shown_runs))
    elif shown_runs:
        signature = ("one", shown_runs[0].id, shown_runs[0].name, id(shown_runs[0].masks))
    else:
        signature = ("none",)
    matrix = None
    if active is not None and active.masks is not None:
        rows = rows_of[active.id]
        name = matrix_name(rows, block or 0, mtype or "q")
        matrix = (id(active.masks), name)
        summ = summary_of(session, active, rows)
    else:
        summ = {}
    shown_alloc, shown_matrix = session.shown
    same_alloc = skip_shown and shown_alloc == signature
    same_matrix = skip_shown and shown_matrix == matrix and matrix is not None
    if same_alloc and same_matrix:
        return gr.skip(), gr.skip(), gr.skip(), summ
    if same_alloc:
        alloc = gr.skip()
    elif len(shown_runs) > 1:
        alloc = figures.to_plot(overlay(session, shown_runs, rows_of))
    elif shown_runs:
        run = shown_runs[0]
        meta = run.masks.meta
        alloc = figures.to_plot(run_allocation(run, rows_of[run.id], target_of(run.masks),
                                               f"{meta.get('method', 'imported')}, {meta.get('pattern', '')}"))
    else:
        alloc = figures.to_plot(figures.empty_figure("No run shown: tick a run in the run list."))
    if same_matrix:
        heat = hist = gr.skip()
    elif matrix is not None:
        for run in session.runs:  # prepared scores are kept for the run whose heatmap is shown only
            if run is not active:
                run.prepared.clear()
        heat, hist = matrix_views(active, matrix[1])
    else:
        heat = hist = figures.to_plot(figures.empty_figure(NO_MASKS))
    session.shown = (signature, matrix)
    return alloc, heat, hist, summ


def matrix_views(run: Run, name: str | None) -> tuple:
    """(heatmap, histogram) of one matrix of a run: its mask is the only one a lazy cut makes here."""
    masks = run.masks
    mask = masks.masks.get(name) if name else None
    if mask is None and name in masks.dense_layers:  # left dense on purpose: all kept
        mask = torch.ones(masks.dense_layers[name], dtype=torch.bool)
    scope, label = "row", "saliency"
    artifact = run.artifact
    if artifact is not None:
        method_obj = artifact.method_obj
        scope = method_obj.threshold_scope(artifact.params)  # what the histogram's threshold line means
        label = method_obj.score_label
    prepared = None
    if artifact is not None and name:
        key = (id(artifact), name)
        if key not in run.prepared:  # once per matrix and calibration, not per slider move
            run.prepared = {k: v for k, v in run.prepared.items() if k[0] == key[0]}
            run.prepared[key] = figures.PreparedScores(artifact.score(name))
        prepared = run.prepared[key]
    heat = figures.saliency_figure(None, mask, name or "?", label, prepared)
    hist = figures.histogram_figure(None, mask, name or "?", scope, label, prepared)
    return figures.to_plot(heat), figures.to_plot(hist)


def run_status(run: Run) -> str:
    masks = run.masks
    meta = masks.meta
    took = meta.get("cut_seconds")
    took = f" in {float(took) * 1000:.0f} ms" if took else ""
    skipped = masks.skipped_layers
    whole = " of the whole model" if skipped else ""
    method = meta.get("method", "imported")
    named = f" (run {run.name})" if run.name != method else ""
    status = (f"Masks: **{method}**{named}, pattern {meta.get('pattern', '?')}, "
              f"achieved sparsity **{masks.total_sparsity():.1%}**{whole}{took}.")
    if skipped:  # N:M misfits left dense: they count in the sparsity above, at 0
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        status += (f" {len(skipped)} of {len(skipped) + len(masks.shapes())} matrices left dense "
                   f"(the pattern does not fit their width): {shown}.")
    if not run.cuttable:
        status += " A fixed mask: the slider leaves it as it is."
    return status


def status(session: Session) -> str:
    active = session.active
    if active is None or active.masks is None:
        return "No masks yet."
    text = run_status(active)
    others = [r for r in session.runs.visible() if r.id != active.id]
    if others:
        text += " Shown with it: " + ", ".join(
            f"{r.name} {r.masks.total_sparsity():.1%}" + ("" if r.cuttable else " (fixed)") for r in others) + "."
    return text


def cancelled_status(session: Session, exc: Cancelled, resume: str) -> str:
    """What a cancelled calibration or cut left: the session's masks are the previous ones (a
    cancelled cut never replaces them), and what was already computed is kept for a retry."""
    kept = ("The previous masks are unchanged. " + status(session) if session.masks is not None
            else "No masks were made.")
    solved = getattr(exc, "solved", 0)
    if session.interrupted is not None:  # on_calibrate: the statistics are kept too
        again = (f" The calibration{f' and the {solved} matrices already solved' if solved else ''} "
                 f"are kept: {resume} to continue from there.")
    elif solved:
        again = f" The {solved} matrices already solved at that sparsity are kept: {resume} to finish only the rest."
    else:
        again = ""
    return f"Cancelled: {exc} {kept}{again}"
