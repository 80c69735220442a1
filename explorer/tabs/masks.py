"""The Compare masks tab: do two runs prune the same weights? For a chosen block and matrix the
agreement map; for every matrix the Jaccard overlap of the kept weights (blocks x matrix type);
one number for the whole model. The maths is in explorer.compare."""
from __future__ import annotations

import gradio as gr
import torch

from core.maskset import allocation_table
from core.run_source import is_structured

from .. import compare, figures
from ..common import fail
from ..state import Run, Session
from ..views import matrix_name


def _structured(run: Run) -> bool:
    return is_structured(run.masks)


def what_is_compared(a: Run, b: Run) -> str:
    """A sentence for pairs whose masks mean different things (structured vs single weights, N:M)."""
    sa, sb = _structured(a), _structured(b)
    if sa != sb:
        s, u = (a, b) if sa else (b, a)
        return (f"{s.name} is structured (whole attention units: rows of q, k, v and columns of o; whole MLP "
                f"channels: rows of gate/up and columns of down), {u.name} prunes single weights "
                f"({u.current_pattern()}). Compared here: the weights each run keeps, matrix by matrix; the "
                "structured run's removed units show as whole pruned rows and columns.")
    pa, pb = a.current_pattern(), b.current_pattern()
    if pa != pb:
        return (f"{a.name} is {pa} and {b.name} is {pb}: the kept weights are compared matrix by matrix; "
                "the patterns alone make some difference.")
    return ""


def pair_overlaps(session: Session, a: Run, b: Run) -> list[dict]:
    """Per-matrix agreement counts of two runs' current masks (kept until either is re-cut)."""
    key = (a.id, id(a.masks), b.id, id(b.masks))
    rows = session.compare_cache.get(key)
    if rows is None:
        table = allocation_table(a.masks, session.model.lm)
        where = {r["name"]: (r["block"], r["type"]) for r in table}
        rows = compare.overlaps(a.masks, b.masks, where)
        session.compare_cache.clear()  # one pair at a time: the previous pair's counts go
        session.compare_cache[key] = rows
    return rows


def _runs(session: Session, run_a, run_b) -> tuple[Run, Run]:
    if len(session.runs) == 0:
        raise gr.Error("No runs yet: calibrate two methods (or import mask files) to compare their masks.")
    try:
        a = session.runs.require(run_a) if run_a else None
        b = session.runs.require(run_b) if run_b else None
    except ValueError as exc:
        raise fail(exc) from exc
    if a is None or b is None:
        raise gr.Error("Choose two runs, A and B (calibrate a second method or import a mask file first).")
    if a.id == b.id:
        raise gr.Error(f"A and B are the same run ({a.name}): choose two different runs. A run keeps exactly "
                       "its own weights (Jaccard 1).")
    if a.masks is None or b.masks is None:
        raise gr.Error("A run has no masks yet.")
    return a, b


def on_compare(session: Session, run_a, run_b, block, mtype):
    """(agreement map, Jaccard heatmap, summary markdown, numbers as JSON) for runs A and B."""
    a, b = _runs(session, run_a, run_b)
    try:
        rows = pair_overlaps(session, a, b)
        whole = compare.whole_model(rows)
        name = matrix_name(rows, block or 0, mtype or "q")
        row = next(r for r in rows if r["name"] == name)
        shapes = compare.matrix_shapes(a.masks)
        mask_a = a.masks.masks[name] if name in a.masks.masks else None
        mask_b = b.masks.masks[name] if name in b.masks.masks else None
        mask_a = mask_a if mask_a is not None else torch.ones(shapes[name], dtype=torch.bool)
        mask_b = mask_b if mask_b is not None else torch.ones(shapes[name], dtype=torch.bool)
        dominant, agree, tile = compare.pooled_agreement(mask_a, mask_b)
        agreement = figures.agreement_figure(dominant, agree, shapes[name], tile, name, a.name, b.name, row)
        heat = figures.jaccard_figure(rows, whole["jaccard"], a.name, b.name)
    except gr.Error:
        raise
    except Exception as exc:
        raise fail(exc) from exc
    note = what_is_compared(a, b)
    n = max(whole["size"], 1)
    md = (f"**Whole model: Jaccard {whole['jaccard']:.3f}** of the kept weights of A = **{a.name}** "
          f"({a.masks.total_sparsity():.1%} sparse) and B = **{b.name}** ({b.masks.total_sparsity():.1%} sparse); "
          f"the two agree on {whole['agreement']:.1%} of all {whole['size']:,} prunable weights (kept by both "
          f"{whole['kept_both'] / n:.1%}, only A {whole['only_a'] / n:.1%}, only B {whole['only_b'] / n:.1%}, "
          f"pruned by both {whole['pruned_both'] / n:.1%}). {note}")
    numbers = {"a": a.name, "b": b.name, "matrix": name,
               "counts": {k: row[k] for k in ("kept_both", "only_a", "only_b", "pruned_both", "size", "jaccard")},
               "whole_model": whole,
               "matrices": [{k: r[k] for k in ("name", "block", "type", "jaccard", "kept_both", "only_a", "only_b",
                                                "pruned_both", "size")} for r in rows],
               "note": note}
    return figures.to_plot(agreement), figures.to_plot(heat), md, numbers


def on_compare_if_ready(session: Session, run_a, run_b, block, mtype):
    """The tab was opened: compare A and B if both are chosen and differ, else leave it as it is."""
    if (not run_a or not run_b or run_a == run_b or run_a not in session.runs or run_b not in session.runs
            or session.model is None):
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    return on_compare(session, run_a, run_b, block, mtype)
