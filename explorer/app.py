"""The Gradio explorer: load a model, calibrate once, slide the sparsity, compare, export.

`build_app(model=...)` builds a Blocks app; nothing is loaded until a session asks (the page's
load event, or the first handler that needs a model). Every handler has an api_name, so the
whole app can be driven by gradio_client (the tests do).
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import inspect
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import gradio as gr
import torch

from core.data import DEFAULT_SOURCE, calibration_set, check_seqlen, evaluation_set
from core.errors import Cancelled, PruneError
from core.evaluate import GenerationSettings, perplexity, stream_generate
from core.export import export_pruned_model, export_sliced_model
from core.masks import allocation_table, load_masks, parse_pattern, save_masks
from core.memory import APP_HINTS, ModelShapes, available_bytes, check_calibration_memory, largest_fitting
from core.methods import all_methods, get_method
from core.models import BUNDLED, DEFAULT_MODEL
from core.pruning import calibrate, cut, update_cut_params
from core.structured.plan import plan_from_maskset
from core.structured.slicing import slice_model
from core.structured.units import all_block_units

from . import figures, structured_view
from .state import MODEL_LOCK, ModelEntry, Session, get_model, release_session

# Gradio's queue rebuilds a pandas summary of every recorded event (up to 10,000) after each
# event, for its monitoring page: 15-35 ms of CPU (and the GIL) after every slider move, growing
# with the session. Once per 500 events is plenty; read when the queue is made (demo.queue()).
os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "500")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PATTERNS = ["unstructured", "2:4", "4:8"]
HEAVY = "heavy"  # one concurrency slot shared by every job that runs the model
CALIB_BATCH = 8  # windows per forward in the app's calibrations (core.pruning.calibrate's default)
# A session idle this long (no event) is released like a closed tab: artifact, masks, files.
SESSION_TTL_S = float(os.environ.get("EXPLORER_SESSION_TTL", 2 * 3600))
# Files handed to the browser (exports) are copied into gradio's cache: every 30 min those older
# than 2 h are deleted, and all of them when the server stops.
DELETE_CACHE = (1800, 2 * 3600)

HOW_TO_READ = """
**Allocation chart**: one group of bars per transformer block, one bar per matrix type
(q, k, v, o attention projections; gate, up, down MLP projections). The height is the fraction
of that matrix's weights pruned. The dashed line is the target sparsity; methods such as OWL give
some blocks more and others less while keeping the total on target, and UniPruning spends one
budget over all matrices, so its bars show where the method itself put the sparsity.

**Saliency heatmap**: the importance score of every weight of one matrix (rows = outputs,
columns = inputs), on a log scale (for UniPruning: its learned |Gamma|). Big matrices are shrunk
to at most 256x256 cells by *max* pooling whole tiles of rows x columns, so a bright pixel means
at least one important weight in that tile; hovering names the rows and columns a tile covers.
The second panel is the mask: the percentage of weights kept in each tile (white = all pruned).

**Score histogram**: how the scores spread. Red weights are pruned, blue kept; the dashed line is
the largest pruned score. Row-wise methods (Wanda, RIA) cut each output row separately, so the
red and blue overlap a little.

**Compare**: the same prompt, settings and seed on the dense and the pruned model. Greedy
decoding makes the two directly comparable. Perplexity is exp(mean next-token loss) over the
evaluation windows named beside it: lower is better; compare only numbers with the same protocol.

