"""Random-initialised Llama-family models of real shapes, written to disk for the scale benchmark.

The folder is what `AutoModelForCausalLM.from_pretrained` and `python -m core ... --model DIR`
read: config.json (a real LlamaConfig), model.safetensors.index.json with bfloat16 shards (the
embeddings, one per decoder block, then the final norm and head) and SmolLM2's tokenizer (its ids
are below 49152, valid for every shape here). Tensors are generated straight in bfloat16 with a
seeded generator (normal, std 0.02; norms = 1), one shard at a time, so the whole model is never
in memory and never in fp32.

    python -m bench.random_models --shape llama-3.2-1b --out /work/scale-models/llama-3.2-1b
    python -m bench.random_models --shape smollm2-135m --out DIR --check full   # then load it, one forward

A folder is written only if it is missing, empty or an earlier output of this builder (it holds
the marker file RANDOM_MODEL.json); a complete build of the same shape and seed is left as is
unless --rebuild.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch

MARKER = "RANDOM_MODEL.json"
INDEX = "model.safetensors.index.json"
TOKENIZER_SOURCE = Path.home() / ".cache" / "pruning-explorer" / "models" / "smollm2-135m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
STD = 0.02

# Real shapes; vocab 49152 where the model's own tokenizer is not needed (the SmolLM2 one is used).
SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}


def make_config(shape: str):
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, architectures=["LlamaForCausalLM"])
    config.dtype = torch.bfloat16
    return config


def tensor_layout(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint holds, in state_dict order, from a meta-device
    skeleton (no memory); a tied head is the embedding's tensor and is stored once."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # init_empty_weights skips the tying from_config does on a real device
    seen, layout = set(), []
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        layout.append((name, tuple(tensor.shape)))
    return layout


def shard_groups(layout: list[tuple[str, tuple]]) -> list[list[tuple[str, tuple]]]:
    """Tensors before the first block (embeddings), one group per block, tensors after (norm, head)."""
    head, blocks, tail = [], {}, []
    for name, shape in layout:
        match = re.search(r"\.layers\.(\d+)\.", name)
        if match:
            blocks.setdefault(int(match.group(1)), []).append((name, shape))
        else:
            (tail if blocks else head).append((name, shape))
    return [g for g in [head, *(blocks[i] for i in sorted(blocks)), tail] if g]


def random_tensor(name: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norms scale by 1; any bias starts at 0
        return torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else torch.zeros(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, STD, generator=gen)


def _written_by_builder(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def prepare_folder(out: Path, shape: str, seed: int, rebuild: bool) -> bool:
    """True when the folder should be (re)written; refuses a non-empty folder of someone else's."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{out} exists and is not a folder; give another --out.")
    if out.is_dir() and any(out.iterdir()):
        marker = _written_by_builder(out)
        if marker is None:
            raise SystemExit(f"{out} is not empty and was not written by bench.random_models (no {MARKER}); "
                             "refusing to overwrite it. Give an empty or new --out.")
        if marker.get("complete") and marker.get("shape") == shape and marker.get("seed") == seed and not rebuild:
            return False
        for old in out.glob("model-*.safetensors"):  # an earlier build's shards may be named differently
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return True


def _drop_from_cache(path: Path) -> None:
    """Flush and drop a written shard from the page cache: gigabytes of dirty pages would
    otherwise crowd other people's processes on a shared machine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_shards(out: Path, groups: list, seed: int) -> dict[str, str]:
    """One safetensors file per group, each generated, written and freed before the next."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: random_tensor(name, shape, gen) for name, shape in group}
        save_file(tensors, out / filename, metadata={"format": "pt"})
        os.chmod(out / filename, 0o644)  # safetensors writes 0600; others read these models too
        del tensors
        _drop_from_cache(out / filename)
        weight_map.update({name: filename for name, _ in group})
        print(f"  {filename}: {len(group)} tensors", flush=True)
    return weight_map


