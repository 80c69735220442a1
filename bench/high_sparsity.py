"""How firm the 70% rows are: each headline method over several calibration seeds, and with its
statistics summed in float64 beside float32, under protocol wt2-512 (../shared/data/README.md).

At 70% unstructured, smollm2-135m's perplexity moves with small changes of the statistics, so
a comparison between methods holds only where their spreads do not overlap. Rows: Wanda, OWL
and SparseGPT block by block (as bench/baselines.py runs them), UniPruning frozen (its default
Wanda saliency) and its AdamW variant calibrated once and cut at the target with the global-row
controller (as bench/unipruning.py does). Calibration seed = the seed of the calibration window
starts (seed 0 is the protocol's); evaluation windows never change.

    python bench/high_sparsity.py                         # seeds 0,1,2 in fp32, seed 0 also in fp64
    python bench/high_sparsity.py --methods wanda,owl --seeds 0,1 --fp64-seeds ""
    python bench/high_sparsity.py --report-only           # the table from the rows measured so far

Rows are saved after each one (<name>.partial.json); a re-run skips the rows already there, so
an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, PeakRSS, Timer, add_protocol_args, print_table, protocol_label, save, wt2_sources  # noqa: E402
from core.calibrate import statistics_dtype  # noqa: E402
from core.data import calibration_set, evaluation_set  # noqa: E402
from core.dense import DenseWeights  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.evaluate import perplexity  # noqa: E402
from core.patterns import parse_pattern  # noqa: E402
from core.pruning import calibrate, cut, prune_sequential, update_cut_params  # noqa: E402

SEQUENTIAL = {"wanda", "owl", "sparsegpt"}  # pruned block by block, as bench/baselines.py
ARTIFACT = {"unipruning": "unipruning", "unipruning-adamw": "unipruning-adamw"}  # calibrate once, cut
METHODS = ["owl", "unipruning", "wanda", "sparsegpt", "unipruning-adamw"]  # cheapest-first within a seed


def _row_key(row: dict) -> tuple:
    return row["method"], row["seed"], row["stats"]


def run_row(lm, dense, method: str, seed: int, stats: str, sparsity: float, cw, cp, ew, ep) -> dict:
    """Prune `method` at `sparsity` from windows `cw`, evaluate on `ew`, restore the dense model."""
    torch.manual_seed(seed)
    dtype = torch.float64 if stats == "float64" else torch.float32
    pattern = parse_pattern("unstructured")
    with statistics_dtype(dtype), PeakRSS() as mem, Timer() as t:
        if method in SEQUENTIAL:
            masks, _ = prune_sequential(lm, method, cw, sparsity, pattern, protocol=cp.as_dict(), dense=dense)
        else:
            artifact = calibrate(lm, ARTIFACT[method], cw, cp.as_dict(), {}, dense=dense)
            update_cut_params(artifact, {"controller": "global-row"})
            masks = cut(artifact, sparsity, pattern)
            dense.apply(masks)
            del artifact
    ppl = perplexity(lm, ew, ep.as_dict()).value
    dense.restore()
    return {"method": method, "seed": seed, "stats": stats, "sparsity": sparsity,
            "achieved": masks.total_sparsity(), "ppl": ppl, "prune_s": t.seconds, "peak_gib": mem.gib}


def summarize(rows: list[dict], methods: list[str]) -> list[dict]:
    """Per method: the fp32 perplexity of every seed, their min / median / max, and the fp64 value(s)."""
    out = []
    for method in methods:
        fp32 = sorted((r["seed"], r["ppl"]) for r in rows if r["method"] == method and r["stats"] == "float32")
        fp64 = sorted((r["seed"], r["ppl"]) for r in rows if r["method"] == method and r["stats"] == "float64")
        if not fp32 and not fp64:
            continue
        values = [p for _, p in fp32]
        out.append({
            "method": method,
            "fp32_by_seed": ", ".join(f"{s}: {p:.1f}" for s, p in fp32) or "-",
            "min": min(values) if values else None,
            "median": statistics.median(values) if values else None,
            "max": max(values) if values else None,
            "fp64_by_seed": ", ".join(f"{s}: {p:.1f}" for s, p in fp64) or "-",
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds run with float32 statistics")
    ap.add_argument("--fp64-seeds", default="0", help="calibration seeds also run with float64 statistics")
    ap.add_argument("--name", default="high_sparsity")
    ap.add_argument("--report-only", action="store_true", help="no runs: the table from <name>.partial.json")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - SEQUENTIAL - set(ARTIFACT)
    if unknown:
        raise SystemExit(f"unknown method(s) {sorted(unknown)}; known: {sorted(SEQUENTIAL | set(ARTIFACT))}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    fp64_seeds = [int(s) for s in args.fp64_seeds.split(",") if s.strip()]
    # The other seeds first, then float64, then seed 0 (the protocol's: its float32 rows repeat the
    # README's tables, so they come last, as a check).
    plan = ([(s, "float32") for s in seeds if s != 0] + [(s, "float64") for s in fp64_seeds]
            + [(s, "float32") for s in seeds if s == 0])
    calib_src, eval_src = wt2_sources()
    protocol_name = protocol_label(args)
    partial_path = RESULTS / f"{args.name}.partial.json"
    rows = json.loads(partial_path.read_text())["rows"] if partial_path.exists() else []
    done = {_row_key(r) for r in rows}
    lm = load_model(args.model)
    ew, ep = evaluation_set(lm.tokenizer, eval_src, args.seqlen, args.eval_windows)
    if not args.report_only:
        dense = DenseWeights(lm)
        for seed, stats in plan:
            cw, cp = calibration_set(lm.tokenizer, calib_src, args.calib_windows, args.seqlen, seed=seed)
            for method in methods:
                if (method, seed, stats) in done:
                    continue
                row = run_row(lm, dense, method, seed, stats, args.sparsity, cw, cp, ew, ep)
                rows.append(row)
                print(row, flush=True)
                save(args.name + ".partial", {"protocol": protocol_name, "rows": rows}, "")
    print(f"\nProtocol: {protocol_name}; model {lm.model_id}; fp32 weights; {args.sparsity:.0%} unstructured; "
          f"torch threads {torch.get_num_threads()}")
    detail = print_table(rows, [("method", "method", ""), ("seed", "calib seed", ""), ("stats", "statistics", ""),
                                ("ppl", "ppl", ".2f"), ("achieved", "achieved", ".4f"),
                                ("prune_s", "prune s", ".0f"), ("peak_gib", "peak GiB", ".2f")])
    print()
    summary_rows = summarize(rows, methods)
    summary = print_table(summary_rows, [("method", "method", ""), ("fp32_by_seed", "fp32 ppl by seed", ""),
                                         ("min", "min", ".1f"), ("median", "median", ".1f"),
                                         ("max", "max", ".1f"), ("fp64_by_seed", "fp64 statistics", "")])
    path = save(args.name, {"protocol": protocol_name, "sparsity": args.sparsity, "evaluation": ep.as_dict(),
                            "model": lm.facts(), "rows": rows, "summary": summary_rows},
                summary + "\n\n" + detail)
    _plot(rows, methods, path.with_suffix(".html"), protocol_name, args.sparsity)
    print(f"saved {path}")


def _plot(rows: list[dict], methods: list[str], path: Path, protocol: str, sparsity: float) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for stats, symbol in (("float32", "circle"), ("float64", "diamond-open")):
        pts = [(r["method"], r["ppl"], r["seed"]) for r in rows if r["stats"] == stats]
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers",
                                     marker={"symbol": symbol, "size": 11}, name=f"{stats} statistics",
                                     text=[f"seed {p[2]}" for p in pts]))
    fig.update_layout(title=f"Perplexity at {sparsity:.0%} over calibration seeds ({protocol})",
                      xaxis={"categoryorder": "array", "categoryarray": methods}, yaxis_title="perplexity",
                      yaxis_type="log")
    fig.write_html(path, include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
