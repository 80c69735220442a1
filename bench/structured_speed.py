"""Speed of physically sliced models (core.structured.slicing) against the dense model.

For each structured sparsity (fraction of the decoder's attention + MLP parameters removed) a
plan is built (by default: `l2_plan`, the lowest-L2-norm attention units and MLP channels of
every block; with --allocations, each method's per-block unit counts from a bench/structured.py
result: speed depends on the shapes only, not on which units were kept), the model is sliced,
and dense and sliced models are timed on the same prompt:

- prefill tokens/s: one forward over a fixed 512-token prompt with the KV cache on and only
  the last position's logits (what generate's first step does);
- decode tokens/s: greedy `generate` of 128 new tokens from that prompt with the cache; the
  time from the first generated token to the last (127 decode steps), taken by a pass-through
  logits processor, so the prefill is not counted twice.

Each model is timed in each runtime of `--runtimes` (core.fast_decode):
- `eager`: transformers' stock generate (dynamic KV cache, eager forwards);
- `compiled`: generate after `compile_for_decode` (static KV cache, decode steps through
  torch.compile);
- `compiled-loop`: `compiled_greedy`, the same compiled step in a minimal greedy loop, without
  generate's per-step bookkeeping.
The warm-up round compiles. Dense and sliced always share a runtime, so a speedup compares
the models, not the runtimes.

Every model is timed once per round, `--runs` (>= 5) rounds after one warm-up round, in a
rotating order; a model's speedup is the median over rounds of its tokens/s divided by the
dense model's in the same round (paired, so drifts of the machine's speed cancel), with the
smallest and largest ratio shown. Torch threads fixed (2 by default).
Also: parameter count, safetensors size (save_pretrained / save_sliced of each model), and
the largest logit difference between the sliced model and the masked model it stands for.

    python bench/structured_speed.py            # smollm2-135m, 25% and 50%
    python bench/structured_speed.py --sparsities 0.5 --runs 7
    python bench/structured_speed.py --allocations structured --sparsities 0.5   # each method's shapes
    python bench/structured_speed.py --profile 32     # and where a (eager) decode step's time goes
    python bench/structured_speed.py --runtimes eager  # stock generate only (no compile time)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, SHARED, print_table, save  # noqa: E402
from core.fast_decode import compile_for_decode, compiled_greedy, eager_decode, timed_greedy  # noqa: E402
from core.kv_cache import output_cache, with_cache  # noqa: E402
from core.dense import DenseWeights  # noqa: E402
from core.loaded_model import LoadedModel  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.structured.plan import StructuredPlan  # noqa: E402
from core.structured.slicing import save_sliced, slice_model  # noqa: E402
from core.structured.units import all_block_units, unit_out_columns, unit_rows  # noqa: E402

# ---------------------------------------------------------------- the default plan

def l2_plan(lm: LoadedModel, sparsity: float) -> StructuredPlan:
    """Remove the lowest-L2-norm units uniformly per block (no calibration, no refit).

    An attention unit's norm covers its q/k/v rows and o columns; a channel's, its rows of
    every MLP input projection and its column of the output projection."""
    return l2_plan_with_counts(lm, [u.removal_counts(sparsity) for u in all_block_units(lm)])


@torch.no_grad()
def l2_plan_with_counts(lm: LoadedModel, counts: list[tuple[int, int]]) -> StructuredPlan:
    """Per block, remove counts[block] = (attention units, MLP channels) of the lowest L2 norm."""
    family, modules = lm.family, lm.prunable()
    keep_attn, keep_channels = [], []
    for u in all_block_units(lm):
        prefix = family.block_prefix(u.index)

        def weight(rel):
            return family.weight_view(modules[f"{prefix}.{rel}"]).float()

        attn_scores = torch.zeros(u.attn_units)
        for j in range(u.attn_units):
            one = torch.zeros(u.attn_units, dtype=torch.bool)
            one[j] = True
            attn_scores[j] = sum(weight(rel)[rows].pow(2).sum() for rel, rows in unit_rows(lm, u, one).items())
            attn_scores[j] += weight(family.attention.out)[:, unit_out_columns(u, one)].pow(2).sum()
        channel_scores = weight(family.mlp.out).pow(2).sum(0)
        for rel in family.mlp.inputs:
            channel_scores += weight(rel).pow(2).sum(1)
        n_attn, n_channels = counts[u.index]
        ka = torch.ones(u.attn_units, dtype=torch.bool)
        ka[attn_scores.argsort()[:n_attn]] = False
        kc = torch.ones(u.channels, dtype=torch.bool)
        kc[channel_scores.argsort()[:n_channels]] = False
        keep_attn.append(ka)
        keep_channels.append(kc)
    return StructuredPlan(keep_attn, keep_channels, meta={"method": "l2-norm"})


def allocation_counts(allocation: list[dict]) -> list[tuple[int, int]]:
    """(attention units, channels) removed per block, from a bench row's saved allocation:
    the shapes (all that speed depends on) of the model that method pruned."""
    return [(r["attn_units"] - r["attn_units_kept"], r["channels"] - r["channels_kept"]) for r in allocation]


# ---------------------------------------------------------------- timing

def _prompt(lm: LoadedModel, tokens: int) -> tuple[torch.Tensor, str]:
    source = SHARED / "eval-80.txt"
    if source.exists():
        text, label = source.read_text()[: tokens * 40], f"first {tokens} tokens of {source.name}"
    else:
        text, label = "The quick brown fox jumps over the lazy dog. " * tokens, "a repeated sentence"
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"The prompt text has only {ids.shape[1]} tokens; {tokens} are needed.")
    return ids, label


@torch.no_grad()
def time_once(model, ids: torch.Tensor, new_tokens: int, runtime: str = "eager") -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one run, decoding as `runtime` does."""
    start = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    elapsed = time.perf_counter() - start
    return ids.shape[1] / elapsed, RUNTIMES[runtime][1](model, ids, new_tokens)[1]


