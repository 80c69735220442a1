"""Structured methods in the explorer: a run prunes at one sparsity (units are solved for it,
so moving the slider re-prunes, with progress and Cancel), and its allocation is drawn per
block as attention units and MLP channels removed."""
from __future__ import annotations

import json

import torch

from core.maskset import MaskSet
from core.run_source import StructuredReprune

from .figures import PALETTE, base_figure, empty_figure, target_line
from .state import ModelEntry, model_as
from .streaming import Streamed


def reprune_source(entry: ModelEntry, method: str, params: dict, windows: torch.Tensor,
                   protocol: dict) -> StructuredReprune:
    """A structured run's source: each prune takes the shared model under the lock, dense, and puts
    the weights back dense (sessions apply their masks only while they use the model)."""
    return StructuredReprune(entry.lm, entry.dense, method, windows, params, protocol,
                             using_model=lambda: model_as(entry))


def prune_streaming(source: StructuredReprune, sparsity: float, progress=None, should_stop=None):
    """`source.masks_at` in a worker thread (explorer.streaming); yields ("plan", plan, info) whenever
    the method publishes a better intermediate plan (Týr's search: info has generation, fitness,
    iteration), then ("done", masks, None). Plans that arrive while the caller is busy are skipped
    for the newest, so a slow page never falls behind the search. Errors (Cancelled included) are
    re-raised here; a reader that stops reading stops the prune at its next check."""
    def work(emit, stop):
        def stopped() -> bool:
            return stop.is_set() or bool(should_stop and should_stop())

        return source.masks_at(sparsity, None, progress, stopped, on_plan=lambda plan, info: emit(("plan", plan, info)))

    stream = Streamed(work, name="explorer-structured", coalesce=lambda event: event[0] == "plan")
    yield from stream
    yield ("done", stream.result, None)


def allocation_of(masks: MaskSet) -> list[dict] | None:
    """The per-block structured allocation a mask set carries (a loaded file has it as JSON)."""
    value = masks.meta.get("allocation_structured")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    return value or None


def allocation_figure(allocation: list[dict], target: float | None = None, title_extra: str = "") -> dict:
    """Per block: fraction of attention units and of MLP channels removed (bars) and of the
    block's parameters (line), with the target."""
    if not allocation:
        return empty_figure("No structured allocation in these masks.")
    blocks = [r["block"] for r in allocation]
    heads = [1 - r["attn_units_kept"] / max(r["attn_units"], 1) for r in allocation]
    chans = [1 - r["channels_kept"] / max(r["channels"], 1) for r in allocation]
    kept_heads = [f"{r['heads_kept']}/{r['heads']} heads" for r in allocation]
    kept_chans = [f"{r['channels_kept']}/{r['channels']} channels" for r in allocation]
    data = [
        {"type": "bar", "name": "attention units removed", "x": blocks, "y": heads, "customdata": kept_heads,
         "marker": {"color": PALETTE[0]}, "hovertemplate": "block %{x}: %{y:.0%} removed, %{customdata} kept<extra></extra>"},
        {"type": "bar", "name": "MLP channels removed", "x": blocks, "y": chans, "customdata": kept_chans,
         "marker": {"color": PALETTE[5]}, "hovertemplate": "block %{x}: %{y:.1%} removed, %{customdata} kept<extra></extra>"},
        {"type": "scatter", "mode": "lines+markers", "name": "block parameters removed", "x": blocks,
         "y": [r["sparsity"] for r in allocation], "line": {"color": PALETTE[3]},
         "hovertemplate": "block %{x}: %{y:.1%} of its parameters<extra></extra>"},
    ]
    shapes, notes = [], []
    if target is not None:
        shape, note = target_line(target, f"target {target:.0%}")
        shapes, notes = [shape], [note]
    title = "Structured: units removed per block"
    if title_extra:
        title += f" ({title_extra})"
    return base_figure(data, title, 380, barmode="group", shapes=shapes, annotations=notes,
                   legend={"orientation": "h", "y": -0.2},
                   yaxis={"title": {"text": "removed fraction"}, "range": [0, 1], "tickformat": ".0%"},
                   xaxis={"title": {"text": "block"}, "dtick": 1 if len(blocks) <= 32 else None})
