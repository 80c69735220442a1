"""Pure data -> plotly Figure functions for the explorer. No gradio, no model: easy to test."""
from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

MATRIX_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "fc1", "fc2", "in", "out")
MAX_SIDE = 256
_TEMPLATE = "plotly_white"


def _layout(fig: go.Figure, title: str, **extra) -> go.Figure:
    # Transparent backgrounds so the figure reads in the light and the dark theme alike.
    fig.update_layout(title=title, template=_TEMPLATE, paper_bgcolor="rgba(0,0,0,0)",
                      plot_bgcolor="rgba(0,0,0,0)", margin=dict(l=50, r=20, t=60, b=40),
                      font=dict(color="#888"), **extra)
    return fig


def empty_figure(message: str) -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", height=320)


def _type_order(types) -> list[str]:
    present = list(dict.fromkeys(types))
    known = [t for t in MATRIX_ORDER if t in present]
    return known + [t for t in present if t not in known]


def allocation_figure(rows: list[dict], target: float | None = None, title_extra: str = "") -> go.Figure:
    """Grouped bars: sparsity of each block, one bar per matrix type, with the target as a line.

    `rows` is core.masks.allocation_table output (block, type, params, pruned, sparsity)."""
    if not rows:
        return empty_figure("No masks yet: calibrate, or import a mask file.")
    pruned = sum(r["pruned"] for r in rows)
    total = sum(r["params"] for r in rows)
    blocks = sorted({r["block"] for r in rows})
    fig = go.Figure()
    for kind in _type_order(r["type"] for r in rows):
        by_block = {}
        for r in rows:
            if r["type"] == kind:
                p, n = by_block.get(r["block"], (0, 0))
                by_block[r["block"]] = (p + r["pruned"], n + r["params"])
        fig.add_bar(name=kind, x=blocks, y=[by_block[b][0] / by_block[b][1] if b in by_block else None for b in blocks],
                    hovertemplate=f"block %{{x}} {kind}: %{{y:.1%}}<extra></extra>")
    if target is not None:
        fig.add_hline(y=target, line_dash="dash", line_color="#e45756",
                      annotation_text=f"target {target:.0%}", annotation_position="top left")
    title = f"Sparsity per block and matrix type: total {pruned / max(total, 1):.1%} of {total:,} weights"
    if title_extra:
        title += f" ({title_extra})"
    fig.update_yaxes(title="sparsity (pruned fraction)", range=[0, 1], tickformat=".0%")
    fig.update_xaxes(title="block", dtick=1 if len(blocks) <= 32 else None)
    return _layout(fig, title, barmode="group", height=380, legend=dict(orientation="h", y=-0.2))


def downsample(matrix: torch.Tensor, max_side: int = MAX_SIDE, mode: str = "max") -> tuple[np.ndarray, bool]:
    """Pool a 2-D tensor down to at most max_side x max_side ('max' or 'mean'); return (array, pooled?)."""
    x = matrix.detach().float()
    h, w = x.shape
    if h <= max_side and w <= max_side:
        return x.cpu().numpy(), False
    out = (min(h, max_side), min(w, max_side))
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return pool(x[None, None], out)[0, 0].cpu().numpy(), True