def time_interleaved(models: list, ids: torch.Tensor, new_tokens: int, runs: int, runtime: str = "eager",
                     progress: Callable[[str], None] = print) -> list[dict]:
    """Time every model once per round, `runs` rounds after one warm-up round, the order rotated
    each round. Interleaving makes each model's run r share the machine's state (other load,
    clock, caches) with the dense model's run r, so the per-round ratio cancels slow drifts that
    separate blocks of runs would attribute to the model. Per model: medians and all runs."""
    prefill = [[] for _ in models]
    decode = [[] for _ in models]
    for round_ in range(runs + 1):
        order = list(range(len(models)))
        order = order[round_ % len(order):] + order[:round_ % len(order)]
        for i in order:
            p, d = time_once(models[i], ids, new_tokens, runtime)
            if round_:  # round 0 is the warm-up
                prefill[i].append(p)
                decode[i].append(d)
        progress(f"round {round_}/{runs} done")
    return [{"prefill_tok_s": statistics.median(p), "decode_tok_s": statistics.median(d),
             "prefill_all": p, "decode_all": d} for p, d in zip(prefill, decode)]


# runtime -> (what it sets in the model's generation settings, how it decodes: ids, tokens/s)
RUNTIMES = {"eager": (eager_decode, timed_greedy),
            "compiled": (compile_for_decode, timed_greedy),
            "compiled-loop": (eager_decode, compiled_greedy)}


def _set_runtime(models: list, runtime: str) -> None:
    for model in models:
        RUNTIMES[runtime][0](model)


# operator groups of a decode step's profile (self CPU time; everything else is "other")
OP_GROUPS = {"matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_attention_math", "aten::scaled_dot_product_attention"),
             "KV-cache concatenation": ("aten::cat",)}


@torch.no_grad()
def profile_decode(model, ids: torch.Tensor, steps: int) -> dict:
    """Where a decode step's time goes: after a prefill of `ids`, `steps` single-token forwards
    with the KV cache (greedy), timed without the profiler (the model's own cost per token, no
    generate() around it) and then, continuing from there, with torch.profiler: milliseconds per
    step in each OP_GROUPS group, self CPU time (the profiler itself adds to "other")."""
    from torch.profiler import ProfilerActivity, profile

    out = model(ids, use_cache=True)
    cache, token = output_cache(out), out.logits[:, -1:].argmax(-1)

    def steps_from(token, cache):
        for _ in range(steps):
            out = model(token, **with_cache(model, cache), use_cache=True)
            token, cache = out.logits[:, -1:].argmax(-1), output_cache(out)
        return token, cache

    start = time.perf_counter()
    token, cache = steps_from(token, cache)
    forward_ms = (time.perf_counter() - start) * 1000 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        steps_from(token, cache)
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    total = sum(self_us.values())
    groups = {g: sum(v for k, v in self_us.items() if k in ops) for g, ops in OP_GROUPS.items()}
    groups["other"] = total - sum(groups.values())
    return {"forward_ms_step": forward_ms, **{f"{g} ms": v / 1000 / steps for g, v in groups.items()}}


