"""Baselines on smollm2-135m under protocol wt2-512 (../shared/data/README.md).

Rows: dense; magnitude, Wanda, SparseGPT at 50/60/70% and 2:4; Wanda 4:8; OWL-Wanda 60/70%.
Every method runs block by block as its paper does (later blocks calibrated on pruned earlier
ones). Per row: perplexity, calibration (prune) seconds, seconds to cut the same sparsity again
from the run's artifact, peak resident memory of the process during the row.

Also measured: one plain forward pass over the calibration tokens (the floor), a one-shot
Wanda calibration over the same tokens, and the time to cut+apply a new sparsity from it.

    python bench/baselines.py                       # the full protocol (slow on 2 CPU cores)
    python bench/baselines.py --calib-windows 16 --eval-windows 16   # a quicker, labelled variant
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
from core.dense import DenseWeights  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.evaluate import perplexity  # noqa: E402
from core.patterns import parse_pattern  # noqa: E402
from core.pruning import calibrate, cut, prune_sequential  # noqa: E402

ROWS = [(m, p, s) for m in ("magnitude", "wanda", "sparsegpt") for p, s in
        (("unstructured", 0.5), ("unstructured", 0.6), ("unstructured", 0.7), ("2:4", None))]
ROWS += [("wanda", "4:8", None), ("owl", "unstructured", 0.6), ("owl", "unstructured", 0.7)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--only", default="", help="comma-separated methods (or method@pattern, e.g. wanda@4:8) to "
                    "run, in the order given (default: all rows)")
    ap.add_argument("--name", default="baselines")
    ap.add_argument("--report-only", action="store_true",
                    help="no runs: write the table, JSON and plot from <name>.partial.json (a run cut short)")
    ap.add_argument("--merge", default="", help="with --report-only: also take the rows of these other runs' "
                    "partial results (comma-separated names, e.g. runs made with --only)")
    ap.add_argument("--rows-only", action="store_true",
                    help="skip the dense row and the speed measurements (for --only runs merged later)")
    ap.add_argument("--timing-only", action="store_true",
                    help="only the speed targets (forward floor, one-shot calibration, cut+apply), saved as "
                         "<name>_timing.json: run it on an otherwise idle machine")
    args = ap.parse_args()
    torch.manual_seed(0)
    calib_src, eval_src = wt2_sources()
    protocol_name = protocol_label(args)
    lm = load_model(args.model)
    if args.report_only:
        partial = json.loads((RESULTS / f"{args.name}.partial.json").read_text())
        rows = partial["rows"]
        for other in filter(None, args.merge.split(",")):
            rows += json.loads((RESULTS / f"{other}.partial.json").read_text())["rows"]
        order = {(m, p if p == "unstructured" else str(parse_pattern(p)), s): i for i, (m, p, s) in enumerate(ROWS)}
        rows.sort(key=lambda r: -1 if r["method"] == "dense" else
                  order.get((r["method"], r["pattern"], None if r["pattern"] != "unstructured" else r["sparsity"]), 99))
        _report(args, rows, partial.get("timing", {}), protocol_name, lm, None, None)
        return
    dense = DenseWeights(lm)
    cw, cp = calibration_set(lm.tokenizer, calib_src, args.calib_windows, args.seqlen, seed=0)
    ew, ep = evaluation_set(lm.tokenizer, eval_src, args.seqlen, args.eval_windows)
    rows, timing = [], {}
    if not args.timing_only and not args.rows_only:
        with PeakRSS() as mem, Timer() as t:
            ppl = perplexity(lm, ew, ep.as_dict()).value
        rows.append({"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": ppl, "peak_gib": mem.gib})
        print(f"dense ppl {ppl:.3f} ({t.seconds:.0f} s)", flush=True)

    if not args.rows_only:
        timing = _timing(lm, dense, cw, cp)
        if args.timing_only:
            timing.update(protocol=protocol_name, threads=torch.get_num_threads(), model=lm.model_id)
            table = print_table([timing], [("forward_floor_s", "forward floor s", ".1f"),
                                           ("wanda_one_shot_calibration_s", "Wanda one-shot calib s", ".1f"),
                                           ("ratio_to_floor", "ratio", ".2f"),
                                           ("calibration_peak_gib", "calib peak GiB", ".2f"),
                                           ("calibration_peak_gb", "calib peak GB", ".2f"),
                                           ("cut_and_apply_new_sparsity_s", "cut+apply s (median of 5)", ".3f")])
            save(args.name + "_timing", timing, table)
            return

    selected = ROWS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        selected = [r for w in wanted for r in ROWS if w in (r[0], f"{r[0]}@{r[1]}")]
    for method, pattern_text, sparsity in selected:
        pattern = parse_pattern(pattern_text)
        with PeakRSS() as mem, Timer() as t:
            masks, artifact = prune_sequential(lm, method, cw, sparsity or 0.0, pattern, protocol=cp.as_dict(),
                                               dense=dense)
        with Timer() as c:
            cut(artifact, sparsity or 0.0, pattern)
        ppl = perplexity(lm, ew, ep.as_dict()).value
        dense.restore()
        row = {"method": method, "pattern": str(pattern), "sparsity": pattern.sparsity or sparsity,
               "achieved": masks.total_sparsity(), "ppl": ppl, "calib_s": t.seconds, "cut_s": c.seconds,
               "peak_gib": mem.gib}
        rows.append(row)
        print(row, flush=True)
        save(args.name + ".partial", {"rows": rows, "timing": timing}, "")  # survive an interrupted run
        del artifact, masks

    _report(args, rows, timing, protocol_name, lm, cp, ep)


def _timing(lm, dense, cw, cp) -> dict:
    """The speed targets: one plain forward over the calibration tokens (the floor), a one-shot
    Wanda calibration over the same tokens, and cut + apply of new sparsities from it."""
    with Timer() as floor, torch.no_grad():
        for start in range(0, cw.shape[0], 8):
            lm.model.model(cw[start:start + 8], use_cache=False)
    with PeakRSS() as mem, Timer() as oneshot:
        artifact = calibrate(lm, "wanda", cw, cp.as_dict(), dense=dense)
    recuts = []
    for sparsity in (0.5, 0.6, 0.7, 0.55, 0.65):  # ranks were computed during calibration
        with Timer() as recut:
            dense.apply(cut(artifact, sparsity))
        recuts.append(recut.seconds)
    dense.restore()
    timing = {"forward_floor_s": floor.seconds, "wanda_one_shot_calibration_s": oneshot.seconds,
              "ratio_to_floor": oneshot.seconds / floor.seconds, "calibration_peak_gib": mem.gib,
              "calibration_peak_gb": mem.peak / 1e9,  # the target is stated in decimal GB
              "cut_and_apply_new_sparsity_s": sorted(recuts)[len(recuts) // 2],
              "cut_and_apply_all_s": recuts}
    print(timing, flush=True)
    return timing


def _report(args, rows, timing, protocol_name, lm, cp, ep) -> None:
    print(f"\nProtocol: {protocol_name}; model {lm.model_id}; fp32 on {lm.device}; "
          f"torch threads {torch.get_num_threads()}")
    table = print_table(rows, [("method", "method", ""), ("pattern", "pattern", ""), ("sparsity", "target", ".2f"),
                               ("achieved", "achieved", ".4f"), ("ppl", "ppl", ".3f"), ("calib_s", "calib s", ".1f"),
                               ("cut_s", "re-cut s", ".2f"), ("peak_gib", "peak GiB", ".2f")])
    path = save(args.name, {"protocol": protocol_name, "calibration": cp.as_dict() if cp else None,
                            "evaluation": ep.as_dict() if ep else None,
                            "model": lm.facts(), "timing": timing, "rows": rows}, table)
    _plot(rows, path.with_suffix(".html"), protocol_name)
    print(f"saved {path}")


def _plot(rows: list[dict], path: Path, protocol: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for method in sorted({r["method"] for r in rows if r["method"] != "dense"}):
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows if r["method"] == method and r["pattern"] == "unstructured")
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers", name=method))
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    if dense:
        fig.add_hline(y=dense[0], line_dash="dot", annotation_text="dense")
    fig.update_layout(title=f"Perplexity vs unstructured sparsity ({protocol})", xaxis_title="sparsity",
                      yaxis_title="perplexity", yaxis_type="log")
    fig.write_html(path, include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
