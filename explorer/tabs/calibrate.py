"""The Calibration panel: choose a method and its parameters, calibrate (each calibration adds
a run to the session), cancel, and re-cut at once when a parameter only changes the cut."""
from __future__ import annotations

import json

import gradio as gr

from core.cutting import LazyMasks
from core.data import DEFAULT_SOURCE, calibration_set, check_seqlen
from core.errors import Cancelled
from core.memory import APP_HINTS, CalibrationMemoryError, ModelShapes, available_bytes, check_calibration_memory, largest_fitting
from core.methods import all_methods, get_method
from core.pruning import calibrate, update_cut_params
from core.run_source import ArtifactCut
from core.packing import PackedMasks
from core.patterns import parse_pattern
from core.structured.units import all_block_units

from .. import figures, limits, structured_view
from ..common import CALIB_BATCH, NO_BOUND, checked_number, checked_sparsity, ensure_model, fail, progress_fn
from ..state import ModelEntry, Run, Session, model_as
from ..views import cancelled_status, status, views
from .live import sync_cheap_runs

DEFAULT_WINDOWS, DEFAULT_SEQLEN = 16, 256  # the calibration widgets' initial values
FALLBACK_LIMITS = (1024, 4096)  # used only when the default model's config cannot be read


# ---------------------------------------------------------------- the widgets

def method_choices() -> list[tuple[str, str]]:
    return [(f"{m.title or m.name} ({m.name})", name) for name, m in all_methods().items()]


def default_method() -> str:
    methods = all_methods()
    return "wanda" if "wanda" in methods else next(iter(methods))


def pool_size() -> int:
    """Parameter widget slots: as many as the method with the most parameters has."""
    return max([len(m.params) for m in all_methods().values()] + [1])


def calibration_limits(spec: str, method: str = "wanda", available: int | None = None) -> tuple[int, int]:
    """The calibration widgets' maxima, from this machine: the most windows (at the default
    seqlen) and the longest seqlen (at the default windows, at most the model's context) whose
    estimated calibration memory (core.memory) fits the memory available now. The calibrate
    handler still checks the actual request against the memory free when it runs."""
    from core.loading import load_config

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


def param_updates(method_name: str, pool: int | None = None) -> list:
    """Visibility, labels and defaults of the generic parameter widgets for a method."""
    method = get_method(method_name)
    updates = []
    for i in range(pool_size() if pool is None else pool):
        p = method.params[i] if i < len(method.params) else None
        label = f"{p.name}: {p.help}" if p else ""
        numeric = bool(p and p.kind in ("float", "int"))
        # explicit bounds: None would keep the previous method's, and gradio checks a number
        # against its bounds even when it is hidden (0 below OWL's M >= 1 refused a calibration)
        num = gr.update(visible=numeric, label=label, value=p.default if numeric else 0,
                        minimum=p.low if numeric and p.low is not None else -NO_BOUND,
                        maximum=p.high if numeric and p.high is not None else NO_BOUND,
                        precision=0 if p and p.kind == "int" else None)
        choice = gr.update(visible=bool(p and p.kind == "choice"), label=label,
                           choices=[str(c) for c in p.choices] if p and p.kind == "choice" else [""],
                           value=str(p.default) if p and p.kind == "choice" else "")
        flag = gr.update(visible=bool(p and p.kind == "bool"), label=label,
                         value=bool(p.default) if p and p.kind == "bool" else False)
        updates += [num, choice, flag]
    return updates


def collect_params(method_name: str, pool_values: tuple, pool_for: str = "", params_json: str = "") -> dict:
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


def method_info(method_name: str) -> str:
    m = get_method(method_name)
    note = " Changing the sparsity re-solves every matrix (slow)." if m.updates_weights else ""
    if m.structured:
        note = (" Structured: Calibrate prunes whole attention units and MLP channels at the slider's sparsity "
                "(a fraction of the decoder's parameters); releasing the slider prunes again; the model "
                "export is physically smaller.")
    return f"**{m.title or m.name}**: {m.description} Patterns: {', '.join(m.patterns)}.{note}"


# ---------------------------------------------------------------- memory held by runs

