"""Choose a method's settings without touching the evaluation text.

The calibration file of protocol wt2-512 (calib-20.txt) is tokenized once and split: the first
70% of its tokens give the calibration windows (seeded random starts, as the protocol), the
last 30% the validation windows (non-overlapping, from the start of that part). Every setting of
a small grid is pruned at the given sparsity and scored on the validation windows; the
evaluation text (eval-80.txt) is never read. Defaults of the methods were chosen this way.

    python bench/heldout.py --method structprune --sparsity 0.25 --grid "energy=output,residual"
    python bench/heldout.py --method structprune --sparsity 0.5 --grid "energy=residual;temperature=1,3"
    python bench/heldout.py --method wanda --sparsity 0.6               # one row, the defaults
    python bench/heldout.py --method unipruning --sparsity 0.6,0.7 --grid "max_shift=0.05,0.1,1"

Structured methods are pruned once per setting and sparsity. The others are calibrated once per
distinct value of their calibration parameters; settings that differ only in cut parameters
(UniPruning's controller and max_shift, OWL's M and lambda) and every sparsity are cut from it.
Peak memory is the process's resident set, which rarely shrinks: later rows carry earlier ones.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PeakRSS, Timer, print_table, save, wt2_sources  # noqa: E402
from core.data import calibration_windows, evaluation_windows, load_text, tokenize  # noqa: E402
from core.dense import DenseWeights  # noqa: E402
from core.evaluate import perplexity  # noqa: E402
from core.methods import get_method  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.patterns import parse_pattern  # noqa: E402
from core.pruning import calibrate, cut, update_cut_params  # noqa: E402
from core.structured.pipeline import prune_structured  # noqa: E402

SPLIT = 0.7


def parse_grid(text: str) -> list[dict]:
    """"a=1,2;b=x" -> [{a: "1", b: "x"}, {a: "2", b: "x"}] (values stay text: the method's
    parameter schema converts them)."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise SystemExit(f"--grid parts look like name=v1,v2; got {part!r}.")
        name, values = part.split("=", 1)
        axes.append([(name.strip(), v.strip()) for v in values.split(",") if v.strip()])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def heldout_split(lm, calib_windows: int, val_windows: int, seqlen: int):
    calib_file, _ = wt2_sources()
    ids = tokenize(lm.tokenizer, load_text(calib_file, "calibration"))
    cut_at = int(ids.numel() * SPLIT)
    cw, cp = calibration_windows(ids[:cut_at], calib_windows, seqlen, seed=0, source=f"{calib_file} first 70%")
    vw, vp = evaluation_windows(ids[cut_at:], seqlen, val_windows, source=f"{calib_file} last 30%")
    return cw, cp, vw, vp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", required=True)
    ap.add_argument("--sparsity", required=True, help="one or more, comma-separated: 0.6 or 0.6,0.7")
    ap.add_argument("--pattern", default="unstructured", help="for unstructured methods: unstructured or N:M")
    ap.add_argument("--grid", default="", help='settings to try, e.g. "energy=output,residual;temperature=1,3"')
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--val-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--name", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    method = get_method(args.method)
    lm = load_model(args.model)
    dense = DenseWeights(lm)
    cw, cp, vw, vp = heldout_split(lm, args.calib_windows, args.val_windows, args.seqlen)
    sparsities = [float(x) for x in args.sparsity.split(",") if x.strip()]
    rows = [{"setting": "dense", "sparsity": 0.0, "ppl": perplexity(lm, vw, vp.as_dict()).value}]
    print(f"dense {rows[0]['ppl']:.3f}", flush=True)
    settings = [(setting, method.resolve_params(setting))  # unknown names / bad values fail here
                for setting in parse_grid(args.grid)]
    calibration_keys = [p.name for p in method.params if p.recalibrate]
    artifact, artifact_key = None, None
    for setting, params in settings:
        label = ", ".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
        key = tuple(params.get(k) for k in calibration_keys)
        calibrates = not method.structured and key != artifact_key
        with PeakRSS() as mem, Timer() as t:
            if calibrates:
                artifact = None  # free the previous one before calibrating
                artifact = calibrate(lm, method, cw, cp.as_dict(), params, dense=dense)
                artifact_key = key
        calib_s = t.seconds if calibrates else 0.0  # 0: cut from the previous setting's calibration
        for sparsity in sparsities:
            with PeakRSS() as cut_mem, Timer() as c:
                if method.structured:
                    masks, _plan = prune_structured(lm, method, cw, sparsity, params, cp.as_dict(), dense)
                else:
                    update_cut_params(artifact, params)
                    masks = cut(artifact, sparsity, parse_pattern(args.pattern))
                    dense.apply(masks)
            ppl = perplexity(lm, vw, vp.as_dict()).value
            dense.restore()
            rows.append({"setting": label, "sparsity": sparsity, "ppl": ppl, "achieved": masks.total_sparsity(),
                         "calib_s": calib_s, "prune_s": c.seconds, "peak_gib": max(mem.gib, cut_mem.gib)})
            print(f"{label} @ {sparsity:g}: ppl {ppl:.3f} (calibration {calib_s:.0f} s, "
                  f"prune {c.seconds:.1f} s)", flush=True)
    header = (f"{args.method} at {args.sparsity} on {lm.model_id}; calibration: {cp.describe()}; "
              f"validation: {vp.describe()} (the evaluation text is not read)")
    print("\n" + header)
    table = print_table(rows, [("setting", "setting", ""), ("sparsity", "sparsity", ".3g"), ("ppl", "validation ppl", ".3f"),
                               ("achieved", "achieved", ".4f"), ("calib_s", "calib s", ".0f"), ("prune_s", "cut/prune s", ".1f"),
                               ("peak_gib", "process peak GiB", ".2f")])
    name = args.name or f"heldout_{args.method}_{'_'.join(f'{x:g}' for x in sparsities)}"
    path = save(name, {"method": args.method, "sparsities": sparsities, "grid": args.grid,
                       "calibration": cp.as_dict(), "validation": vp.as_dict(), "rows": rows}, header + "\n\n" + table)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