**Perplexity vs sparsity**: every perplexity measured in this session, one line per method; a
sweep cuts several sparsities from the one calibration and measures each (a structured method
is pruned again at each sparsity: minutes per point, with progress and Cancel).
"""


# ---------------------------------------------------------------- helpers

def _fail(exc: BaseException) -> gr.Error:
    """A user-facing error for anything a handler could not do."""
    if isinstance(exc, (PruneError, ValueError)):
        return gr.Error(str(exc))
    return gr.Error(f"{type(exc).__name__}: {exc}")


def _progress_fn(progress: gr.Progress | None, label: str = ""):
    if progress is None:
        return None

    def report(done: int, total: int, what: str) -> None:
        progress((done, total), desc=f"{label}{what}")

    return report


def _model(session: Session, default_spec: str) -> ModelEntry:
    """The session's model; the first use loads the app's default."""
    if session.model is None:
        try:
            session.model = get_model(default_spec)
        except Exception as exc:
            raise _fail(exc) from exc
    return session.model


def _example_prompts() -> list[str]:
    path = ASSETS / "prompts.txt"
    if not path.is_file():
        return ["The Python programming language is", "def fibonacci(n):"]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _method_choices() -> list[tuple[str, str]]:
    return [(f"{m.title or m.name} ({m.name})", name) for name, m in all_methods().items()]


def _pool_size() -> int:
    return max([len(m.params) for m in all_methods().values()] + [1])


DEFAULT_WINDOWS, DEFAULT_SEQLEN = 16, 256  # the calibration widgets' initial values
FALLBACK_LIMITS = (1024, 4096)  # used only when the default model's config cannot be read


def calibration_limits(spec: str, method: str = "wanda", available: int | None = None) -> tuple[int, int]:
    """The calibration widgets' maxima, from this machine: the most windows (at the default
    seqlen) and the longest seqlen (at the default windows, at most the model's context) whose
    estimated calibration memory (core.memory) fits the memory available now. The calibrate
    handler still checks the actual request against the memory free when it runs."""
    from core.models import load_config

    try:
        _source, _kwargs, config = load_config(spec)
        shapes = ModelShapes.from_config(config)
    except Exception:  # an unreadable spec fails properly when it is loaded
        return FALLBACK_LIMITS
    have = available_bytes("cpu") if available is None else available
    if have is None:
        return FALLBACK_LIMITS
    seqlen = min(DEFAULT_SEQLEN, shapes.context or DEFAULT_SEQLEN)
    max_windows = largest_fitting(shapes, method, have, seqlen=seqlen, batch_size=CALIB_BATCH)
    max_seqlen = largest_fitting(shapes, method, have, n_windows=DEFAULT_WINDOWS, batch_size=CALIB_BATCH,
                                 upper=shapes.context or 1 << 20)
    return max(max_windows, 1), max(max_seqlen, 8)


def _param_updates(method_name: str, pool: int) -> list:
    """Visibility, labels and defaults of the generic parameter widgets for a method."""
    method = get_method(method_name)
    updates = []
    for i in range(pool):
        p = method.params[i] if i < len(method.params) else None
        label = f"{p.name}: {p.help}" if p else ""
        num = gr.update(visible=bool(p and p.kind in ("float", "int")), label=label,
                        value=p.default if p and p.kind in ("float", "int") else 0,
                        minimum=p.low if p and p.kind in ("float", "int") else None,
                        maximum=p.high if p and p.kind in ("float", "int") else None,
                        precision=0 if p and p.kind == "int" else None)
        choice = gr.update(visible=bool(p and p.kind == "choice"), label=label,
                           choices=[str(c) for c in p.choices] if p and p.kind == "choice" else [""],
                           value=str(p.default) if p and p.kind == "choice" else "")
        flag = gr.update(visible=bool(p and p.kind == "bool"), label=label,
                         value=bool(p.default) if p and p.kind == "bool" else False)
        updates += [num, choice, flag]
    return updates


def _collect_params(method_name: str, pool_values: tuple, pool_for: str = "", params_json: str = "") -> dict:
    """Parameter values: from the widgets when they show this method's schema, else the defaults;
    `params_json` (API callers) overrides either."""
    method = get_method(method_name)
    params = {}
    for i, p in enumerate(method.params if pool_for == method_name else ()):
        num, choice, flag = pool_values[3 * i: 3 * i + 3]
        value = num if p.kind in ("float", "int") else choice if p.kind == "choice" else flag
        if value is None or value == "":
            value = p.default
        params[p.name] = value
    if params_json and str(params_json).strip():
        try:
            extra = json.loads(params_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Method parameters must be a JSON object such as {{\"alpha\": 0.5}}: {exc}") from None
        if not isinstance(extra, dict):
            raise ValueError("Method parameters must be a JSON object such as {\"alpha\": 0.5}.")
        params.update(extra)
    return params


def _method_info(method_name: str) -> str:
    m = get_method(method_name)
    note = " Changing the sparsity re-solves every matrix (slow)." if m.updates_weights else ""
    if m.structured:
        note = (" Structured: Calibrate prunes whole attention units and MLP channels at the slider's sparsity "
                "(a fraction of the decoder's parameters); releasing the slider prunes again; the model "
                "export is physically smaller.")
    return f"**{m.title or m.name}**: {m.description} Patterns: {', '.join(m.patterns)}.{note}"


# ---------------------------------------------------------------- views

def _matrix_name(session: Session, rows: list[dict], block: int, mtype: str) -> str | None:
    for r in rows:
        if r["block"] == int(block) and r["type"] == mtype:
            return r["name"]
    return rows[0]["name"] if rows else None


def _views(session: Session, block, mtype, skip_shown: bool = False) -> tuple:
    """(allocation, heatmap, histogram, summary) for the session's current masks.

    skip_shown: plots the page already shows (same masks, same matrix: e.g. the slider moved
    at an N:M pattern, which the slider does not change) are gr.skip(), not sent and redrawn."""
    if session.masks is None or session.model is None:
        session.shown = (None, None)
        empty = figures.to_plot(figures.empty_figure("Calibrate (or import a mask file) to see the masks."))
        return empty, empty, empty, {}
    rows = allocation_table(session.masks, session.model.lm)
    target = None
    try:
        target = float(session.masks.meta.get("target_sparsity"))
    except (TypeError, ValueError):
        pass
    pattern = session.masks.meta.get("pattern", "")
    method = session.masks.meta.get("method", "imported")
    name = _matrix_name(session, rows, block or 0, mtype or "q")
    summ = figures.summary(rows)
    summ.update(target=target, pattern=pattern, method=method)
    shown_masks, shown_name = session.shown
    same_masks = skip_shown and shown_masks is session.masks
    if same_masks and shown_name == name:
        return gr.skip(), gr.skip(), gr.skip(), summ
    alloc = gr.skip() if same_masks else figures.to_plot(_allocation(session.masks, rows, target, f"{method}, {pattern}"))
    heat, hist = _matrix_views(session, name)
    session.shown = (session.masks, name)
    return alloc, heat, hist, summ


def _allocation(masks, rows: list[dict], target, title: str) -> dict:
    """Structured masks are drawn per block as units removed; others per matrix type."""
    structured = structured_view.allocation_of(masks) if masks.meta.get("pattern") == "structured" else None
    if structured:
        return structured_view.allocation_figure(structured, target, title)
    return figures.allocation_figure(rows, target, title)


def _matrix_views(session: Session, name: str | None) -> tuple:
    """(heatmap, histogram) of one matrix: its mask is the only one a lazy cut makes here."""
    mask = session.masks.masks.get(name) if name else None
    if mask is None and name in session.masks.dense_layers:  # left dense on purpose: all kept
        mask = torch.ones(session.masks.dense_layers[name], dtype=torch.bool)
    scope, label = "row", "saliency"
    if session.artifact is not None:
        method_obj = session.artifact.method_obj
        scope = session.artifact.params.get("scope", method_obj.scope)
        controller = session.artifact.params.get("controller")
        if controller in ("row", "matrix", "global-row"):  # what the histogram's threshold line means
            scope = "row" if controller == "global-row" else controller
        label = method_obj.score_label
    prepared = None
    if session.artifact is not None and name:
        key = (id(session.artifact), name)
        if key not in session.prepared:  # once per matrix and calibration, not per slider move
            session.prepared = {k: v for k, v in session.prepared.items() if k[0] == key[0]}
            session.prepared[key] = figures.PreparedScores(session.artifact.score(name))
        prepared = session.prepared[key]
    heat = figures.saliency_figure(None, mask, name or "?", label, prepared)
    hist = figures.histogram_figure(None, mask, name or "?", scope, label, prepared)
    return figures.to_plot(heat), figures.to_plot(hist)


def _status(session: Session) -> str:
    if session.masks is None:
        return "No masks yet."
    meta = session.masks.meta
    took = meta.get("cut_seconds")
    took = f" in {float(took) * 1000:.0f} ms" if took else ""
    skipped = session.masks.skipped_layers
    whole = " of the whole model" if skipped else ""
    status = (f"Masks: **{meta.get('method', 'imported')}**, pattern {meta.get('pattern', '?')}, "
              f"achieved sparsity **{session.masks.total_sparsity():.1%}**{whole}{took}.")
    if skipped:  # N:M misfits left dense: they count in the sparsity above, at 0
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        status += (f" {len(skipped)} of {len(skipped) + len(session.masks.shapes())} matrices left dense "
                   f"(the pattern does not fit their width): {shown}.")
    return status


def _cancelled_status(session: Session, exc: Cancelled, resume: str) -> str:
    """What a cancelled calibration or cut left: the session's masks are the previous ones (a
    cancelled cut never replaces them), and what was already computed is kept for a retry."""
    kept = ("The previous masks are unchanged. " + _status(session) if session.masks is not None
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


def _resumable(session: Session, entry: ModelEntry, method, params: dict, protocol: dict):
    """The session's interrupted calibration if it was made with these exact settings, else None."""
    artifact = session.interrupted
    if artifact is None or artifact.dense is not entry.dense or artifact.method != method.name:
        return None
    if artifact.params != method.resolve_params(params):
        return None
    return artifact if {k: v for k, v in artifact.protocol.items() if k != "mode"} == protocol else None


