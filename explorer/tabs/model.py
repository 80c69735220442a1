"""The Model panel: load a model (shared by every session), or the default one when a page opens."""
from __future__ import annotations

import gradio as gr

from .. import figures
from ..common import NO_MASKS, fail
from ..limits import take_seat
from ..state import Session, get_model

N_OUTPUTS = 10  # facts, status, block, matrix type, allocation, heatmap, histogram, summary, compare block, type


def on_load_model(spec, dtype, device, offload, session: Session):
    spec = (spec or "").strip() or session.default_spec
    try:
        take_seat(session)
        entry = get_model(spec, dtype or "auto", device or "cpu", offload or "none")
    except Exception as exc:
        raise fail(exc) from exc
    if session.model is not entry:
        session.model = entry
        session.reset_pruning()  # runs are of one model
    session.shown = (None, None)  # the plots are emptied below
    lm = entry.lm
    types = list(dict.fromkeys(lm.family.linears.values()))
    empty = figures.to_plot(figures.empty_figure(NO_MASKS))
    status = f"Loaded **{lm.model_id}** ({lm.family.name}, {len(lm.blocks)} blocks)."
    blocks = gr.update(maximum=max(len(lm.blocks) - 1, 0), value=0)
    kinds = gr.update(choices=types, value=types[0])
    return (lm.facts(), status, blocks, kinds, empty, empty, empty, {}, blocks, kinds)


def on_page_load(spec, dtype, device, offload, session: Session):
    """The page opened: load the app's default model (a failure is a warning, not an error)."""
    try:
        return on_load_model(spec, dtype, device, offload, session)
    except gr.Error as exc:
        gr.Warning(f"Could not load the default model: {exc.message}")
        return (gr.skip(),) * N_OUTPUTS


def skip_page_load(spec, dtype, device, offload, session: Session):
    """The page opened on an app started without autoload: nothing to do."""
    return (gr.skip(),) * N_OUTPUTS