def run_nbytes(run: Run) -> int:
    """Memory a run holds: what its source keeps (an artifact's tensors, a structured run's
    calibration windows), and masks / weights already made."""
    total = run.source.nbytes() if run.source is not None else 0
    if run.masks is not None:
        total += masks_nbytes(run.masks.masks)
        total += sum(w.numel() * w.element_size() for w in run.masks.weights.values())
    return total


def masks_nbytes(masks) -> int:
    """Bytes a mapping of masks holds as it holds them: packed bits (one bit a weight, rows padded
    to whole bytes), the masks a lazy mapping made so far, or plain tensors; nothing is unpacked."""
    if isinstance(masks, PackedMasks):
        return sum(masks.packed(name).numel() for name in masks)
    names = masks.made() if isinstance(masks, LazyMasks) else list(masks)
    return sum(masks[n].numel() * masks[n].element_size() for n in names)


def memory_available(device) -> int | None:
    """What a new calibration may take (a function, so a test can stand in for the machine)."""
    return available_bytes(device)


def check_memory(session: Session, lm, method, windows: int, seqlen: int, params: dict) -> None:
    """Refuse, before any work, a calibration that would not fit beside the session's runs."""
    mode = "structured" if method.structured else "calibrate"
    try:
        check_calibration_memory(lm, method, windows, seqlen, CALIB_BATCH, mode, params,
                                 available=memory_available(str(lm.device)), hints=APP_HINTS)
    except CalibrationMemoryError as exc:
        runs = list(session.runs)
        if not runs:
            raise
        held = sum(run_nbytes(r) for r in runs)
        raise CalibrationMemoryError(
            f"{exc} This session holds {len(runs)} run{'s' if len(runs) > 1 else ''} "
            f"({', '.join(r.name for r in runs)}: {held / 2**30:.2f} GiB); a new run needs room beside them: "
            "delete a run (Live view, run list) to make room.", exc.estimate, exc.available) from None


# ---------------------------------------------------------------- handlers

def on_method(method_name):
    return [method_info(method_name), method_name] + param_updates(method_name)


def on_cancel(session: Session):
    session.cancel.set()
    return "Cancelling at the next block..."


def resumable(session: Session, entry: ModelEntry, method, params: dict, protocol: dict):
    """The session's interrupted calibration if it was made with these exact settings, else None."""
    artifact = session.interrupted
    if artifact is None or artifact.dense is not entry.dense or artifact.method != method.name:
        return None
    if artifact.params != method.resolve_params(params):
        return None
    return artifact if {k: v for k, v in artifact.protocol.items() if k != "mode"} == protocol else None


def on_calibrate(session: Session, method_name, source, windows, seqlen, sparsity, pattern, block, mtype,
                 params_json, pool_for, *pool_values, progress=gr.Progress()):
    """Calibrate a method and cut it at the slider: a new run of the session (made active and
    shown beside the runs already shown). A cancelled calibration adds nothing."""
    entry = ensure_model(session)
    lm = entry.lm
    session.cancel.clear()
    try:
        limits.check_new_run(session)
        params = collect_params(method_name, pool_values, pool_for, params_json)
        method = get_method(method_name)
        # every number checked before any work: the widgets', and the parameters by their schema
        windows = checked_number(windows, "windows", 1, integer=True)
        seqlen = checked_number(seqlen, "seqlen", 2, integer=True)
        sparsity = checked_sparsity(sparsity)
        method.resolve_params(params)
        check_seqlen(lm, int(seqlen))  # a window the model cannot take: refuse before any work
        # what calibration will hold, from the shapes, against the memory free now (beside the
        # session's runs): refuse before allocating
        check_memory(session, lm, method, int(windows), int(seqlen), params)
        progress(0, desc="tokenizing the calibration text")
        data, protocol = calibration_set(lm.tokenizer, (source or DEFAULT_SOURCE).strip(),
                                         int(windows), int(seqlen), seed=0)
        if method.structured:  # units are solved for one sparsity: prune now, re-prune on slider release
            yield from _calibrate_structured(session, entry, method_name, params, data, protocol,
                                             float(sparsity), block, mtype, progress)
            return
        artifact = resumable(session, entry, method, params, protocol.as_dict())
        session.interrupted = None
        if artifact is None:
            with model_as(entry):  # the forward passes need the weights dense
                artifact = calibrate(lm, method, data, protocol.as_dict(), params, dense=entry.dense,
                                     progress=progress_fn(progress, "calibrating"),
                                     should_stop=session.cancel.is_set)
        pat = parse_pattern(pattern)
        if pat.is_nm and "nm" not in method.patterns:
            pattern = "unstructured"
        source = ArtifactCut(artifact, skip_misfits=True)
        try:  # the session's runs change only once the new masks are complete
            masks = source.masks_at(float(sparsity), parse_pattern(pattern), progress_fn(progress, "cutting"),
                                    session.cancel.is_set)
        except Cancelled:
            session.interrupted = artifact  # Calibrate at these settings resumes from it
            raise
        run = session.runs.add(Run(id="", name=method_name, method=method_name, params=dict(artifact.params),
                                   pattern=str(pattern), text=protocol.describe(), source=source,
                                   masks=masks, sparsity=float(sparsity)))
        session.sparsity, session.pattern = float(sparsity), str(pattern)
        notes = sync_cheap_runs(session, skip=run)
    except Cancelled as exc:
        gr.Warning(str(exc))
        yield (cancelled_status(session, exc, resume="press **Calibrate** again at the same settings"),
               *views(session, block, mtype))
        return
    except Exception as exc:
        raise fail(exc) from exc
    shown = ", ".join(f"{k}={v}" for k, v in artifact.params.items())
    msg = (f"Calibrated **{method_name}**{f' ({shown})' if shown else ''} on {protocol.describe()} in "
           f"{artifact.calibration_seconds:.1f} s. " + " ".join([status(session), *notes]))
    yield (msg, *views(session, block, mtype))


