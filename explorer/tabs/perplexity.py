"""Perplexity: dense vs the active run, a sweep of the active run, and every shown run swept in
one click (one line per run; Cancel keeps the points already measured)."""
from __future__ import annotations

import gc

import gradio as gr

from core.calibrate import release_free_memory

from core.data import DEFAULT_SOURCE, check_seqlen, evaluation_set
from core.errors import Cancelled
from core.evaluate import perplexity
from core.patterns import parse_pattern

from .. import figures, limits
from ..common import checked_number, ensure_model, fail, parse_sparsities, progress_fn
from ..state import ModelEntry, Run, Session, model_as


def record(session: Session, run: Run | None, masks, value: float, protocol_key: str) -> dict:
    point = {"method": masks.meta.get("method", "imported"), "pattern": masks.meta.get("pattern", "?"),
             "sparsity": round(masks.total_sparsity(), 4), "ppl": value, "protocol": protocol_key}
    if run is not None:
        point.update(run=run.name, run_id=run.id)
    session.ppl_runs.append(point)
    return point


def dense_perplexity(session: Session, entry: ModelEntry, windows, protocol, progress) -> float:
    """The dense model's perplexity on this protocol (measured once per session and protocol)."""
    key = protocol.describe()
    if key not in session.ppl_dense:
        with model_as(entry) as lm:
            session.ppl_dense[key] = perplexity(lm, windows, protocol.as_dict(), progress=progress_fn(progress, "dense"),
                                                should_stop=session.cancel.is_set).value
    return session.ppl_dense[key]


def masked_perplexity(session: Session, entry: ModelEntry, windows, protocol, masks, label: str, progress) -> float:
    """Perplexity with `masks` applied, under the lock (the weights are put back after)."""
    with model_as(entry, masks) as lm:
        return perplexity(lm, windows, protocol.as_dict(), progress=progress_fn(progress, label),
                          should_stop=session.cancel.is_set).value


def measure(session: Session, entry: ModelEntry, windows, protocol, masks_list, progress, run: Run | None = None) -> dict:
    """Perplexity of the dense model (once per protocol) and of each mask set, recorded as points."""
    dense_perplexity(session, entry, windows, protocol, progress)
    results = {}
    for i, masks in enumerate(masks_list):
        label = f"pruned {i + 1}/{len(masks_list)} ({masks.total_sparsity():.0%})"
        results[i] = masked_perplexity(session, entry, windows, protocol, masks, label, progress)
        record(session, run, masks, results[i], protocol.describe())
    return results


def comparison(session: Session):
    return figures.to_plot(figures.perplexity_figure(session.ppl_runs, session.ppl_dense)), session.ppl_runs


def eval_numbers(seqlen, max_windows) -> tuple[int, int]:
    """The evaluation widgets' values, checked before any work (gr.Error naming the wrong one)."""
    return (checked_number(seqlen, "seqlen", 2, integer=True),
            checked_number(max_windows, "max windows", 1, integer=True))


def _eval_set(entry: ModelEntry, source, seqlen, max_windows):
    seqlen, max_windows = eval_numbers(seqlen, max_windows)
    check_seqlen(entry.lm, seqlen)  # a window the model cannot take: refuse before any work
    return evaluation_set(entry.lm.tokenizer, (source or DEFAULT_SOURCE).strip(), int(seqlen), int(max_windows))


def on_perplexity(session: Session, source, seqlen, max_windows, progress=gr.Progress()):
    entry = ensure_model(session)
    run = session.active
    if run is None or run.masks is None:
        raise gr.Error("No pruned model yet: calibrate (or import a mask file) first.")
    masks = run.masks
    session.cancel.clear()
    try:
        seqlen, max_windows = eval_numbers(seqlen, max_windows)
        check_seqlen(entry.lm, seqlen)
        limits.check_evaluation(entry, seqlen, max_windows)
        progress(0, desc="tokenizing the evaluation text")
        windows, protocol = _eval_set(entry, source, seqlen, max_windows)
        p = measure(session, entry, windows, protocol, [masks], progress, run)[0]
    except Exception as exc:
        raise fail(exc) from exc
    d = session.ppl_dense[protocol.describe()]
    md = (f"| model | perplexity |\n|---|---|\n| dense | {d:.3f} |\n"
          f"| pruned ({masks.total_sparsity():.1%} sparse) | {p:.3f} |\n\n"
          f"Protocol: {protocol.describe()}; exp(mean window NLL), fp32 logits.")
    return (md, {"dense": d, "pruned": p, "protocol": protocol.as_dict()}, *comparison(session))


def masks_at(session: Session, run: Run, sparsity: float, progress, label: str = ""):
    """A run's masks at another sparsity, the run itself left as it is, from its source: cut from its
    calibration, pruned again (structured), or its own fixed mask. A sweep varies the unstructured
    sparsity: an N:M run is cut unstructured."""
    source = run.source
    if source is None:
        return run.masks
    pattern = parse_pattern(run.pattern) if not source.structured else None
    if pattern is not None and pattern.is_nm:
        pattern = parse_pattern("unstructured")
    if run.masks is not None and source.same_masks((sparsity, str(pattern)), (run.sparsity, run.pattern)):
        return run.masks
    return source.masks_at(sparsity, pattern, progress_fn(progress, ": ".join(filter(None, (label, f"{run.name} at {sparsity:.0%}")))),
                           session.cancel.is_set)


def _release() -> None:
    """Hand a measured point's memory back (its mask set, dropped by the caller, collected; the heap
    trimmed), so that the server's memory after a sweep is what it was before."""
    gc.collect()
    release_free_memory()