def copy_tokenizer(out: Path) -> None:
    if not (TOKENIZER_SOURCE / "tokenizer.json").exists():
        raise SystemExit(f"SmolLM2's tokenizer is not at {TOKENIZER_SOURCE}; load the bundled model once "
                         "(python -m core eval --model smollm2-135m --eval-windows 1 --seqlen 64) to convert it.")
    for name in TOKENIZER_FILES:
        if (TOKENIZER_SOURCE / name).exists():
            shutil.copyfile(TOKENIZER_SOURCE / name, out / name)


def build(shape: str, out: str | Path, seed: int = 0, rebuild: bool = False) -> dict:
    """Write the model; returns what the marker records (parameters, bytes, seconds, peak RSS)."""
    out = Path(out).expanduser()
    config = make_config(shape)
    layout = tensor_layout(config)
    if not prepare_folder(out, shape, seed, rebuild):
        print(f"{out}: already a complete {shape} build (seed {seed}); --rebuild to write it again.")
        return _written_by_builder(out)
    start = time.perf_counter()
    info = {"builder": "bench.random_models", "shape": shape, "seed": seed, "std": STD, "dtype": "bfloat16",
            "complete": False}
    (out / MARKER).write_text(json.dumps(info, indent=2))  # first: a half-written folder is still ours
    groups = shard_groups(layout)
    weight_map = write_shards(out, groups, seed)
    n_params = sum(math.prod(s) for _, s in layout)
    total_size = n_params * 2
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                                        indent=2))
    config.save_pretrained(out)
    copy_tokenizer(out)
    disk = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    info.update(complete=True, params=n_params, bytes=total_size, disk_bytes=disk, blocks=config.num_hidden_layers,
                shards=len(groups), build_seconds=round(time.perf_counter() - start, 1),
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    (out / MARKER).write_text(json.dumps(info, indent=2))
    return info


def check_files(folder: str | Path) -> None:
    """Every tensor the model expects is in the shards, with its shape, in bfloat16 (headers only)."""
    from safetensors import safe_open
    from transformers import AutoConfig

    folder = Path(folder)
    expected = dict(tensor_layout(AutoConfig.from_pretrained(folder)))
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    if set(weight_map) != set(expected):
        raise AssertionError(f"{folder}: index names differ from the model's: "
                             f"{sorted(set(weight_map) ^ set(expected))[:5]}")
    for filename in sorted(set(weight_map.values())):
        with safe_open(str(folder / filename), framework="pt") as fh:
            for name in fh.keys():
                part = fh.get_slice(name)
                if tuple(part.get_shape()) != expected[name] or part.get_dtype() != "BF16":
                    raise AssertionError(f"{folder}/{filename}: {name} is {part.get_dtype()} "
                                         f"{part.get_shape()}, expected BF16 {expected[name]}")


def check_load(folder: str | Path, meta: bool = False) -> float | None:
    """Load the model with transformers in bfloat16 and run one short forward (its mean loss);
    meta: only build it from the files on the meta device (no weights read, no forward)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if meta:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="meta")
        assert all(p.device.type == "meta" for p in model.parameters())
        return None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The history of the city begins", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    if not math.isfinite(loss):
        raise AssertionError(f"{folder}: the forward gave a non-finite loss {loss}")
    return loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, help="folder to write (missing, empty, or an earlier build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true", help="write again a complete build of the same shape")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the generator (default 1)")
    ap.add_argument("--check", choices=["files", "meta", "full"], default="files",
                    help="after the build: shard headers only (default), also a transformers load on the meta "
                         "device, or a full load and one forward (needs the model's size in RAM)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = build(args.shape, args.out, args.seed, args.rebuild)
    check_files(args.out)
    print(f"{args.out}: {args.shape}, {info['params'] / 1e9:.3f}B parameters, {info['bytes'] / 2**30:.2f} GiB "
          f"of bfloat16 weights, {info['disk_bytes'] / 2**30:.2f} GiB on disk ({info['shards']} shards); "
          f"built in {info['build_seconds']} s, builder peak RSS {info['peak_rss_bytes'] / 2**30:.2f} GiB")
    if args.check == "meta":
        check_load(args.out, meta=True)
        print("loaded with transformers on the meta device")
    elif args.check == "full":
        print(f"loaded with transformers; one forward: loss {check_load(args.out):.3f}")


if __name__ == "__main__":
    main()