def _safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


Variant = tuple[str, float, Callable[[], StructuredPlan]]  # (label, target sparsity, plan maker)


def l2_variants(lm: LoadedModel, sparsities) -> list[Variant]:
    return [("sliced", s, lambda s=s: l2_plan(lm, s)) for s in sparsities]


def allocation_variants(lm: LoadedModel, results: dict, sparsities, methods=()) -> list[Variant]:
    """One variant per row of a structured bench result at the given sparsities (and of the
    given methods, default all): the shapes that method's allocation gives (which units exactly
    does not change the speed)."""
    out = []
    for row in results["rows"]:
        if methods and row["method"] not in methods:
            continue
        if row["method"] != "dense" and any(abs(row["sparsity"] - s) < 1e-9 for s in sparsities):
            counts = allocation_counts(row["allocation"])
            out.append((row["method"], row["sparsity"], lambda c=counts: l2_plan_with_counts(lm, c)))
    if not out:
        raise SystemExit(f"No rows at sparsities {list(sparsities)} in those results.")
    return out


def run(lm: LoadedModel, variants: list[Variant], prompt_tokens: int = 512, new_tokens: int = 128,
        runs: int = 5, profile_steps: int = 0, runtimes=RUNTIMES) -> tuple[list[dict], str]:
    """Rows (per runtime: dense first, then one per variant) of speed, size and agreement."""
    ids, prompt_label = _prompt(lm, prompt_tokens)
    units = all_block_units(lm)
    facts, models = [], [lm.model]
    with tempfile.TemporaryDirectory(prefix="structured-speed-") as tmp:
        lm.model.save_pretrained(Path(tmp) / "dense")
        facts.append({"model": "dense", "sparsity": 0.0, "params": sum(p.numel() for p in lm.model.parameters()),
                      "safetensors_mb": _safetensors_bytes(Path(tmp) / "dense") / 1e6})
        weights = DenseWeights(lm)
        for i, (label, sparsity, make_plan) in enumerate(variants):
            plan = make_plan()
            sliced = slice_model(lm, plan)
            weights.apply(plan.to_maskset(lm, units))  # the masked model the sliced one stands for
            with torch.no_grad():
                diff = (sliced(ids, use_cache=False).logits - lm.model(ids, use_cache=False).logits).abs().max()
            weights.restore()
            folder = save_sliced(sliced, Path(tmp) / f"sliced-{i}")
            models.append(sliced)
            facts.append({"model": label, "sparsity": sparsity,
                          "achieved": plan.structured_sparsity(units),
                          "heads_kept": sum(a["heads_kept"] for a in plan.allocation(units)),
                          "channels_kept": sum(int(c.sum()) for c in plan.keep_channels),
                          "params": sum(p.numel() for p in sliced.parameters()),
                          "safetensors_mb": _safetensors_bytes(folder) / 1e6,
                          "max_logit_diff_vs_masked": float(diff)})
    rows = []
    for runtime in runtimes:
        print(f"timing {len(models)} models, interleaved, {runtime} runtime", flush=True)
        _set_runtime(models, runtime)
        start = time.perf_counter()
        timed = time_interleaved(models, ids, new_tokens, runs, runtime)
        block = [{**fact, "runtime": runtime, **t} for fact, t in zip(facts, timed)]
        block[0]["runtime_seconds"] = time.perf_counter() - start  # the compiled warm-up round compiles
        if profile_steps and runtime == "eager":
            print(f"profiling {profile_steps} decode steps per model", flush=True)
            for row, model in zip(block, models):
                row.update(profile_decode(model, ids, profile_steps))
                row["decode_ms_step"] = 1000 / row["decode_tok_s"]
        dense = block[0]
        for row in block:
            for key in ("prefill", "decode"):
                ratios = [a / b for a, b in zip(row[f"{key}_all"], dense[f"{key}_all"])]  # paired by round
                row[f"{key}_speedup"] = statistics.median(ratios)
                row[f"{key}_speedup_min"], row[f"{key}_speedup_max"] = min(ratios), max(ratios)
        rows += block
    _set_runtime(models, "eager")
    return rows, prompt_label


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = [("dense" if r["model"] == "dense" else f"{r['model']} {r['sparsity']:.1%}") + f" ({r['runtime']})"
             for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("prefill tokens/s (512-token prompt)",
                                                        "greedy decode tokens/s (128 new tokens)"))
    for col, key in ((1, "prefill"), (2, "decode")):
        fig.add_trace(go.Bar(x=names, y=[r[f"{key}_tok_s"] for r in rows], showlegend=False,
                             text=[f"{r[f'{key}_speedup']:.2f}x" for r in rows], textposition="outside"),
                      row=1, col=col)
    fig.update_layout(title=title)
    fig.write_html(path, include_plotlyjs="cdn")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsities", default="0.25,0.5")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model (median), after one warm-up")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--name", default="structured_speed")
    ap.add_argument("--note", default="", help="a remark saved with the results (e.g. 'machine busy')")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS eager decode steps per model: time per step in matrix products, attention, "
                         "KV-cache concatenation and the rest")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES),
                    help="comma-separated: eager (stock generate), compiled (generate with a static cache and "
                         "torch.compile), compiled-loop (the compiled step in a minimal greedy loop)")
    ap.add_argument("--methods", default="", help="with --allocations: only these rows (comma-separated)")
    ap.add_argument("--allocations", default="", metavar="RESULTS",
                    help="time the shapes of each method's allocation in bench/results/RESULTS.json (a "
                         "bench/structured.py run) at --sparsities, instead of the uniform L2 plan")
    args = ap.parse_args()
    if args.runs < 5:
        raise SystemExit("--runs must be at least 5 (the numbers are medians).")
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    if not runtimes or any(r not in RUNTIMES for r in runtimes):
        raise SystemExit(f"--runtimes takes a comma-separated subset of {', '.join(RUNTIMES)}.")
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    sparsities = [float(s) for s in args.sparsities.split(",") if s.strip()]
    if args.allocations:
        source = RESULTS / f"{args.allocations}.json"
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        variants = allocation_variants(lm, json.loads(source.read_text()), sparsities, methods)
        plan_text = f"each method's per-block unit counts from {source.name}, lowest-L2-norm units"
    else:
        variants = l2_variants(lm, sparsities)
        plan_text = "lowest-L2-norm units, uniform per block"
    rows, prompt_label = run(lm, variants, args.prompt_tokens, args.new_tokens, args.runs, args.profile,
                             runtimes)
    header = (f"Model {lm.model_id}; fp32 on {lm.device}; torch threads {torch.get_num_threads()}; prompt: "
              f"{prompt_label}; plan: {plan_text}; median of {args.runs} interleaved rounds (speedups paired per round)"
              + (f"; {args.note}" if args.note else ""))
    print("\n" + header)
    table = print_table(rows, [("model", "model", ""), ("runtime", "runtime", ""), ("sparsity", "target", ".2f"), ("achieved", "achieved", ".4f"),
                               ("params", "params", ",d"), ("safetensors_mb", "safetensors MB", ".1f"),
                               ("prefill_tok_s", "prefill tok/s", ".1f"), ("prefill_speedup", "prefill x", ".2f"),
                               ("decode_tok_s", "decode tok/s", ".2f"), ("decode_speedup", "decode x", ".2f"),
                               ("decode_speedup_min", "decode x min", ".2f"), ("decode_speedup_max", "decode x max", ".2f"),
                               ("max_logit_diff_vs_masked", "max abs logit diff vs masked", ".1e")])
    if args.profile:
        print(f"\nOne decode step, milliseconds (generate: from the timed runs; forward: {args.profile} bare "
              "forwards with the cache; groups: self CPU time under torch.profiler)")
        profiled = [r for r in rows if "forward_ms_step" in r]  # eager runtime only
        table += "\n\n" + print_table(profiled, [("model", "model", ""), ("sparsity", "target", ".2f"),
                                                 ("decode_ms_step", "generate ms", ".1f"),
                                                 ("forward_ms_step", "forward ms", ".1f"),
                                                 *[(f"{g} ms", g, ".1f") for g in [*OP_GROUPS, "other"]]])
    for row in (r for r in rows if r["model"] != "dense" and abs(r["sparsity"] - 0.5) < 1e-9):
        verdict = "met" if row["decode_speedup"] >= 1.5 else "NOT met"
        print(f"target (sliced 50% decodes >= 1.5x dense), {row['model']}, {row['runtime']}: {verdict} "
              f"({row['decode_speedup']:.2f}x)")
    payload = {"model": lm.facts(), "threads": torch.get_num_threads(), "prompt": prompt_label,
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
               "runtimes": runtimes,
               "plan": plan_text,
               "note": args.note, "rows": rows}
    path = save(args.name, payload, header + "\n\n" + table)
    _plot(rows, path.with_suffix(".html"), f"Sliced vs dense speed, {lm.model_id}, {torch.get_num_threads()} threads")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