def saliency_figure(scores: torch.Tensor | None, mask: torch.Tensor | None, name: str,
                    score_label: str = "saliency") -> go.Figure:
    """Two panels: log10 scores (max-pooled) and the kept fraction of the mask (mean-pooled).

    Cells sit at the first original row / column they cover, so hovering shows where in the
    full matrix a pooled cell comes from."""
    from plotly.subplots import make_subplots

    if mask is None:
        return empty_figure("No mask for this matrix.")
    h, w = mask.shape
    mask_img, pooled = downsample(mask.float(), mode="mean")
    titles = []
    if scores is not None:
        log_scores = torch.log10(scores.detach().float().abs() + 1e-12)
        score_img, _ = downsample(log_scores, mode="max")
        titles.append(f"log10 {score_label}" + (" (max-pooled)" if pooled else ""))
    titles.append("kept fraction" + (" (mean-pooled)" if pooled else "") + ": 1 = kept, 0 = pruned")
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles, horizontal_spacing=0.08)
    ys = [i * h // mask_img.shape[0] for i in range(mask_img.shape[0])]
    xs = [j * w // mask_img.shape[1] for j in range(mask_img.shape[1])]
    rows_per, cols_per = h / mask_img.shape[0], w / mask_img.shape[1]
    where = (f"rows %{{y}}..+{rows_per:.3g}, cols %{{x}}..+{cols_per:.3g}" if pooled
             else "row %{y}, col %{x}")
    col = 1
    if scores is not None:
        fig.add_trace(go.Heatmap(z=score_img, x=xs, y=ys, colorscale="Viridis", colorbar=dict(x=0.45, len=0.9),
                                 hovertemplate=where + ": log10 " + ("max " if pooled else "")
                                 + "%{z:.2f}<extra></extra>"), 1, 1)
        col = 2
    fig.add_trace(go.Heatmap(z=mask_img, x=xs, y=ys, colorscale="Greys", reversescale=True, zmin=0, zmax=1,
                             colorbar=dict(x=1.0, len=0.9),
                             hovertemplate=where + ": %{z:.2f} kept<extra></extra>"), 1, col)
    for c in range(1, len(titles) + 1):
        fig.update_yaxes(autorange="reversed", title="output row" if c == 1 else None, row=1, col=c)
        fig.update_xaxes(title="input column", row=1, col=c)
    size = f"{h}x{w}"
    shown = f"{mask_img.shape[0]}x{mask_img.shape[1]}"
    title = f"{name}: {size}" + (f", downsampled to {shown} by pooling" if pooled else "")
    return _layout(fig, title, height=420)


def threshold_of(scores: torch.Tensor, mask: torch.Tensor) -> float | None:
    """The largest pruned score (a matrix-wide view of the cut; row-scoped methods cut per row)."""
    pruned = scores[~mask]
    return float(pruned.max()) if pruned.numel() else None


def histogram_figure(scores: torch.Tensor | None, mask: torch.Tensor | None, name: str, scope: str = "row",
                     bins: int = 80, max_values: int = 200_000, score_label: str = "saliency") -> go.Figure:
    """Histogram of log10 saliency, pruned and kept stacked, with the cut threshold as a line."""
    if scores is None or mask is None:
        return empty_figure("No scores for this matrix (imported masks carry none).")
    s = torch.log10(scores.detach().float().abs().flatten() + 1e-12)
    m = mask.flatten()
    if s.numel() > max_values:
        idx = torch.randperm(s.numel(), generator=torch.Generator().manual_seed(0))[:max_values]
        s, m = s[idx], m[idx]
    s_np, m_np = s.numpy(), m.numpy()
    edges = np.histogram_bin_edges(s_np, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for label, sel, color in (("pruned", ~m_np, "#e45756"), ("kept", m_np, "#4c78a8")):
        counts, _ = np.histogram(s_np[sel], bins=edges)
        fig.add_bar(x=centers, y=counts, name=label, marker_color=color, width=(edges[1] - edges[0]))
    thr = threshold_of(scores.detach().float().abs(), mask)
    if thr is not None and thr > 0:
        fig.add_vline(x=math.log10(thr + 1e-12), line_dash="dash", line_color="#222",
                      annotation_text="threshold", annotation_position="top right")
    note = {"row": " (per-row thresholds; line = largest pruned score)",
            "sorted": " (global budget: each matrix's own threshold)"}.get(scope, "")
    fig.update_xaxes(title=f"log10 {score_label}")
    fig.update_yaxes(title="weights" + (" (sampled)" if scores.numel() > max_values else ""))
    return _layout(fig, f"Score histogram of {name}{note}", barmode="stack", height=340,
                   legend=dict(orientation="h", y=-0.25))


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