def _calibrate_structured(session: Session, entry: ModelEntry, method_name: str, params: dict, data, protocol,
                          sparsity: float, block, mtype, progress):
    """A structured method prunes at the slider's sparsity now (streaming a search's best
    allocation so far); the run re-prunes when the slider moves."""
    lm = entry.lm
    source = structured_view.reprune_source(entry, method_name, params, data, protocol.as_dict())
    units = all_block_units(lm)
    masks = None
    for kind, item, info in structured_view.prune_streaming(
            source, sparsity, progress_fn(progress, "pruning"), session.cancel.is_set):
        if kind == "plan":  # a search's best candidate so far: animate its allocation
            title = f"best so far: generation {info.get('generation', '?')}"
            if "fitness" in info:
                title += f", fitness {info['fitness']:.4g}"
            fig = structured_view.allocation_figure(item.allocation(units), sparsity, title)
            yield (f"{method_name}: searching... {title}. Cancel keeps the model as it was.",
                   figures.to_plot(fig), gr.update(), gr.update(), gr.update())
            continue
        masks = item
    session.runs.add(Run(id="", name=method_name, method=method_name, params=dict(source.params),
                         pattern="structured", text=protocol.describe(), source=source, masks=masks,
                         sparsity=sparsity))
    session.sparsity = sparsity
    session.shown = (None, None)  # the search drew its own allocation meanwhile
    notes = sync_cheap_runs(session)
    yield (f"Pruned **{method_name}** (structured) on {protocol.describe()} in {source.seconds:.1f} s; "
           "moving the sparsity slider re-prunes. " + " ".join([status(session), *notes]),
           *views(session, block, mtype))


def on_params(session: Session, method_name, pool_for, sparsity, pattern, block, mtype, *pool_values):
    """A parameter widget changed: re-cut the active run at once when only the cut depends on it."""
    run = session.active
    artifact = run.artifact if run is not None else None
    if artifact is None or artifact.method != method_name or pool_for != method_name:
        return (gr.update(), *[gr.update()] * 4)
    try:
        sparsity = checked_sparsity(sparsity)
        needs = update_cut_params(artifact, collect_params(method_name, pool_values, pool_for))
        if needs:
            return (f"Changing {', '.join(needs)} needs a new calibration: press **Calibrate**. "
                    + status(session), *[gr.update()] * 4)
        run.params = dict(artifact.params)
        if artifact.method_obj.updates_weights:  # a re-solve takes minutes: only on request
            return ("Parameters stored; move the sparsity slider to re-solve with them.", *[gr.update()] * 4)
        run.masks = run.source.masks_at(float(sparsity), parse_pattern(pattern))
        run.sparsity, run.pattern = float(sparsity), str(pattern)
    except Exception as exc:
        raise fail(exc) from exc
    return (status(session), *views(session, block, mtype))
