"""Pure data -> Plotly figure functions for the explorer. No gradio, no model: easy to test.

Figures are plain Plotly JSON dicts, not plotly.graph_objects: building a go.Figure validates
every property in Python (~100-200 ms per figure on this 2-core machine), which alone would blow
the slider's budget. Arrays go out as Plotly's base64 typed arrays (what plotly.py itself emits),
so a 256 x 256 heatmap is ~350 kB of JSON rather than ~1.5 MB of decimal text. Heatmap cells are
whole, evenly spaced tiles, which plotly.js draws as one scaled image.
`to_plot(spec)` wraps a dict for gr.Plot.
"""
from __future__ import annotations

import base64
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

MATRIX_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "fc1", "fc2", "in", "out")
MAX_SIDE = 256
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6",
           "#9d755d", "#bab0ac", "#1f77b4", "#17becf")
# Several runs on one chart: colour-blind-safe (Okabe-Ito) colours that stay apart on a projector,
# and a marker shape per run, so the runs differ even where colours wash out.
RUN_COLORS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C564B", "#7F7F7F")
RUN_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon")
_AXIS = {"gridcolor": "rgba(128,128,128,0.25)", "zerolinecolor": "rgba(128,128,128,0.4)"}


def typed_array(values) -> dict:
    """A numpy array as Plotly's base64 typed array (uint8 kept as is, else float32 or int32)."""
    a = np.ascontiguousarray(values)
    if a.dtype != np.uint8:
        a = a.astype(np.float32 if a.dtype.kind == "f" or a.dtype == bool else np.int32, copy=False)
    code = {np.dtype(np.uint8): "u1", np.dtype(np.float32): "f4", np.dtype(np.int32): "i4"}[a.dtype]
    out = {"dtype": code, "bdata": base64.b64encode(a.tobytes()).decode()}
    if a.ndim > 1:
        out["shape"] = ", ".join(str(s) for s in a.shape)
    return out


def to_plot(spec: dict):
    """A figure dict as gradio's plot payload (no plotly.py round trip; orjson, a gradio
    dependency, writes the ~300 kB of a heatmap several times faster than json)."""
    from gradio.components.plot import PlotData

    try:
        import orjson
    except ImportError:  # pragma: no cover - gradio installs it
        return PlotData(type="plotly", plot=json.dumps(spec))
    return PlotData(type="plotly", plot=orjson.dumps(spec, option=orjson.OPT_SERIALIZE_NUMPY).decode())


def base_figure(data: list, title: str, height: int, **layout) -> dict:
    # Transparent backgrounds and grey text so the figure reads in the light and the dark theme.
    base = {"title": {"text": title, "font": {"size": 14}}, "paper_bgcolor": "rgba(0,0,0,0)",
            "plot_bgcolor": "rgba(0,0,0,0)", "margin": {"l": 55, "r": 20, "t": 60, "b": 45},
            "font": {"color": "#888"}, "height": height, "xaxis": dict(_AXIS), "yaxis": dict(_AXIS)}
    for key, value in layout.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return {"data": data, "layout": base}


def title_of(spec: dict) -> str:
    return spec["layout"]["title"]["text"]


def empty_figure(message: str) -> dict:
    return base_figure([], "", 320, xaxis={"visible": False}, yaxis={"visible": False},
                   annotations=[{"text": message, "showarrow": False, "x": 0.5, "y": 0.5, "xref": "paper",
                                 "yref": "paper", "font": {"size": 14}}])


def target_line(y: float, text: str) -> tuple[dict, dict]:
    shape = {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "y0": y, "y1": y,
             "line": {"dash": "dash", "color": "#e45756"}}
    note = {"text": text, "xref": "paper", "x": 0, "y": y, "yanchor": "bottom", "xanchor": "left",
            "showarrow": False, "font": {"color": "#e45756"}}
    return shape, note


