"""What the weights' fingerprint costs at load: version 2 (every byte of every tensor, xxh3-128)
against version 1 (1024 samples per tensor, which missed changes between them), for a model in
memory and one offloaded to disk (cold: digests read from the checkpoint once; warm: the digest
cache of an unchanged file, no read), and what watching the model's source files costs per check.

    python -m bench.fingerprint_cost --shape llama-3.2-1b --folder /work/scale-models/llama-3.2-1b

Random-initialised weights of the real shape (bench/random_models.py), bf16 as on disk. Prints a
table and writes bench/results/fingerprint_cost.{json,md,html}."""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from bench.common import RESULTS, print_table, save
from bench.random_models import build


def _timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--folder", required=True, help="where the random model is (built there if missing)")
    args = ap.parse_args()
    build(args.shape, args.folder)
    os.environ["PRUNE_EXPLORER_CACHE"] = tempfile.mkdtemp(prefix="fingerprint-bench-")  # a cold digest cache

    from core.dense import DenseWeights
    from core.fingerprint import fingerprint, sampled_fingerprint
    from core.loading import load_model

    rows = []
    lm = load_model(args.folder, dtype="auto")
    n = sum(p.numel() for p in lm.model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    v2, fp2 = _timed(lambda: fingerprint(lm.model))
    v1, _ = _timed(lambda: sampled_fingerprint(lm.model))
    dense = DenseWeights(lm)
    check, _ = _timed(lambda: [dense.check_sources() for _ in range(1000)], 1)  # s per 1000 = ms each
    rows.append(dict(setting="in memory", version2_s=v2, version1_s=v1, check_ms=check, gb_per_s=nbytes / v2 / 1e9))
    del dense, lm

    off = load_model(args.folder, dtype="auto", offload="disk")
    # the load itself filled the digest cache: emptied, the next fingerprint reads the checkpoint
    os.remove(os.path.join(os.environ["PRUNE_EXPLORER_CACHE"], "fingerprints.json"))
    cold, fp_cold = _timed(lambda: fingerprint(off.model), 1)
    warm, fp_warm = _timed(lambda: fingerprint(off.model))
    v1_off, _ = _timed(lambda: sampled_fingerprint(off.model), 1)
    assert fp_cold == fp_warm == fp2, "offloaded and in-memory fingerprints differ"
    rows.append(dict(setting="--offload disk, cold cache", version2_s=cold, version1_s=v1_off))
    rows.append(dict(setting="--offload disk, warm cache", version2_s=warm))

    table = print_table(rows, [("setting", "model", ""), ("version2_s", "full (v2) s", ".3f"),
                               ("version1_s", "sampled (v1) s", ".3f"), ("gb_per_s", "GB/s", ".1f"),
                               ("check_ms", "source check, ms each", ".3f")])
    header = (f"{args.shape} (random weights, bf16): {n / 1e9:.2f} B parameters, {nbytes / 1e9:.2f} GB; "
              "best of 3 (1 for cold), 2-core machine")
    print(header)
    save("fingerprint_cost", {"shape": args.shape, "parameters": n, "bytes": nbytes, "rows": rows}, header + "\n\n" + table)
    import plotly.graph_objects as go

    fig = go.Figure([go.Bar(name=key, x=[r["setting"] for r in rows], y=[r.get(key) for r in rows])
                     for key in ("version2_s", "version1_s")])
    fig.update_layout(title=f"Fingerprint cost, {args.shape}", yaxis_title="seconds", barmode="group")
    fig.write_html(RESULTS / "fingerprint_cost.html", include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
