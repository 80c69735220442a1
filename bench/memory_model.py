"""The memory model's table: predicted peak host memory of pruning Llama shapes from 135M to 70B.

    python bench/memory_model.py                       # 4 x 256 windows (what bench/scale.py measures)
    python bench/memory_model.py --windows 128 --seqlen 2048

Peak host memory = runtime + weights + windows + activations + statistics + kept + temporaries
+ overhead (core.memory.memory_model; the README writes the formula out). Nothing is loaded: the
shapes come from configs on the meta device. `runtime` is the process before the model (python,
torch, transformers, the tokenizer), taken from bench/results/scale.json's load-only measurement
when there is one. Writes bench/results/memory_model[_<windows>x<seqlen>].{json,md}.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, save  # noqa: E402
from core.memory import memory_model  # noqa: E402
from core.fit import count_parameters  # noqa: E402

GIB = 2**30
# Llama-family shapes (bench/random_models.py builds the first three; 70B is the Llama-3.1-70B config)
SHAPES = {
    "135M (SmolLM2)": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1B (Llama-3.2)": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True),
    "8B (Llama-3.1)": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "70B (Llama-3.1)": dict(hidden_size=8192, num_hidden_layers=80, intermediate_size=28672, num_attention_heads=64,
                            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
COLUMNS = [("wanda", "none", "prune"), ("wanda", "disk", "prune"), ("sparsegpt", "none", "prune"),
           ("sparsegpt", "disk", "prune"), ("unipruning", "none", "calibrate")]
DEFAULT_RUNTIME = int(0.3 * GIB)  # used when bench/results/scale.json has no load-only row yet


def runtime_bytes() -> int:
    """The process before the model, from the scale benchmark's measurement if it recorded one."""
    import json

    path = RESULTS / "scale.json"
    if path.exists():
        value = json.loads(path.read_text()).get("runtime_bytes")
        if value:
            return int(value)
    return DEFAULT_RUNTIME


def main() -> None:
    from transformers import LlamaConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    args = ap.parse_args()
    runtime = runtime_bytes()
    rows = []
    for label, shape in SHAPES.items():
        config = LlamaConfig(**shape, max_position_embeddings=max(2048, args.seqlen))
        params = None
        row = {"model": label}
        for method, offload, mode in COLUMNS:
            parts = memory_model(config, torch.bfloat16, method, args.windows, args.seqlen, offload=offload,
                                 mode=mode, runtime=runtime)
            row[f"{method} ({'disk offload' if offload == 'disk' else 'in memory'})"] = sum(parts.values()) / GIB
            row.setdefault("parts", {})[f"{method}/{offload}"] = parts
            if params is None:
                params = count_parameters(config)[0]
        row["params"] = params
        row["bf16 weights GiB"] = params * 2 / GIB
        rows.append(row)
    headers = ["model", "params", "bf16 weights GiB"] + [k for k in rows[0] if k not in ("model", "parts", "params",
                                                                                          "bf16 weights GiB")]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [row["model"], f"{row['params'] / 1e9:.2f}B"] + [f"{row[h]:.1f}" for h in headers[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"Predicted peak host memory (GiB), bf16, {args.windows} x {args.seqlen} windows, runtime "
          f"{runtime / GIB:.2f} GiB:\n{table}")
    suffix = "" if (args.windows, args.seqlen) == (4, 256) else f"_{args.windows}x{args.seqlen}"
    save(f"memory_model{suffix}", {"windows": args.windows, "seqlen": args.seqlen, "runtime_bytes": runtime,
                                   "rows": rows}, table)


if __name__ == "__main__":
    main()