def _type_order(types) -> list[str]:
    present = list(dict.fromkeys(types))
    known = [t for t in MATRIX_ORDER if t in present]
    return known + [t for t in present if t not in known]


def allocation_figure(rows: list[dict], target: float | None = None, title_extra: str = "") -> dict:
    """Grouped bars: sparsity of each block, one bar per matrix type, with the target as a line.

    `rows` is core.maskset.allocation_table output (block, type, params, pruned, sparsity)."""
    if not rows:
        return empty_figure("No masks yet: calibrate, or import a mask file.")
    pruned = sum(r["pruned"] for r in rows)
    total = sum(r["params"] for r in rows)
    blocks = sorted({r["block"] for r in rows})
    data = []
    for i, kind in enumerate(_type_order(r["type"] for r in rows)):
        by_block = {}
        for r in rows:
            if r["type"] == kind:
                p, n = by_block.get(r["block"], (0, 0))
                by_block[r["block"]] = (p + r["pruned"], n + r["params"])
        data.append({"type": "bar", "name": kind, "x": blocks, "marker": {"color": PALETTE[i % len(PALETTE)]},
                     "y": [by_block[b][0] / by_block[b][1] if b in by_block else None for b in blocks],
                     "hovertemplate": f"block %{{x}} {kind}: %{{y:.1%}}<extra></extra>"})
    shapes, notes = [], []
    if target is not None:
        shape, note = target_line(target, f"target {target:.0%}")
        shapes, notes = [shape], [note]
    title = f"Sparsity per block and matrix type: total {pruned / max(total, 1):.1%} of {total:,} weights"
    if title_extra:
        title += f" ({title_extra})"
    return base_figure(data, title, 380, barmode="group", shapes=shapes, annotations=notes,
                   legend={"orientation": "h", "y": -0.2},
                   yaxis={"title": {"text": "sparsity (pruned fraction)"}, "range": [0, 1], "tickformat": ".0%"},
                   xaxis={"title": {"text": "block"}, "dtick": 1 if len(blocks) <= 32 else None})


