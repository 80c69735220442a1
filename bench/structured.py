"""Structured pruning on smollm2-135m under protocol wt2-512 (../shared/data/README.md).

Rows: dense; Wanda-sp, FLAP, StructPrune (uniform vs softmax allocation), SPAP, Týr (no search
vs search) at 12.5 / 25 / 37.5 / 50% of the decoder's attention + MLP parameters. Per row:
perplexity, achieved structured sparsity, prune seconds, peak resident memory, and the
parameter count of the physically sliced model. Each row is saved as it finishes
(<name>.partial.json), so a long run can be resumed with --only and merged with --report-only.

    python bench/structured.py                         # everything (long: Týr's search dominates)
    python bench/structured.py --only flap,spap --levels 0.25,0.5
    python bench/structured.py --report-only
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, PeakRSS, Timer, add_protocol_args, print_table, protocol_label, save, wt2_sources  # noqa: E402
from core.data import calibration_set, evaluation_set  # noqa: E402
from core.evaluate import perplexity  # noqa: E402
from core.dense import DenseWeights  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.structured.pipeline import prune_structured  # noqa: E402
from core.structured.units import all_block_units, decoder_params  # noqa: E402

# row name -> (registered method, parameters)
CONFIGS = {
    "wanda-sp": ("wanda-sp", {}),
    "flap": ("flap", {}),
    "structprune-uniform": ("structprune", {"allocation": "uniform"}),
    "structprune": ("structprune", {}),
    "spap": ("spap", {}),
    "tyr-nosearch": ("tyr", {"search": False}),
    "tyr": ("tyr", {}),
    # ablations of Týr's defaults (chosen on held-out calibration text, bench/heldout.py)
    "tyr-nosearch build_tokens=8192": ("tyr", {"search": False, "build_tokens": 8192}),
    "tyr build_tokens=8192": ("tyr", {"build_tokens": 8192}),
}
LEVELS = (0.125, 0.25, 0.375, 0.5)
META_KEYS = ("fitness_kl", "no_search_fitness_kl", "fitness_tokens", "stage_tokens", "generations_run", "history",
             "layer_sparsity_targets")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--only", default="", help=f"comma-separated rows, in order (default all: {', '.join(CONFIGS)})")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="structured sparsities")
    ap.add_argument("--name", default="structured")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (runs merged later)")
    ap.add_argument("--report-only", action="store_true", help="table, JSON and plot from the partial results")
    ap.add_argument("--merge", default="", help="with --report-only: also these runs' partial results")
    args = ap.parse_args()
    torch.manual_seed(0)
    calib_src, eval_src = wt2_sources()
    protocol_name = protocol_label(args)
    lm = load_model(args.model)
    partial_path = RESULTS / f"{args.name}.partial.json"
    if args.report_only:
        rows = json.loads(partial_path.read_text())["rows"]
        for other in filter(None, args.merge.split(",")):
            rows += json.loads((RESULTS / f"{other}.partial.json").read_text())["rows"]
        _report(args, rows, protocol_name, lm)
        return
    units = all_block_units(lm)
    total = decoder_params(units)
    dense = DenseWeights(lm)
    cw, cp = calibration_set(lm.tokenizer, calib_src, args.calib_windows, args.seqlen, seed=0)
    ew, ep = evaluation_set(lm.tokenizer, eval_src, args.seqlen, args.eval_windows)
    rows = []
    if not args.no_dense:
        with PeakRSS() as mem:
            ppl = perplexity(lm, ew, ep.as_dict()).value
        rows.append({"method": "dense", "sparsity": 0.0, "achieved": 0.0, "ppl": ppl, "peak_gib": mem.gib,
                     "params": sum(p.numel() for p in lm.model.parameters())})
        print(f"dense ppl {ppl:.3f}", flush=True)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"Unknown --only row(s): {', '.join(unknown)}; known: {'; '.join(CONFIGS)}.")
    for name in names:
        method, params = CONFIGS[name]
        for level in [float(x) for x in args.levels.split(",")]:
            with PeakRSS() as mem, Timer() as t:
                masks, plan = prune_structured(lm, method, cw, level, params, cp.as_dict(), dense)
            ppl = perplexity(lm, ew, ep.as_dict()).value
            removed = plan.removed_params(units)
            row = {"method": name, "sparsity": level, "achieved": removed / total, "ppl": ppl,
                   "prune_s": t.seconds, "peak_gib": mem.gib,
                   "params": sum(p.numel() for p in lm.model.parameters()) - removed + len(plan.biases) * lm.config.hidden_size,
                   "allocation": plan.allocation(units),
                   # the method's own numbers (Týr: fitness of the best vs the uniform start, history)
                   "meta": {k: v for k, v in plan.meta.items() if k in META_KEYS}}
            dense.restore()
            rows.append(row)
            print(f"{name} {level:.3f}: ppl {ppl:.3f}, achieved {row['achieved']:.4f}, {t.seconds:.0f} s, "
                  f"peak {mem.gib:.2f} GiB", flush=True)
            RESULTS.mkdir(parents=True, exist_ok=True)
            partial_path.write_text(json.dumps({"protocol": protocol_name, "rows": rows}, indent=2, default=str))
    _report(args, rows, protocol_name, lm, cp, ep)


def _report(args, rows, protocol_name, lm, cp=None, ep=None) -> None:
    order = {name: i for i, name in enumerate(["dense", *CONFIGS])}
    rows = sorted(rows, key=lambda r: (order.get(r["method"], 99), r["sparsity"]))
    print(f"\nProtocol: {protocol_name}; model {lm.model_id}; fp32 on {lm.device}; torch threads {torch.get_num_threads()}")
    table = print_table(rows, [("method", "method", ""), ("sparsity", "target", ".3f"), ("achieved", "achieved", ".4f"),
                               ("ppl", "ppl", ".2f"), ("prune_s", "prune s", ".0f"), ("peak_gib", "peak GiB", ".2f"),
                               ("params", "params (sliced)", ",")])
    pivot = _pivot(rows)
    path = save(args.name, {"protocol": protocol_name, "calibration": cp.as_dict() if cp else None,
                            "evaluation": ep.as_dict() if ep else None, "model": lm.facts(), "rows": rows},
                table + "\n\n" + pivot)
    _plot(rows, path.with_suffix(".html"), protocol_name)
    print(f"saved {path}")


def _pivot(rows: list[dict]) -> str:
    """Perplexity by method (rows) and target sparsity (columns), the lowest per column in bold."""
    levels = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    ppl = {(r["method"], r["sparsity"]): r["ppl"] for r in rows}
    best = {lv: min((ppl[m, lv] for m in methods if (m, lv) in ppl), default=None) for lv in levels}
    lines = ["| method | " + " | ".join(f"{lv:.1%}" for lv in levels) + " |", "|---" * (len(levels) + 1) + "|"]
    for m in methods:
        cells = []
        for lv in levels:
            v = ppl.get((m, lv))
            cells.append("-" if v is None else f"**{v:.2f}**" if v == best[lv] else f"{v:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


def _plot(rows: list[dict], path: Path, protocol: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == method)
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=method))
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    if dense:
        fig.add_hline(y=dense[0], line_dash="dot", annotation_text="dense")
    fig.update_layout(title=f"Perplexity vs structured sparsity ({protocol})", xaxis_title="fraction of decoder "
                      "attention + MLP parameters removed", yaxis_title="perplexity", yaxis_type="log")
    fig.write_html(path, include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