def _method_of(run: Run):
    return run.artifact.method_obj if run.artifact is not None else None


def on_sweep(session: Session, sparsities_text, source, seqlen, max_windows, progress=gr.Progress()):
    """Perplexity at several sparsities of the active run: cut from its one calibration, or, for
    a structured method (units are solved for one sparsity), pruned again at each. One mask set
    at a time: each point is cut, measured, streamed, and dropped before the next."""
    entry = ensure_model(session)
    run = session.active
    if run is None or not run.cuttable:
        raise gr.Error("A sweep cuts from a calibration: calibrate first (imported masks have none).")
    session.cancel.clear()
    try:
        values = limits.check_sparsities(parse_sparsities(sparsities_text))
        seqlen, max_windows = eval_numbers(seqlen, max_windows)
        check_seqlen(entry.lm, seqlen)  # before pruning at each sparsity
        limits.check_evaluation(entry, seqlen, max_windows, _method_of(run))
        windows, protocol = _eval_set(entry, source, seqlen, max_windows)
    except Exception as exc:
        raise fail(exc) from exc
    if run.source.structured:
        how = f"**{run.source.method}** (structured), pruned at each of {len(values)} sparsities"
    else:
        how = f"**{run.source.method}**, one calibration, {len(values)} cuts"
    rows: list[tuple[float, float]] = []

    def table(head: str) -> str:
        body = "".join(f"| {s:.1%} | {p:.3f} |\n" for s, p in rows)
        dense = session.ppl_dense.get(protocol.describe())
        return (f"{head}\n\n| sparsity | perplexity |\n|---|---|\n{body}\n"
                + (f"Dense {dense:.3f}. " if dense is not None else "") + f"Protocol: {protocol.describe()}.")

    try:
        dense_perplexity(session, entry, windows, protocol, progress)
        for i, v in enumerate(values):
            step = f"{i + 1}/{len(values)}"
            masks = masks_at(session, run, v, progress, step)
            value = masked_perplexity(session, entry, windows, protocol, masks, f"{step} pruned ({v:.0%})", progress)
            record(session, run, masks, value, protocol.describe())
            rows.append((masks.total_sparsity(), value))
            masks = None
            _release()
            yield (table(f"{how}: {len(rows)} of {len(values)} measured..."), *comparison(session))
    except Cancelled as exc:
        gr.Warning(str(exc))
        yield (table(f"Cancelled after {len(rows)} of {len(values)} points; those are kept: {exc}"),
               *comparison(session))
        return
    except Exception as exc:
        raise fail(exc) from exc
    finally:
        run.source.forget_work()  # e.g. the solves of the sweep's last sparsity, not the run's
        _release()
    yield (table(f"{how}."), *comparison(session))


def on_sweep_runs(session: Session, sparsities_text, source, seqlen, max_windows, progress=gr.Progress()):
    """Every shown run at every sparsity (a fixed mask at its own), one line per run in the plot,
    streamed point by point, one mask set at a time: (markdown, plot, points). Cancel keeps the
    points already measured."""
    entry = ensure_model(session)
    runs = session.runs.visible()
    if not runs:
        raise gr.Error("No run shown: calibrate (or import a mask file), and tick the runs to measure.")
    session.cancel.clear()
    try:
        values = limits.check_sparsities(parse_sparsities(sparsities_text))
        plan = [(run, v) for run in runs for v in (values if run.cuttable else [None])]
        limits.check_measurements(len(plan))
        seqlen, max_windows = eval_numbers(seqlen, max_windows)
        check_seqlen(entry.lm, seqlen)
        methods = [m for m in map(_method_of, runs) if m is not None]
        heaviest = max(methods, key=lambda m: m.updates_weights, default=None)
        limits.check_evaluation(entry, seqlen, max_windows, heaviest)
        windows, protocol = _eval_set(entry, source, seqlen, max_windows)
    except Exception as exc:
        raise fail(exc) from exc
    done: list[dict] = []

    def table(head: str) -> str:
        rows = "".join(f"| {p['run']} | {p['sparsity']:.1%} | {p['ppl']:.3f} |\n" for p in done)
        dense = session.ppl_dense.get(protocol.describe())
        return (f"{head}\n\n| run | sparsity | perplexity |\n|---|---|---|\n{rows}\n"
                + (f"Dense {dense:.3f}. " if dense is not None else "") + f"Protocol: {protocol.describe()}.")

    try:
        dense_perplexity(session, entry, windows, protocol, progress)
        for i, (run, v) in enumerate(plan):
            step = f"{i + 1}/{len(plan)} {run.name}" + (f" at {v:.0%}" if v is not None else " (fixed mask)")
            progress((i, len(plan)), desc=step)
            masks = run.masks if v is None else masks_at(session, run, v, progress, step)
            value = masked_perplexity(session, entry, windows, protocol, masks, step, progress)
            done.append(record(session, run, masks, value, protocol.describe()))
            masks = None
            _release()
            yield (table(f"Measured {len(done)} of {len(plan)} points ({len(runs)} runs)..."), *comparison(session))
    except Cancelled as exc:
        gr.Warning(str(exc))
        yield (table(f"Cancelled after {len(done)} of {len(plan)} points; those are kept: {exc}"),
               *comparison(session))
        return
    except Exception as exc:
        raise fail(exc) from exc
    finally:
        for run in runs:
            if run.source is not None:
                run.source.forget_work()
        _release()
    yield (table(f"{len(runs)} runs, {len(done)} points, one line per run."), *comparison(session))