def tile_sides(h: int, w: int, max_side: int = MAX_SIDE) -> tuple[int, int]:
    """Rows and columns per heatmap cell: the smallest whole tiles that leave at most max_side
    cells a side (1 = not pooled)."""
    return -(-h // max_side), -(-w // max_side)


def downsample(matrix: torch.Tensor, max_side: int = MAX_SIDE, mode: str = "max") -> tuple[np.ndarray, bool]:
    """Pool a 2-D tensor in whole tiles (tile_sides) down to at most max_side x max_side cells
    ('max' or 'mean'; a last, partial tile pools what it covers); return (array, pooled?).

    Whole tiles, not adaptive pooling: every cell covers the same rows and columns, so the cells
    sit at evenly spaced positions, and plotly.js draws an evenly spaced heatmap as one scaled
    image (several times faster in the browser than painting uneven cells pixel by pixel)."""
    x = matrix.detach().float()
    kh, kw = tile_sides(*x.shape, max_side)
    if kh == kw == 1:
        return x.cpu().numpy(), False
    pool = F.max_pool2d if mode == "max" else F.avg_pool2d
    return pool(x[None, None], (kh, kw), (kh, kw), ceil_mode=True)[0, 0].cpu().numpy(), True


class PreparedScores:
    """What the heatmap and histogram need from one matrix's scores, computed once per
    calibration: scores do not change when the slider moves, only the mask does."""

    def __init__(self, scores: torch.Tensor, max_values: int = 200_000, bins: int = 80):
        self.abs_scores = scores.detach().float().abs()
        self.shape = tuple(scores.shape)
        # log10 is monotonic: pool first, then take the log of the (small) pooled image and of
        # the sample only, not of the whole matrix (the same numbers, a fraction of the passes)
        image, self.pooled = downsample(self.abs_scores, mode="max")
        self.image = torch.log10(torch.from_numpy(image) + 1e-12).numpy()
        flat = self.abs_scores.reshape(-1)
        self.sampled = flat.numel() > max_values
        # a fixed, evenly spread sample: the same weights are drawn after every cut
        self.index = (torch.arange(max_values) * (flat.numel() // max_values) if self.sampled else None)
        self.values = torch.log10((flat.index_select(0, self.index) if self.sampled else flat) + 1e-12)
        lo, hi = float(self.values.min()), float(self.values.max())
        hi = hi if hi > lo else lo + 1e-6
        self.lo, self.hi, self.bins = lo, hi, bins
        self.edges = np.linspace(lo, hi, bins + 1)
        # each sampled weight's bin, and all bins' totals: a cut then only counts the kept ones
        self.bin_of = ((self.values - lo) / (hi - lo) * bins).long().clamp_(0, bins - 1)
        self.totals = torch.bincount(self.bin_of, minlength=bins).double()
        self.image_z = typed_array(self.image)  # the heatmap's score panel, encoded once

    def mask_sample(self, mask: torch.Tensor) -> torch.Tensor:
        flat = mask.reshape(-1)
        return flat.index_select(0, self.index) if self.sampled else flat


def _matrix_panels(panels: list[tuple[str, dict]], gap: float, width: float) -> tuple[list, dict, list]:
    """Heatmaps of one matrix side by side, each `width` wide (paper fraction) with `gap` between:
    (traces, their axes for the layout, the annotations titling each panel). panels: (title,
    heatmap trace); a trace's colorbar (0.9 long, 12 thick unless the trace says) sits at its
    panel's right edge. Rows run downwards, as in the matrix."""
    data, layout, notes = [], {}, []
    for i, (title, trace) in enumerate(panels):
        suffix = "" if i == 0 else str(i + 1)
        x0 = i * (width + gap)
        trace.update(xaxis=f"x{suffix}", yaxis=f"y{suffix}",
                     colorbar={"len": 0.9, "thickness": 12, **trace.get("colorbar", {}), "x": x0 + width + 0.005})
        data.append(trace)
        layout[f"xaxis{suffix}"] = {**_AXIS, "domain": [x0, x0 + width], "anchor": f"y{suffix}",
                                    "title": {"text": "input column"}}
        layout[f"yaxis{suffix}"] = {**_AXIS, "anchor": f"x{suffix}", "autorange": "reversed",
                                    "title": {"text": "output row" if i == 0 else ""}}
        notes.append({"text": title, "x": x0 + width / 2, "y": 1.0, "xref": "paper", "yref": "paper",
                      "xanchor": "center", "yanchor": "bottom", "showarrow": False})
    return data, layout, notes


def saliency_figure(scores: torch.Tensor | None, mask: torch.Tensor | None, name: str,
                    score_label: str = "saliency", prepared: PreparedScores | None = None) -> dict:
    """Two panels: log10 scores (max-pooled) and the kept fraction of the mask (mean-pooled).

    Cells sit at the first original row / column they cover, so hovering shows where in the
    full matrix a pooled cell comes from."""
    if mask is None:
        return empty_figure("No mask for this matrix.")
    h, w = mask.shape
    mask_img, pooled = downsample(mask.float(), mode="mean")
    mask_img = np.rint(mask_img * 100).astype(np.uint8)  # percent kept: one byte per cell in the JSON
    kh, kw = tile_sides(h, w)
    ys = list(range(0, h, kh))  # each cell's first row and column: evenly spaced (see downsample)
    xs = list(range(0, w, kw))
    where = f"rows %{{y}}..+{kh}, cols %{{x}}..+{kw}" if pooled else "row %{y}, col %{x}"
    panels = []  # (title, trace)
    if scores is not None or prepared is not None:
        score_z = (prepared or PreparedScores(scores)).image_z
        panels.append((f"log10 {score_label}" + (" (max-pooled)" if pooled else ""),
                       {"type": "heatmap", "z": score_z, "x": xs, "y": ys, "colorscale": "Viridis",
                        "hovertemplate": where + ": log10 " + ("max " if pooled else "") + "%{z:.2f}<extra></extra>"}))
    panels.append(("kept %" + (" (mean-pooled)" if pooled else "") + ": 100 = kept, 0 = pruned",
                   {"type": "heatmap", "z": typed_array(mask_img), "x": xs, "y": ys, "colorscale": "Greys",
                    "reversescale": True, "zmin": 0, "zmax": 100,
                    "hovertemplate": where + ": %{z}% kept<extra></extra>"}))
    gap = 0.1
    data, layout, notes = _matrix_panels(panels, gap, (1 - gap * (len(panels) - 1)) / len(panels))
    shown = f"{mask_img.shape[0]}x{mask_img.shape[1]}"
    title = f"{name}: {h}x{w}" + (f", downsampled to {shown} by pooling {kh}x{kw} tiles" if pooled else "")
    return base_figure(data, title, 420, annotations=notes, **layout)


def threshold_of(scores: torch.Tensor, mask: torch.Tensor) -> float | None:
    """The largest pruned score (a matrix-wide view of the cut; row-scoped methods cut per row);
    None when nothing is pruned."""
    if mask.numel() == 0:
        return None
    largest = float(scores.masked_fill(mask, float("-inf")).max())  # one pass, no boolean gather
    return None if largest == float("-inf") else largest


def histogram_figure(scores: torch.Tensor | None, mask: torch.Tensor | None, name: str, scope: str = "row",
                     score_label: str = "saliency", prepared: PreparedScores | None = None) -> dict:
    """Histogram of log10 scores, pruned and kept stacked, with the cut threshold as a line."""
    if (scores is None and prepared is None) or mask is None:
        return empty_figure("No scores for this matrix (imported masks carry none).")
    prep = prepared or PreparedScores(scores)
    keep = prep.mask_sample(mask)
    centers = (prep.edges[:-1] + prep.edges[1:]) / 2
    kept = torch.bincount(prep.bin_of, weights=keep.double(), minlength=prep.bins)
    data = []
    for label, counts, color in (("pruned", prep.totals - kept, "#e45756"), ("kept", kept, "#4c78a8")):
        counts = counts.round().to(torch.int32).numpy()
        data.append({"type": "bar", "name": label, "x": typed_array(centers), "y": typed_array(counts),
                     "marker": {"color": color}, "width": float(prep.edges[1] - prep.edges[0])})
    shapes, notes = [], []
    thr = threshold_of(prep.abs_scores, mask)
    if thr is not None and thr > 0:
        x = math.log10(thr + 1e-12)
        shapes.append({"type": "line", "yref": "paper", "y0": 0, "y1": 1, "x0": x, "x1": x,
                       "line": {"dash": "dash", "color": "#888"}})
        notes.append({"text": "threshold", "x": x, "y": 1, "yref": "paper", "xanchor": "left",
                      "showarrow": False})
    note = {"row": " (per-row thresholds; line = largest pruned score)",
            "global": " (global budget: each matrix's own threshold)"}.get(scope, "")
    return base_figure(data, f"Score histogram of {name}{note}", 340, barmode="stack", shapes=shapes,
                   annotations=notes, legend={"orientation": "h", "y": -0.25},
                   xaxis={"title": {"text": f"log10 {score_label}"}},
                   yaxis={"title": {"text": "weights" + (" (evenly sampled)" if prep.sampled else "")}})


def _ppl_key(r: dict):
    """A measured point's line: its run (runs keep their own line), else its method and pattern."""
    return ("run", r["run"]) if r.get("run") else (r["method"], r["pattern"])


def perplexity_figure(runs: list[dict], dense: dict[str, float] | None = None) -> dict:
    """Perplexity against sparsity, one line per run of this session (points measured before
    runs were named: one line per method and pattern).

    runs: {"method", "pattern", "sparsity", "ppl", "protocol"[, "run"]}; only points that share
    the latest point's protocol are drawn (numbers from different texts do not compare)."""
    if not runs:
        return empty_figure("Measure perplexity (or run a sweep) to compare methods here.")
    protocol = runs[-1]["protocol"]
    same = [r for r in runs if r["protocol"] == protocol]
    data = []
    for i, key in enumerate(dict.fromkeys(_ppl_key(r) for r in same)):
        points = sorted({r["sparsity"]: r["ppl"] for r in same if _ppl_key(r) == key}.items())
        name = key[1] if key[0] == "run" else f"{key[0]} ({key[1]})"
        data.append({"type": "scatter", "mode": "lines+markers", "name": name,
                     "x": [p[0] for p in points], "y": [p[1] for p in points],
                     "line": {"color": RUN_COLORS[i % len(RUN_COLORS)], "width": 3},
                     "marker": {"size": 8, "symbol": RUN_SYMBOLS[i % len(RUN_SYMBOLS)]},
                     "hovertemplate": f"{name}: %{{x:.1%}} sparse, ppl %{{y:.2f}}<extra></extra>"})
    shapes, notes = [], []
    if dense and protocol in dense:
        shape, note = target_line(dense[protocol], f"dense {dense[protocol]:.2f}")
        shape["line"] = {"dash": "dot", "color": "#888"}
        note["font"] = {"color": "#888"}
        shapes, notes = [shape], [note]
    hidden = len(runs) - len(same)
    title = "Perplexity against sparsity" + (f" ({hidden} runs on other texts hidden)" if hidden else "")
    return base_figure(data, title, 400, shapes=shapes, annotations=notes, legend={"orientation": "h", "y": -0.25},
                   xaxis={"title": {"text": "achieved sparsity"}, "tickformat": ".0%"},
                   yaxis={"title": {"text": "perplexity (log scale)"}, "type": "log"})


# ---------------------------------------------------------------- several runs

def _block_sparsity(rows: list[dict]) -> dict[int, float]:
    acc: dict[int, tuple[int, int]] = {}
    for r in rows:
        p, n = acc.get(r["block"], (0, 0))
        acc[r["block"]] = (p + r["pruned"], n + r["params"])
    return {b: p / max(n, 1) for b, (p, n) in acc.items()}


def allocation_overlay_figure(series: list[dict], target: float | None = None, mode: str = "block") -> dict:
    """Several runs' allocations on one chart, one trace per run.

    series: {"name", "rows" (core.maskset.allocation_table of its masks), "structured" (the
    per-block structured allocation, or None), "pattern"}. mode "block": the pruned fraction of
    each block's weights; "type": of each matrix type within each block (x = "block type").
    A structured run's matrix masks remove whole rows / columns, so on the same axes its q/k/v/o
    points are the attention units removed and gate/up/down the MLP channels removed."""
    series = [s for s in series if s.get("rows")]
    if not series:
        return empty_figure("No run shown: tick a run in the run list.")
    data = []
    blocks = sorted({r["block"] for s in series for r in s["rows"]})
    categories: list[str] = []
    if mode == "type":
        types = _type_order(r["type"] for s in series for r in s["rows"])
        categories = [f"{b} {t}" for b in blocks for t in types
                      if any(r["block"] == b and r["type"] == t for s in series for r in s["rows"])]
    for i, s in enumerate(series):
        rows = s["rows"]
        pruned = sum(r["pruned"] for r in rows)
        total = sum(r["params"] for r in rows)
        name = f"{s['name']}: total {pruned / max(total, 1):.1%}"
        style = {"color": RUN_COLORS[i % len(RUN_COLORS)]}
        marker = {**style, "size": 9, "symbol": RUN_SYMBOLS[i % len(RUN_SYMBOLS)]}
        structured = {r["block"]: r for r in (s.get("structured") or [])}
        if mode == "type":
            acc: dict[str, tuple[int, int]] = {}
            for r in rows:
                key = f"{r['block']} {r['type']}"
                p, n = acc.get(key, (0, 0))
                acc[key] = (p + r["pruned"], n + r["params"])
            xs = [c for c in categories if c in acc]
            ys = [acc[c][0] / max(acc[c][1], 1) for c in xs]
            what = "of the matrix's weights" + (" (whole rows / columns: units and channels)" if structured else "")
            data.append({"type": "scatter", "mode": "markers", "name": name, "x": xs, "y": ys, "marker": marker,
                         "hovertemplate": f"{s['name']}, block %{{x}}: %{{y:.1%}} {what}<extra></extra>"})
        else:
            per_block = _block_sparsity(rows)
            ys = [per_block.get(b) for b in blocks]
            trace = {"type": "scatter", "mode": "lines+markers", "name": name, "x": blocks, "y": ys,
                     "line": {**style, "width": 3}, "marker": marker,
                     "hovertemplate": f"{s['name']}, block %{{x}}: %{{y:.1%}} of its weights<extra></extra>"}
            if structured:
                trace["customdata"] = [
                    f"{structured[b]['attn_units'] - structured[b]['attn_units_kept']}/{structured[b]['attn_units']} "
                    f"attention units, {structured[b]['channels'] - structured[b]['channels_kept']}/"
                    f"{structured[b]['channels']} MLP channels removed" if b in structured else "" for b in blocks]
                trace["hovertemplate"] = (f"{s['name']}, block %{{x}}: %{{y:.1%}} of its weights; "
                                          "%{customdata}<extra></extra>")
            data.append(trace)
    shapes, notes = [], []
    if target is not None:
        shape, note = target_line(target, f"target {target:.0%}")
        shape["line"] = {"dash": "dash", "color": "#777", "width": 2}
        note["font"] = {"color": "#777", "size": 13}
        shapes, notes = [shape], [note]
    per = "per matrix type within each block" if mode == "type" else "per block"
    title = f"Sparsity {per}: {len(series)} runs" + (f" at target {target:.0%}" if target is not None else "")
    xaxis = ({"title": {"text": "block and matrix type"}, "type": "category", "categoryorder": "array",
              "categoryarray": categories, "tickangle": -90, "tickfont": {"size": 9}}
             if mode == "type" else {"title": {"text": "block"}, "dtick": 1 if len(blocks) <= 32 else None,
                                     "range": [blocks[0] - 0.5, blocks[-1] + 0.5]})
    return base_figure(data, title, 420 if mode == "type" else 380, shapes=shapes, annotations=notes,
                   legend={"orientation": "h", "y": -0.4 if mode == "type" else -0.28, "font": {"size": 14}},
                   yaxis={"title": {"text": "sparsity (pruned fraction)"}, "range": [0, 1], "tickformat": ".0%"},
                   xaxis=xaxis, font={"color": "#888", "size": 13})


AGREEMENT_COLORS = ("#f0f0f0", "#E69F00", "#0072B2", "#303030")  # pruned by both, only B, only A, kept by both


def agreement_figure(dominant: np.ndarray, agree: np.ndarray, shape: tuple[int, int], tile: tuple[int, int],
                     name: str, label_a: str, label_b: str, counts: dict) -> dict:
    """Two panels for one matrix and two runs: each (pooled) cell coloured by its most common case
    (kept by both, only by A, only by B, pruned by both), and the percentage of its weights on
    which the two runs agree. `dominant` holds compare.CLASSES codes, `agree` percents (uint8)."""
    h, w = shape
    kh, kw = tile
    pooled = kh > 1 or kw > 1
    ys, xs = list(range(0, h, kh)), list(range(0, w, kw))
    where = f"rows %{{y}}..+{kh}, cols %{{x}}..+{kw}" if pooled else "row %{y}, col %{x}"
    classes = ("pruned by both", f"kept only by B ({label_b})", f"kept only by A ({label_a})", "kept by both")
    scale = []
    for i, color in enumerate(AGREEMENT_COLORS):
        scale += [[i / 4, color], [(i + 1) / 4, color]]
    code_text = "; ".join(f"{i} = {c}" for i, c in enumerate(("pruned by both", "only B", "only A", "kept by both")))
    panels = [
        ("most common case per tile" if pooled else "kept / pruned by each run",
         {"type": "heatmap", "z": typed_array(dominant.astype(np.uint8)), "x": xs, "y": ys, "colorscale": scale,
          "zmin": -0.5, "zmax": 3.5,
          "colorbar": {"tickvals": [0, 1, 2, 3], "ticktext": list(classes), "len": 0.9, "thickness": 12},
          "hovertemplate": where + ": case %{z} (" + code_text + ")<extra></extra>"}),
        ("% of weights on which A and B agree" + (" (mean-pooled)" if pooled else ""),
         {"type": "heatmap", "z": typed_array(agree.astype(np.uint8)), "x": xs, "y": ys, "colorscale": "Greys",
          "reversescale": False, "zmin": 0, "zmax": 100, "colorbar": {"len": 0.9, "thickness": 12},
          "hovertemplate": where + ": %{z}% agree<extra></extra>"}),
    ]
    data, layout, notes = _matrix_panels(panels, gap=0.22, width=0.36)
    title = f"{name}: A = {label_a}, B = {label_b}, Jaccard {counts['jaccard']:.3f}"
    if pooled:
        title += f" (pooled {kh}x{kw} tiles)"
    return base_figure(data, title, 440, annotations=notes, **layout)


def jaccard_figure(rows: list[dict], whole: float, label_a: str, label_b: str) -> dict:
    """Blocks x matrix type heatmap of the Jaccard overlap of two runs' kept weights.

    rows: {"block", "type", "jaccard"} (explorer.compare.overlaps)."""
    if not rows:
        return empty_figure("Choose two runs to compare.")
    blocks = sorted({r["block"] for r in rows})
    types = _type_order(r["type"] for r in rows)
    z = np.full((len(types), len(blocks)), np.nan, dtype=np.float32)
    bi, ti = {b: i for i, b in enumerate(blocks)}, {t: i for i, t in enumerate(types)}
    for r in rows:
        z[ti[r["type"]], bi[r["block"]]] = r["jaccard"]
    trace = {"type": "heatmap", "z": typed_array(z), "x": blocks, "y": types, "colorscale": "Viridis",
             "zmin": 0, "zmax": 1, "colorbar": {"title": {"text": "Jaccard"}, "thickness": 12},
             "hovertemplate": "block %{x} %{y}: Jaccard %{z:.3f}<extra></extra>"}
    title = (f"Overlap of kept weights (Jaccard, 1 = the same weights kept), {label_a} vs {label_b}: "
             f"whole model {whole:.3f}")
    return base_figure([trace], title, 120 + 28 * len(types),
                   xaxis={"title": {"text": "block"}, "dtick": 1 if len(blocks) <= 32 else None},
                   yaxis={"title": {"text": "matrix type"}, "autorange": "reversed", "type": "category"})


def summary(rows: list[dict]) -> dict:
    """Total and per-type sparsity: what the client/tests read back after a cut."""
    pruned = sum(r["pruned"] for r in rows)
    total = sum(r["params"] for r in rows)
    per_type = {}
    for r in rows:
        p, n = per_type.get(r["type"], (0, 0))
        per_type[r["type"]] = (p + r["pruned"], n + r["params"])
    return {"total_sparsity": round(pruned / max(total, 1), 6), "matrices": len(rows),
            "per_type": {k: round(p / n, 6) for k, (p, n) in per_type.items()}}
