"""UniPruning on smollm2-135m under protocol wt2-512 (../shared/data/README.md), one run.

Rows: UniPruning frozen with its default Wanda saliency and with the released stochRIA (global
controller, global-row controller, the released code's per-row cut) and its AdamW variant, each
calibrated ONCE and cut at 50/60/70/80% unstructured, 2:4 and 4:8; RIA (one-shot, per row) the
same way. Magnitude, Wanda, SparseGPT and OWL rows are read from
bench/results/baselines.json (same protocol, same evaluator: run bench/baselines.py first) and
marked as such. Per row: perplexity, calibration seconds, cut seconds, calibration peak memory
(the process's resident set) and the artifact's own size (what the slider's cuts keep in memory).
Then a sweep: 10 sparsities cut from the default frozen artifact, time per cut.

    python bench/unipruning.py                   # the full protocol (about an hour on 2 CPU cores)
    python bench/unipruning.py --calib-windows 16 --eval-windows 16 --skip-adamw   # quicker, labelled
    python bench/unipruning.py --only unipruning-adamw     # one config, merged with the saved rows
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
from core.pruning import calibrate, cut, update_cut_params  # noqa: E402

ALL = [("unstructured", s) for s in (0.5, 0.6, 0.7, 0.8)] + [("2:4", None), ("4:8", None)]
HEADLINE = [("unstructured", 0.6), ("unstructured", 0.7)]  # the paper's claim: high sparsity
# (label, method, calibration params, cut-time variants: name -> (cut params, targets)).
# Every evaluation costs about a minute here, so the secondary variants get the headline points.
CONFIGS = [  # in order of importance: a run cut short keeps the rows that matter most
    ("unipruning saliency=wanda", "unipruning", {"saliency": "wanda"},  # the default since it won held-out
     {"global-row": ({"controller": "global-row"}, ALL),
      "global": ({"controller": "global"}, HEADLINE),
      "row (released cut)": ({"controller": "row"}, HEADLINE)}),
    ("unipruning saliency=stochria", "unipruning", {"saliency": "stochria"},
     {"global-row": ({"controller": "global-row"}, ALL),
      "global": ({"controller": "global"}, HEADLINE),
      "row (released cut)": ({"controller": "row"}, HEADLINE)}),
    ("ria", "ria", {}, {"row": ({}, HEADLINE)}),
    ("unipruning-adamw", "unipruning-adamw", {}, {"global-row": ({"controller": "global-row"}, ALL)}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(ap)
    ap.add_argument("--skip-adamw", action="store_true", help="leave out the backprop variant (slowest)")
    ap.add_argument("--only", default="", metavar="LABELS",
                    help=f"comma-separated configs to run ({'; '.join(c[0] for c in CONFIGS)}); the other "
                         "configs' rows are kept from <name>.partial.json (a run resumed or extended)")
    ap.add_argument("--name", default="unipruning")
    ap.add_argument("--report-only", action="store_true",
                    help="no runs: write the table, JSON and plot from <name>.partial.json (a run cut short)")
    args = ap.parse_args()
    torch.manual_seed(0)
    calib_src, eval_src = wt2_sources()
    protocol_name = protocol_label(args)
    lm = load_model(args.model)
    dense = DenseWeights(lm)
    cw, cp = calibration_set(lm.tokenizer, calib_src, args.calib_windows, args.seqlen, seed=0)
    ew, ep = evaluation_set(lm.tokenizer, eval_src, args.seqlen, args.eval_windows)
    rows = []
    sweep = {}
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = set(only) - {c[0] for c in CONFIGS}
    if unknown:
        raise SystemExit(f"Unknown --only config(s): {', '.join(sorted(unknown))}; known: "
                         f"{'; '.join(c[0] for c in CONFIGS)}.")
    partial_path = RESULTS / f"{args.name}.partial.json"
    if args.report_only or (only and partial_path.exists()):
        partial = json.loads(partial_path.read_text())
        rows = [r for r in partial["rows"] if r["method"] not in only]
        sweep = partial.get("sweep", {})
    for label, method, params, variants in ([] if args.report_only else CONFIGS):
        if (args.skip_adamw and method == "unipruning-adamw") or (only and label not in only):
            continue
        dense.restore()
        with PeakRSS() as mem, Timer() as t:
            artifact = calibrate(lm, method, cw, cp.as_dict(), params, dense=dense,
                                 progress=lambda d, n, what: print(f"  {label}: {what}", end="\r", flush=True))
        artifact_gib = artifact.nbytes() / 2**30  # before any cut adds lazily made ranks
        print(f"\n{label}: calibrated in {t.seconds:.0f} s, peak {mem.gib:.2f} GiB, artifact {artifact_gib:.2f} GiB",
              flush=True)
        for variant, (cut_params, targets) in variants.items():
            update_cut_params(artifact, cut_params)
            for pattern_text, sparsity in targets:
                pattern = parse_pattern(pattern_text)
                with Timer() as c:
                    masks = cut(artifact, sparsity or 0.0, pattern)
                dense.apply(masks)
                ppl = perplexity(lm, ew, ep.as_dict()).value
                dense.restore()
                row = {"method": label, "variant": variant, "pattern": str(pattern),
                       "sparsity": pattern.sparsity or sparsity, "achieved": masks.total_sparsity(), "ppl": ppl,
                       "calib_s": t.seconds, "cut_s": c.seconds, "peak_gib": mem.gib, "artifact_gib": artifact_gib}
                rows.append(row)
                print(row, flush=True)
                save(args.name + ".partial", {"rows": rows, "sweep": sweep}, "")
        if label == CONFIGS[0][0]:  # the sweep of cut times, from the default UniPruning artifact
            update_cut_params(artifact, {"controller": "global-row"})
            for sparsity in [0.1 * i for i in range(1, 10)] + [0.55]:
                with Timer() as c:
                    cut(artifact, sparsity)
                sweep[f"{sparsity:.2f}"] = c.seconds
            print("sweep (s per cut):", sweep, flush=True)
            save(args.name + ".partial", {"rows": rows, "sweep": sweep}, "")
        del artifact

    baselines = _baseline_rows(protocol_name)  # read at the end: bench/baselines.py may run alongside
    if not any(r["method"] == "dense" for r in baselines):
        baselines.insert(0, {"method": "dense", "variant": "-", "pattern": "-", "sparsity": 0.0,
                             "ppl": perplexity(lm, ew, ep.as_dict()).value})
    rows = baselines + rows
    columns = [("method", "method", ""), ("variant", "variant", ""), ("pattern", "pattern", ""),
               ("sparsity", "target", ".2f"), ("ppl", "ppl", ".2f"), ("calib_s", "calib s", ".0f"),
               ("cut_s", "cut s", ".2f"), ("peak_gib", "peak GiB", ".2f"),
               ("artifact_gib", "artifact GiB", ".2f")]
    print(f"\nProtocol: {protocol_name}; model {lm.model_id}; fp32; torch threads {torch.get_num_threads()}")
    table = print_table(rows, columns)
    sweep_table = print_table([{"sparsity": k, "cut_s": v} for k, v in sweep.items()],
                              [("sparsity", "sparsity", ""), ("cut_s", "cut s (global-row controller)", ".3f")])
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    path = save(args.name, {"protocol": protocol_name, "calibration": cp.as_dict(), "evaluation": ep.as_dict(),
                            "model": lm.facts(), "model_gib": model_bytes / 2**30, "rows": rows,
                            "sweep_cut_seconds": sweep}, table + "\n\n" + sweep_table)
    _plot(rows, path.with_suffix(".html"), protocol_name)
    print(f"saved {path}")


def _baseline_rows(protocol_name: str) -> list[dict]:
    """Rows of bench/baselines.py's last full run, when it used the same protocol."""
    path = RESULTS / "baselines.json"
    source = "baselines.json"
    if not path.exists() and protocol_name == "wt2-512" and (RESULTS / "baselines.partial.json").exists():
        path, source = RESULTS / "baselines.partial.json", "baselines.partial.json, a run still going"
    if not path.exists():
        print("no bench/results/baselines.json: baseline rows left out (run bench/baselines.py)")
        return []
    data = json.loads(path.read_text())
    if data.get("protocol", protocol_name) != protocol_name:
        print(f"baselines.json is for {data.get('protocol')!r}, not {protocol_name!r}: left out")
        return []
    return [{**r, "variant": f"sequential ({source})" if r["method"] != "dense" else "-"} for r in data["rows"]]


def _plot(rows: list[dict], path: Path, protocol: str) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    keys = dict.fromkeys((r["method"], r["variant"]) for r in rows if r["method"] != "dense")
    for method, variant in keys:
        pts = sorted((r["sparsity"], r["ppl"]) for r in rows
                     if (r["method"], r["variant"]) == (method, variant) and r["pattern"] == "unstructured")
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                     name=f"{method} ({variant})"))
    dense = [r["ppl"] for r in rows if r["method"] == "dense"]
    if dense:
        fig.add_hline(y=dense[0], line_dash="dot", annotation_text="dense")
    fig.update_layout(title=f"UniPruning vs baselines, perplexity against sparsity ({protocol})",
                      xaxis_title="sparsity", yaxis_title="perplexity", yaxis_type="log")
    fig.write_html(path, include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