# ---------------------------------------------------------------- the app

def build_app(model: str = DEFAULT_MODEL, autoload: bool = True) -> gr.Blocks:
    """Build the explorer. `model` is the default model spec (bundled name, folder, .gguf, hub id)."""
    default_spec = str(model)
    methods = all_methods()
    max_windows, max_seqlen = calibration_limits(default_spec, "wanda" if "wanda" in methods else next(iter(methods)))
    pool = _pool_size()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    model_choices = list(BUNDLED) + ([default_spec] if default_spec not in BUNDLED else [])

    # ------------------------------------------------------------ handlers

    def on_load_model(spec, dtype, device, session: Session):
        spec = (spec or "").strip() or default_spec
        try:
            entry = get_model(spec, dtype or "float32", device or "cpu")
        except Exception as exc:
            raise _fail(exc) from exc
        if session.model is not entry:
            session.model = entry
            session.reset_pruning()
        session.shown = (None, None)  # the plots are emptied below
        lm = entry.lm
        types = list(dict.fromkeys(lm.family.linears.values()))
        empty = figures.to_plot(figures.empty_figure("Calibrate (or import a mask file) to see the masks."))
        status = f"Loaded **{lm.model_id}** ({lm.family.name}, {len(lm.blocks)} blocks)."
        return (lm.facts(), status, gr.update(maximum=max(len(lm.blocks) - 1, 0), value=0),
                gr.update(choices=types, value=types[0]), empty, empty, empty, {})

    def on_page_load(spec, dtype, device, session: Session):
        if not autoload:
            return (gr.skip(),) * 8
        try:
            return on_load_model(spec, dtype, device, session)
        except gr.Error as exc:
            gr.Warning(f"Could not load the default model: {exc.message}")
            return (gr.skip(),) * 8

    def on_method(method_name):
        return [_method_info(method_name), method_name] + _param_updates(method_name, pool)

    def on_calibrate(session: Session, method_name, source, windows, seqlen, sparsity, pattern, block, mtype,
                     params_json, pool_for, *pool_values, progress=gr.Progress()):
        entry = _model(session, default_spec)
        lm = entry.lm
        session.cancel.clear()
        try:
            params = _collect_params(method_name, pool_values, pool_for, params_json)
            method = get_method(method_name)
            check_seqlen(lm, int(seqlen))  # a window the model cannot take: refuse before any work
            # what calibration will hold, from the shapes, against the memory free now: refuse before allocating
            check_calibration_memory(lm, method, int(windows), int(seqlen), CALIB_BATCH,
                                     "structured" if method.structured else "calibrate", params, hints=APP_HINTS)
            progress(0, desc="tokenizing the calibration text")
            data, protocol = calibration_set(lm.tokenizer, (source or DEFAULT_SOURCE).strip(),
                                             int(windows), int(seqlen), seed=0)
            if method.structured:  # units are solved for one sparsity: prune now, re-prune on slider release
                run = structured_view.StructuredRun(method_name, params, data, protocol.as_dict())
                units = all_block_units(lm)
                for kind, item, info in structured_view.prune_streaming(
                        entry, run, float(sparsity), _progress_fn(progress, "pruning: "), session.cancel.is_set):
                    if kind == "plan":  # a search's best candidate so far: animate its allocation
                        title = f"best so far: generation {info.get('generation', '?')}"
                        if "fitness" in info:
                            title += f", fitness {info['fitness']:.4g}"
                        fig = structured_view.allocation_figure(item.allocation(units), float(sparsity), title)
                        yield (f"{method_name}: searching... {title}. Cancel keeps the model as it was.",
                               figures.to_plot(fig), gr.update(), gr.update(), gr.update())
                        continue
                    session.reset_pruning()
                    session.structured, session.masks = run, item
                    session.sparsity, session.pattern = float(sparsity), "structured"
                yield (f"Pruned **{method_name}** (structured) on {protocol.describe()} in {run.seconds:.1f} s; "
                       "moving the sparsity slider re-prunes. " + _status(session), *_views(session, block, mtype))
                return
            artifact = _resumable(session, entry, method, params, protocol.as_dict())
            session.interrupted = None
            if artifact is None:
                with MODEL_LOCK:  # the forward passes need the weights dense
                    entry.dense.restore()
                    artifact = calibrate(lm, method, data, protocol.as_dict(), params, dense=entry.dense,
                                         progress=_progress_fn(progress, "calibrating: "),
                                         should_stop=session.cancel.is_set)
            pat = parse_pattern(pattern)
            if pat.is_nm and "nm" not in method.patterns:
                pattern = "unstructured"
            try:  # the session's masks are replaced only once the new ones are complete
                masks = cut(artifact, float(sparsity), parse_pattern(pattern),
                            skip_misfits=True, progress=_progress_fn(progress, "cutting: "),
                            should_stop=session.cancel.is_set)
            except Cancelled:
                session.interrupted = artifact  # Calibrate at these settings resumes from it
                raise
            session.artifact = artifact
            session.prepared.clear()
            session.masks = masks
            session.sparsity, session.pattern = float(sparsity), pattern
        except Cancelled as exc:
            gr.Warning(str(exc))
            yield (_cancelled_status(session, exc, resume="press **Calibrate** again at the same settings"),
                   *_views(session, block, mtype))
            return
        except Exception as exc:
            raise _fail(exc) from exc
        shown = ", ".join(f"{k}={v}" for k, v in artifact.params.items())
        msg = (f"Calibrated **{method_name}**{f' ({shown})' if shown else ''} on {protocol.describe()} in {artifact.calibration_seconds:.1f} s. "
               + _status(session))
        yield (msg, *_views(session, block, mtype))

    def on_cut(session: Session, sparsity, pattern, block, mtype, progress=gr.Progress()):
        if session.artifact is None and session.structured is not None:
            return _recut_structured(session, sparsity, block, mtype, progress)
        if session.artifact is None:
            if session.masks is not None:  # imported masks: nothing to re-cut from
                return ("Imported masks cannot be re-cut; calibrate to use the slider.",
                        *_views(session, block, mtype))
            raise gr.Error("Nothing to cut yet: calibrate first (Calibration panel).")
        session.cancel.clear()
        try:
            pat = parse_pattern(pattern)
            # N:M masks do not depend on the sparsity: the slider changes nothing at the same N:M
            same_nm = session.masks is not None and pat.is_nm and str(pattern) == session.pattern
            if same_nm:
                session.sparsity = float(sparsity)
            elif session.masks is None or (float(sparsity), str(pattern)) != (session.sparsity, session.pattern):
                if session.artifact.method_obj.updates_weights:
                    progress(0, desc=f"{session.artifact.method} re-solves every matrix: this takes a while")
                session.masks = cut(session.artifact, float(sparsity), pat, skip_misfits=True,
                                    progress=_progress_fn(progress, "re-solving: "),
                                    should_stop=session.cancel.is_set)
                session.sparsity, session.pattern = float(sparsity), str(pattern)
        except Cancelled as exc:
            gr.Warning(str(exc))
            return (_cancelled_status(session, exc, resume="move the slider back to it"),
                    *_views(session, block, mtype, skip_shown=True))
        except Exception as exc:
            raise _fail(exc) from exc
        return (_status(session), *_views(session, block, mtype, skip_shown=True))

    def _recut_structured(session: Session, sparsity, block, mtype, progress):
        """A structured run re-prunes at the new sparsity (seconds to minutes: progress + Cancel)."""
        run = session.structured
        if run.sparsity == float(sparsity):
            return (_status(session), *_views(session, block, mtype, skip_shown=True))
        session.cancel.clear()
        try:
            session.masks = structured_view.prune(session.model, run, float(sparsity),
                                                  _progress_fn(progress, f"{run.method} at {float(sparsity):.0%}: "),
                                                  session.cancel.is_set)
            session.sparsity = float(sparsity)
        except Cancelled as exc:
            gr.Warning(str(exc))
        except Exception as exc:
            raise _fail(exc) from exc
        return (_status(session), *_views(session, block, mtype))

    def on_params(session: Session, method_name, pool_for, sparsity, pattern, block, mtype, *pool_values):
        """A parameter widget changed: re-cut at once when only the cut depends on it."""
        artifact = session.artifact
        if artifact is None or artifact.method != method_name or pool_for != method_name:
            return (gr.update(), *[gr.update()] * 4)
        try:
            needs = update_cut_params(artifact, _collect_params(method_name, pool_values, pool_for))
            if needs:
                return (f"Changing {', '.join(needs)} needs a new calibration: press **Calibrate**. "
                        + _status(session), *[gr.update()] * 4)
            if artifact.method_obj.updates_weights:  # a re-solve takes minutes: only on request
                return ("Parameters stored; move the sparsity slider to re-solve with them.", *[gr.update()] * 4)
            session.masks = cut(artifact, float(sparsity), parse_pattern(pattern), skip_misfits=True)
            session.sparsity, session.pattern = float(sparsity), str(pattern)
        except Exception as exc:
            raise _fail(exc) from exc
        return (_status(session), *_views(session, block, mtype))

    def on_view(session: Session, block, mtype):
        _, heat, hist, _ = _views(session, block, mtype)  # the allocation is not an output here
        return heat, hist

    def on_cancel(session: Session):
        session.cancel.set()
        return "Cancelling at the next block..."

    def on_generate(session: Session, prompt, max_new_tokens, do_sample, temperature, seed, chat):
        entry = _model(session, default_spec)
        if session.masks is None:
            raise gr.Error("No pruned model yet: calibrate (or import a mask file) before comparing.")
        if not (prompt or "").strip():
            raise gr.Error("Type a prompt first.")
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample),
                                      temperature=float(temperature), seed=int(seed))
        masks = session.masks
        texts, rates = {"dense": "", "pruned": ""}, {}
        try:
            sliced = _sliced_model(session, entry, masks)
            note = _sliced_note(entry, sliced)
            for which in ("dense", "pruned"):
                if which == "pruned" and sliced is not None:
                    stream = stream_generate(sliced, prompt, settings, chat=bool(chat))
                else:
                    stream = _locked_stream(entry, masks if which == "pruned" else None, prompt, settings, bool(chat))
                for text, tps in stream:
                    texts[which], rates[which] = text, tps
                    yield texts["dense"], texts["pruned"], _rates_md(rates, masks) + note
        except Exception as exc:
            raise _fail(exc) from exc
        yield texts["dense"], texts["pruned"], _rates_md(rates, masks) + note

    def _measure(session: Session, entry: ModelEntry, windows, protocol, masks_list, progress) -> dict:
        """Perplexity of the dense model (once per protocol) and of each mask set, under the lock."""
        results = {}
        with MODEL_LOCK:
            try:
                key = protocol.describe()
                if key not in session.ppl_dense:
                    entry.dense.restore()
                    session.ppl_dense[key] = perplexity(entry.lm, windows, protocol.as_dict(),
                                                        progress=_progress_fn(progress, "dense "),
                                                        should_stop=session.cancel.is_set).value
                for i, masks in enumerate(masks_list):
                    entry.dense.apply(masks)
                    label = f"pruned {i + 1}/{len(masks_list)} ({masks.total_sparsity():.0%}) "
                    value = perplexity(entry.lm, windows, protocol.as_dict(),
                                       progress=_progress_fn(progress, label), should_stop=session.cancel.is_set).value
                    results[i] = value
                    session.ppl_runs.append({"method": masks.meta.get("method", "imported"),
                                             "pattern": masks.meta.get("pattern", "?"),
                                             "sparsity": round(masks.total_sparsity(), 4), "ppl": value,
                                             "protocol": key})
            finally:
                entry.dense.restore()
        return results

    def _comparison(session: Session):
        return figures.to_plot(figures.perplexity_figure(session.ppl_runs, session.ppl_dense)), session.ppl_runs

    def on_perplexity(session: Session, source, seqlen, max_windows, progress=gr.Progress()):
        entry = _model(session, default_spec)
        if session.masks is None:
            raise gr.Error("No pruned model yet: calibrate (or import a mask file) first.")
        session.cancel.clear()
        try:
            check_seqlen(entry.lm, int(seqlen))  # a window the model cannot take: refuse before any work
            progress(0, desc="tokenizing the evaluation text")
            windows, protocol = evaluation_set(entry.lm.tokenizer, (source or DEFAULT_SOURCE).strip(),
                                               int(seqlen), int(max_windows))
            p = _measure(session, entry, windows, protocol, [session.masks], progress)[0]
        except Exception as exc:
            raise _fail(exc) from exc
        d = session.ppl_dense[protocol.describe()]
        md = (f"| model | perplexity |\n|---|---|\n| dense | {d:.3f} |\n"
              f"| pruned ({session.masks.total_sparsity():.1%} sparse) | {p:.3f} |\n\n"
              f"Protocol: {protocol.describe()}; exp(mean window NLL), fp32 logits.")
        return (md, {"dense": d, "pruned": p, "protocol": protocol.as_dict()}, *_comparison(session))

    def on_sweep(session: Session, sparsities_text, source, seqlen, max_windows, progress=gr.Progress()):
        """Perplexity at several sparsities: cut from the session's one calibration, or, for a
        structured method (units are solved for one sparsity), pruned again at each."""
        entry = _model(session, default_spec)
        structured = session.artifact is None and session.structured is not None
        if session.artifact is None and not structured:
            raise gr.Error("A sweep cuts from a calibration: calibrate first (imported masks have none).")
        session.cancel.clear()
        try:
            values = [float(v) for v in str(sparsities_text).replace(";", ",").split(",") if v.strip()]
            if not values:
                raise ValueError("Give sparsities separated by commas, e.g. 0.3, 0.5, 0.7.")
            check_seqlen(entry.lm, int(seqlen))  # before pruning at each sparsity
            if structured:
                masks_list = _sweep_structured(session, entry, values, progress)
                how = f"**{session.structured.method}** (structured), pruned at each of {len(values)} sparsities"
            else:
                masks_list = _sweep_cuts(session, values, progress)
                how = f"**{session.artifact.method}**, one calibration, {len(values)} cuts"
            windows, protocol = evaluation_set(entry.lm.tokenizer, (source or DEFAULT_SOURCE).strip(),
                                               int(seqlen), int(max_windows))
            results = _measure(session, entry, windows, protocol, masks_list, progress)
        except Cancelled as exc:
            gr.Warning(str(exc))
            return (f"Cancelled: {exc}", *_comparison(session))
        except Exception as exc:
            raise _fail(exc) from exc
        rows = "".join(f"| {masks_list[i].total_sparsity():.1%} | {results[i]:.3f} |\n" for i in sorted(results))
        md = (f"{how}. Dense {session.ppl_dense[protocol.describe()]:.3f}.\n\n| sparsity | perplexity |\n"
              f"|---|---|\n{rows}\nProtocol: {protocol.describe()}.")
        return (md, *_comparison(session))

    def _sweep_cuts(session: Session, values: list[float], progress) -> list:
        pattern = parse_pattern(session.pattern)
        if pattern.is_nm:
            pattern = parse_pattern("unstructured")  # a sweep varies the unstructured sparsity
        progress(0, desc="cutting the masks")
        return [cut(session.artifact, v, pattern, skip_misfits=True,
                    progress=_progress_fn(progress, f"re-solving {v:.0%}: "),
                    should_stop=session.cancel.is_set) for v in values]

    def _sweep_structured(session: Session, entry: ModelEntry, values: list[float], progress) -> list:
        """One structured prune per sparsity; the session's own run (what the slider shows) stays."""
        run, out = session.structured, []
        for i, v in enumerate(values):
            if run.sparsity == v and session.masks is not None:
                out.append(session.masks)
                continue
            masks, _plan = structured_view.prune_at(
                entry, run, v, _progress_fn(progress, f"{run.method} {i + 1}/{len(values)} at {v:.0%}: "),
                session.cancel.is_set)
            out.append(masks)
        return out

    def _need_masks(session: Session):
        if session.masks is None or session.model is None:
            raise gr.Error("Nothing to export yet: calibrate first (or import a mask file).")

    def on_export_masks(session: Session):
        _need_masks(session)
        try:
            path = session.tmpdir() / f"masks-{int(time.time())}.safetensors"
            return str(save_masks(path, session.masks, session.model.lm))
        except Exception as exc:
            raise _fail(exc) from exc

    def on_export_allocation(session: Session):
        _need_masks(session)
        rows = allocation_table(session.masks, session.model.lm)
        folder = session.tmpdir()
        jpath, cpath = folder / "allocation.json", folder / "allocation.csv"
        jpath.write_text(json.dumps({"meta": session.masks.meta, "total_sparsity": session.masks.total_sparsity(),
                                     "matrices": rows}, indent=2, default=str))
        with cpath.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["name"])
            writer.writeheader()
            writer.writerows(rows)
        return [str(jpath), str(cpath)]

    def on_export_model(session: Session, progress=gr.Progress()):
        _need_masks(session)
        entry = session.model
        folder = session.tmpdir() / "pruned-model"
        progress(0.1, desc="writing the pruned weights")
        try:
            with MODEL_LOCK:
                try:
                    if session.masks.meta.get("pattern") == "structured":  # physically smaller
                        progress(0.1, desc="slicing out the removed heads and channels")
                        export_sliced_model(entry.lm, plan_from_maskset(entry.lm, session.masks), folder,
                                            {"masks": session.masks.meta})
                    else:
                        entry.dense.apply(session.masks)
                        export_pruned_model(entry.lm, folder, {"masks": session.masks.meta,
                                                               "achieved_sparsity": session.masks.total_sparsity()})
                finally:
                    entry.dense.restore()
            progress(0.7, desc="zipping")
            archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
            shutil.rmtree(folder, ignore_errors=True)
        except Exception as exc:
            raise _fail(exc) from exc
        return archive

    def on_import(session: Session, file, block, mtype):
        entry = _model(session, default_spec)
        if file is None:
            raise gr.Error("Choose a mask file (.safetensors) to import.")
        path = file if isinstance(file, str) else getattr(file, "name", str(file))
        try:
            masks = load_masks(path, entry.lm)
        except Exception as exc:
            raise _fail(exc) from exc
        session.masks = masks
        session.artifact = None  # the sliders re-cut from a calibration; an imported file has none
        msg = f"Imported {Path(path).name}. " + _status(session)
        return (msg, *_views(session, block, mtype))

    # ------------------------------------------------------------ layout

    with gr.Blocks(title="Pruning explorer", delete_cache=DELETE_CACHE) as demo:
        # Released (release_session) when the tab closes (demo.unload below) or after SESSION_TTL_S
        # without an event (every handler that takes the session also returns it: see _touching).
        session = gr.State(lambda: Session(), time_to_live=SESSION_TTL_S, delete_callback=release_session)
        gr.Markdown("# Pruning explorer\nCalibrate once, then slide the sparsity and watch what goes.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Accordion("Model", open=True):
                    model_dd = gr.Dropdown(model_choices, value=default_spec, allow_custom_value=True,
                                           label="Model", info="bundled name, local folder or .gguf, or hub id")
                    with gr.Row():
                        dtype_dd = gr.Dropdown(["float32", "bfloat16", "float16"], value="float32", label="dtype")
                        device_dd = gr.Dropdown(devices, value="cpu", label="device")
                    load_btn = gr.Button("Load", variant="secondary")
                    facts = gr.JSON(label="Model facts")
                with gr.Accordion("Calibration", open=True):
                    first = next(iter(methods))
                    method_dd = gr.Dropdown(_method_choices(), value="wanda" if "wanda" in methods else first,
                                            label="Method")
                    method_md = gr.Markdown(_method_info(method_dd.value), elem_classes="method-info")
                    pool_widgets = []
                    init = _param_updates(method_dd.value, pool)
                    for i in range(pool):
                        u_num, u_choice, u_flag = init[3 * i: 3 * i + 3]
                        pool_widgets.append(gr.Number(**_kw(u_num)))
                        pool_widgets.append(gr.Dropdown(**_kw(u_choice)))
                        pool_widgets.append(gr.Checkbox(**_kw(u_flag)))
                    pool_for = gr.Textbox(method_dd.value, visible=False)  # the method the widgets show
                    params_tb = gr.Textbox("", visible=False)  # API: JSON of method parameters
                    source_tb = gr.Textbox(DEFAULT_SOURCE, label="Calibration text",
                                           info="python-docs (offline), wikitext2, c4, or a .txt/.jsonl/.json/.parquet path")
                    with gr.Row():
                        # maxima from this machine's memory and the model's context (calibration_limits)
                        windows_nb = gr.Number(min(DEFAULT_WINDOWS, max_windows), precision=0, minimum=1,
                                               maximum=max_windows, label="windows")
                        seqlen_nb = gr.Number(min(DEFAULT_SEQLEN, max_seqlen), precision=0, minimum=8,
                                              maximum=max_seqlen, label="seqlen")
                    with gr.Row():
                        calib_btn = gr.Button("Calibrate", variant="primary")
                        cancel_btn = gr.Button("Cancel", variant="stop")
            with gr.Column(scale=3):
                status_md = gr.Markdown("Load a model, then calibrate.", elem_classes="status")
                with gr.Tabs():
                    with gr.Tab("Live view"):
                        with gr.Row():
                            sparsity_sl = gr.Slider(0.0, 0.95, value=0.5, step=0.01, label="Target sparsity")
                            pattern_rd = gr.Radio(PATTERNS, value="unstructured", label="Pattern")
                        alloc_plot = gr.Plot(label="Allocation", elem_id="alloc-plot")
                        with gr.Row():
                            block_sl = gr.Slider(0, 1, value=0, step=1, label="Block")
                            mtype_dd = gr.Dropdown(["q", "k", "v", "o", "gate", "up", "down"], value="q",
                                                   label="Matrix type")
                        heat_plot = gr.Plot(label="Saliency and mask", elem_id="heat-plot")
                        hist_plot = gr.Plot(label="Scores", elem_id="hist-plot")
                        summary_js = gr.JSON(label="Cut summary")
                    with gr.Tab("Compare"):
                        prompt_tb = gr.Textbox(_example_prompts()[0], lines=3, label="Prompt")
                        gr.Examples([[p] for p in _example_prompts()], inputs=[prompt_tb])
                        with gr.Row():
                            max_new_nb = gr.Number(48, precision=0, minimum=1, maximum=1024, label="max new tokens")
                            sample_cb = gr.Checkbox(False, label="sample (else greedy)")
                            temp_nb = gr.Number(0.8, minimum=0.05, maximum=2.0, label="temperature")
                            seed_nb = gr.Number(0, precision=0, label="seed")
                            chat_cb = gr.Checkbox(False, label="chat template")
                        gen_btn = gr.Button("Generate", variant="primary")
                        with gr.Row():
                            dense_out = gr.Textbox(label="Dense", lines=8, interactive=False)
                            pruned_out = gr.Textbox(label="Pruned", lines=8, interactive=False)
                        rates_md = gr.Markdown()
                        with gr.Row():
                            eval_src_tb = gr.Textbox(DEFAULT_SOURCE, label="Evaluation text")
                            eval_seqlen_nb = gr.Number(256, precision=0, minimum=8, label="seqlen")
                            eval_windows_nb = gr.Number(8, precision=0, minimum=1, label="max windows")
                        ppl_btn = gr.Button("Perplexity: dense vs pruned")
                        ppl_md = gr.Markdown()
                        ppl_js = gr.JSON(label="Perplexity", visible=False)
                    with gr.Tab("Perplexity vs sparsity"):
                        gr.Markdown("Every perplexity measured in this session (the Compare tab's button or a "
                                    "sweep) lands here, one line per method and pattern, on the evaluation text "
                                    "set in the Compare tab. Calibrate another method and sweep again to compare. "
                                    "Structured methods are pruned again at every sparsity (slower).")
                        with gr.Row():
                            sweep_tb = gr.Textbox("0.3, 0.4, 0.5, 0.6, 0.7", label="sparsities to cut and measure",
                                                  scale=3)
                            sweep_btn = gr.Button("Sweep", variant="primary", scale=1)
                        sweep_md = gr.Markdown()
                        compare_plot = gr.Plot(figures.to_plot(figures.perplexity_figure([])),
                                               label="Perplexity against sparsity")
                        runs_js = gr.JSON(label="Runs", value=[])
                    with gr.Tab("Export"):
                        with gr.Row():
                            exp_masks_btn = gr.Button("Mask file (.safetensors)")
                            exp_alloc_btn = gr.Button("Allocation (JSON + CSV)")
                            exp_model_btn = gr.Button("Pruned model (.zip)")
                        masks_file = gr.File(label="Masks", interactive=False)
                        alloc_files = gr.File(label="Allocation", file_count="multiple", interactive=False)
                        model_file = gr.File(label="Pruned model", interactive=False)
                        gr.Markdown("**Re-import** a mask file made for the loaded model:")
                        import_file = gr.File(label="Mask file to import", file_types=[".safetensors"],
                                              type="filepath")
                        import_btn = gr.Button("Import masks")
                with gr.Accordion("How to read this", open=False):
                    gr.Markdown(HOW_TO_READ)

        # ------------------------------------------------------------ wiring
        views = [alloc_plot, heat_plot, hist_plot, summary_js]
        model_outputs = [facts, status_md, block_sl, mtype_dd, *views]
        # Handlers that take the session also return it (_touching): its time-to-live restarts
        load_btn.click(_touching(on_load_model, model_outputs, at=3), [model_dd, dtype_dd, device_dd, session],
                       [*model_outputs, session], api_name="load_model", concurrency_id=HEAVY)
        demo.load(_touching(on_page_load, model_outputs, at=3), [model_dd, dtype_dd, device_dd, session],
                  [*model_outputs, session], api_name="page_load", api_visibility="undocumented",
                  concurrency_id=HEAVY)
        method_dd.change(on_method, [method_dd], [method_md, pool_for, *pool_widgets], api_name="method",
                         api_visibility="undocumented",
                         queue=False)
        calib_btn.click(_touching(on_calibrate, [status_md, *views]),
                        [session, method_dd, source_tb, windows_nb, seqlen_nb, sparsity_sl,
                         pattern_rd, block_sl, mtype_dd, params_tb, pool_for, *pool_widgets],
                        [status_md, *views, session], api_name="calibrate", concurrency_id=HEAVY)
        cancel_btn.click(on_cancel, [session], [status_md], api_name="cancel", concurrency_limit=None,
                         concurrency_id="cancel")
        cut_inputs = [session, sparsity_sl, pattern_rd, block_sl, mtype_dd]
        cut_outputs = [status_md, *views]
        sparsity_sl.release(_touching(on_cut, cut_outputs), cut_inputs, [*cut_outputs, session], api_name="cut",
                            trigger_mode="always_last", concurrency_limit=4, concurrency_id="cut",
                            show_progress="minimal")
        pattern_rd.input(_touching(on_cut, cut_outputs), cut_inputs, [*cut_outputs, session], api_name="pattern",
                         api_visibility="undocumented", trigger_mode="always_last", concurrency_limit=4,
                         concurrency_id="cut")
        gr.on([w.input for w in pool_widgets], _touching(on_params, cut_outputs),
              [session, method_dd, pool_for, sparsity_sl, pattern_rd, block_sl, mtype_dd, *pool_widgets],
              [*cut_outputs, session], api_name="params", api_visibility="undocumented", trigger_mode="always_last",
              concurrency_limit=4, concurrency_id="cut", show_progress="minimal")
        gr.on([block_sl.release, mtype_dd.input], _touching(on_view, [heat_plot, hist_plot]),
              [session, block_sl, mtype_dd], [heat_plot, hist_plot, session],
              api_name="view", trigger_mode="always_last", concurrency_limit=4, concurrency_id="cut",
              show_progress="minimal")
        gen_outputs = [dense_out, pruned_out, rates_md]
        gen_btn.click(_touching(on_generate, gen_outputs),
                      [session, prompt_tb, max_new_nb, sample_cb, temp_nb, seed_nb, chat_cb],
                      [*gen_outputs, session], api_name="generate", concurrency_id=HEAVY)
        ppl_outputs = [ppl_md, ppl_js, compare_plot, runs_js]
        ppl_btn.click(_touching(on_perplexity, ppl_outputs), [session, eval_src_tb, eval_seqlen_nb, eval_windows_nb],
                      [*ppl_outputs, session], api_name="perplexity", concurrency_id=HEAVY)
        sweep_outputs = [sweep_md, compare_plot, runs_js]
        sweep_btn.click(_touching(on_sweep, sweep_outputs),
                        [session, sweep_tb, eval_src_tb, eval_seqlen_nb, eval_windows_nb],
                        [*sweep_outputs, session], api_name="sweep", concurrency_id=HEAVY)
        exp_masks_btn.click(_touching(on_export_masks, [masks_file]), [session], [masks_file, session],
                            api_name="export_masks")
        exp_alloc_btn.click(_touching(on_export_allocation, [alloc_files]), [session], [alloc_files, session],
                            api_name="export_allocation")
        exp_model_btn.click(_touching(on_export_model, [model_file]), [session], [model_file, session],
                            api_name="export_model", concurrency_id=HEAVY)
        import_btn.click(_touching(on_import, cut_outputs), [session, import_file, block_sl, mtype_dd],
                         [*cut_outputs, session], api_name="import_masks", concurrency_id=HEAVY)
        # A closed tab (its heartbeat gone; a gradio_client's close()) releases its session at once,
        # instead of gradio's hour-long grace for closed sessions.
        def on_unload(request: gr.Request) -> None:
            _unload(demo, request)

        demo.unload(on_unload)
    return demo


def _touching(fn, outputs: list, at: int = 0):
    """`fn`, a handler whose input number `at` is the session, returning the session too (wire
    it with `[*outputs, session]`): gradio stores a returned State again, which restarts its
    time-to-live, so a session expires after SESSION_TTL_S without events, not that long after
    it was made, and the unload event can release it (gradio only deletes states it stored)."""
    single = len(outputs) == 1

    def tail(out, args):
        return (out, args[at]) if single else (*out, args[at])

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            for out in fn(*args, **kwargs):
                yield tail(out, args)
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return tail(fn(*args, **kwargs), args)
    return call


def _unload(demo: gr.Blocks, request) -> None:
    """The unload event: delete the closing session's states now (each State's delete_callback,
    here release_session, runs), rather than an hour after the tab closed."""
    holder = getattr(demo, "state_holder", None)
    if holder is not None and request is not None and request.session_hash:
        holder.delete_state(request.session_hash)


def _kw(update: dict) -> dict:
    """Constructor kwargs from a gr.update dict."""
    return {k: v for k, v in update.items() if k != "__type__"}


def _locked_stream(entry: ModelEntry, masks, prompt: str, settings: GenerationSettings, chat: bool):
    """Stream a generation with `masks` applied (None: dense) under MODEL_LOCK.

    A worker thread owns the lock from apply to restore, so the weights are always put back
    and the lock released even if the browser goes away mid-stream and this generator is
    never resumed."""
    chunks: queue.Queue = queue.Queue()

    def work():
        with MODEL_LOCK:
            try:
                if masks is not None:
                    entry.dense.apply(masks)
                else:
                    entry.dense.restore()
                for item in stream_generate(entry.lm, prompt, settings, chat=chat):
                    chunks.put(("chunk", item))
            except BaseException as exc:  # re-raised in the consumer
                chunks.put(("error", exc))
            finally:
                entry.dense.restore()
                chunks.put(("done", None))

    threading.Thread(target=work, daemon=True, name="explorer-generate").start()
    while True:
        kind, item = chunks.get()
        if kind == "chunk":
            yield item
        elif kind == "error":
            raise item
        else:
            return


def _sliced_model(session: Session, entry: ModelEntry, masks):
    """For structured masks, the physically smaller model they stand for (built once per mask
    set, kept on the session), so the pruned side's tokens/s is the smaller model's; None for
    other masks (those run as the dense model with zeroed weights: same size, same speed)."""
    if masks.meta.get("pattern") != "structured":
        return None
    if session.sliced is None or session.sliced[0] is not masks:
        session.sliced = None  # drop the previous copy before making the next
        with MODEL_LOCK:  # the copy must be taken from the dense weights, not another tab's masked ones
            entry.dense.restore()
            model = slice_model(entry.lm, plan_from_maskset(entry.lm, masks))
        session.sliced = (masks, dataclasses.replace(entry.lm, model=model))
    return session.sliced[1]


def _sliced_note(entry: ModelEntry, sliced) -> str:
    """What the rates line adds when the pruned side is the sliced model (counted once per generation)."""
    if sliced is None:
        return ""
    n_pruned = sum(p.numel() for p in sliced.model.parameters())
    n_dense = sum(p.numel() for p in entry.lm.model.parameters())
    return f" | pruned side: the sliced model, {n_pruned:,} of {n_dense:,} parameters"


def _rates_md(rates: dict, masks) -> str:
    parts = [f"{k}: {v:.1f} tokens/s" for k, v in rates.items()]
    return " | ".join(parts) + f" | pruned at {masks.total_sparsity():.1%} sparsity, same settings and seed"


def theme() -> gr.themes.Theme:
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate")


def css() -> str:
    path = ASSETS / "style.css"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


# Gradio's Plot re-creates its plotly element for every new value, and the old element's effect
# first draws the new figure into the element about to be removed: each update was drawn twice
# (about half the browser's work after a slider move). This defers every Plotly.react to the
# next animation frame (still before that frame is painted) and skips elements that have left
# the page by then. window.Plotly is set when gradio's plotly module first loads: patched then.
PLOTLY_ONCE_JS = """
<script>
(() => {
  const patch = (P) => {
    if (!P || typeof P.react !== "function" || P.__drawOnce) return P;
    const react = P.react;
    P.react = function (gd, ...args) {
      return new Promise((resolve, reject) => requestAnimationFrame(() => {
        const el = typeof gd === "string" ? document.getElementById(gd) : gd;
        if (!el || !el.isConnected) { resolve(el); return; }
        try { Promise.resolve(react.call(P, el, ...args)).then(resolve, reject); } catch (err) { reject(err); }
      }));
    };
    P.__drawOnce = true;
    return P;
  };
  let plotly = patch(window.Plotly);
  Object.defineProperty(window, "Plotly", {configurable: true, enumerable: true,
    get: () => plotly, set: (value) => { plotly = patch(value); }});
})();
</script>
"""


def head() -> str:
    """Extra <head> HTML: the single-draw fix for gradio's plots (PLOTLY_ONCE_JS)."""
    return PLOTLY_ONCE_JS


def launch_kwargs() -> dict:
    """What launch() needs for the look and the plots (gradio 6 takes theme, css and head at launch).

    run_history=False: gradio 6's run history copies every event's inputs and outputs into the
    browser's localStorage (up to 100 runs, re-serialised whole after each event, retried entry
    by entry when the quota is exceeded). With ~0.5 MB of figures per slider move that was about
    a third of the browser's work per move, for a history of slider positions nobody replays."""
    return {"theme": theme(), "css": css(), "head": head(), "run_history": False}
