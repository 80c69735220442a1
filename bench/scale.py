"""Memory and time of the CLI at real model sizes: random Llama-shaped models (bench/random_models.py)
pruned through `python -m core` in a subprocess, one command at a time.

Per model shape and method:
- Wanda, SparseGPT (and any method not listed in ARTIFACT_METHODS): `prune`; its peak RSS, wall
  time, seconds per block (result.json's prune_seconds / blocks) and the mask file's size.
- UniPruning: `calibrate` (the artifact and its size; seconds per block from its
  calibration_seconds), then `cut --artifact` (its own peak RSS and mask file), then the cut timed
  in a process of its own: the artifact evicted from the page cache and loaded + cut (cold), then
  loaded + cut again (warm), and every mask of that cut made.
Peak RSS is the child's own (os.wait4's ru_maxrss); on a GPU also the child's peak CUDA memory
(torch.cuda.max_memory_allocated, written by a small wrapper around the CLI at exit).

    python -m bench.random_models --shape llama-3.2-1b --out /work/scale-models/llama-3.2-1b
    python bench/scale.py --shapes smollm2-135m,llama-3.2-1b --methods wanda
    python bench/scale.py --shapes llama-3.1-8b --methods wanda,sparsegpt --offload disk --device cuda
    python bench/scale.py --report-only          # the table, JSON and plot from the rows so far

Rows are kept in bench/results/<name>.partial.json as they finish; a rerun skips the rows already
measured (same shape, method, dtype, device, offload, windows, seqlen) unless --redo. A row that
cannot run (model folder missing, too little RAM or disk, a CLI error) is recorded with a note.
A row may carry `predicted_peak_bytes` (the memory model's estimate); --report-only then plots it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, ROOT, print_table, save, wt2_sources  # noqa: E402

GIB = 2**30
ARTIFACT_METHODS = {"unipruning", "unipruning-adamw"}  # calibrate once, then cut from the artifact
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MARGIN_BYTES = 1 * GIB  # beyond the weights: interpreter, torch, one block's activations

# Runs the CLI exactly as `python -m core` does (from the working directory: --engine), and on exit
# writes which core ran and the process's peak CUDA memory (only a process can read its own
# allocator's peak).
CLI_WRAPPER = r"""
import json, runpy, sys
report = sys.argv[1]
sys.argv = ["python -m core", *sys.argv[2:]]
try:
    runpy.run_module("core", run_name="__main__", alter_sys=True)
finally:
    import torch
    out = {"core": sys.modules["core"].__file__ if "core" in sys.modules else None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(allocated=torch.cuda.max_memory_allocated(), reserved=torch.cuda.max_memory_reserved())
    with open(report, "w") as fh:
        json.dump(out, fh)
"""

# bench.scale from this repository, core from --engine (imported later, inside the functions)
CUT_TIMING = ("import sys; sys.path.insert(0, {bench!r}); from bench.scale import cut_timing_main; "
              "sys.path.insert(0, {engine!r}); cut_timing_main()")


# ---------------------------------------------------------------- the machine and the models

def meminfo(key: str) -> int | None:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def git_state(engine: Path) -> dict:
    """The engine changes between runs: each row says which code it measured."""
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=engine, capture_output=True, text=True).stdout

    dirty = [line[3:] for line in git("status", "--porcelain", "--", "core").splitlines() if line.strip()]
    return {"engine": str(engine), "commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "core_uncommitted": dirty}


def machine() -> dict:
    import accelerate
    import torch
    import transformers

    info = {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "ram_bytes": meminfo("MemTotal"), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def model_facts(folder: Path, dtype: str) -> dict:
    """Parameters and blocks from the folder's config (a meta-device skeleton: no memory)."""
    import math

    from transformers import AutoConfig

    from bench.random_models import tensor_layout

    config = AutoConfig.from_pretrained(folder)
    params = sum(math.prod(shape) for _, shape in tensor_layout(config))
    if dtype == "auto":  # the checkpoint's own dtype when it is 16-bit (core.loading), else float32
        stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
        dtype = stored.replace("torch.", "") if stored.endswith(("bfloat16", "float16")) else "float32"
    return {"params": params, "blocks": config.num_hidden_layers, "bf16_bytes": params * 2,
            "model_bytes": params * DTYPE_BYTES.get(dtype, 4)}


def size_on_disk(path: Path) -> int | None:
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------- one measured child process

def run_measured(argv: list[str], logs: Path, timeout: float, cwd: Path = ROOT) -> dict:
    """Run argv in its own process group; its exact peak RSS, wall time and exit status."""
    logs.parent.mkdir(parents=True, exist_ok=True)
    with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            # wait4 on this pid: ru_maxrss is this child's own peak (RUSAGE_CHILDREN would be the
            # largest over every child this process ever waited for)
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
    return {"rc": proc.returncode, "wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "timed_out": killed.is_set(), "log": str(logs.with_suffix(".err"))}


def run_cli(command: list[str], logs: Path, args) -> dict:
    report = logs.with_suffix(".exit.json")
    report.unlink(missing_ok=True)
    result = run_measured([sys.executable, "-c", CLI_WRAPPER, str(report), *command], logs, args.timeout,
                          args.engine)
    if report.exists():
        facts = json.loads(report.read_text())
        result.update(core=facts.get("core"), gpu_peak_bytes=facts.get("allocated"))
    return result


def failure_note(result: dict, what: str) -> str | None:
    if result["timed_out"]:
        return f"{what}: killed after the --timeout"
    if result["rc"] == 0:
        return None
    lines = [ln.strip() for ln in Path(result["log"]).read_text(errors="replace").replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return f"{what}: exit {result['rc']}: {(errors or lines or ['no output'])[-1][:300]}"


def last_json(path: Path) -> dict:
    """The JSON object a CLI command printed last on stdout ({} if none)."""
    text = path.read_text(errors="replace")
    start = text.rfind("\n{")
    start = start + 1 if start >= 0 else text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


# ---------------------------------------------------------------- the cut, timed cold and warm

def timed_cut(artifact_path: str, lm, sparsity: float) -> dict:
    """load_artifact + cut, then every mask of the cut made. The only place this benchmark calls
    core's artifact API: adapt it here when those signatures change."""
    from core.artifacts import load_artifact
    from core.cutting import LazyMasks
    from core.pruning import cut

    start = time.perf_counter()
    artifact = load_artifact(artifact_path, lm)
    loaded = time.perf_counter()
    result = cut(artifact, sparsity)
    done = time.perf_counter()
    masks = getattr(result, "masks", result)
    if isinstance(masks, LazyMasks):
        masks.make_all()
    made = time.perf_counter()
    return {"load_s": loaded - start, "cut_s": done - loaded, "masks_s": made - done}


def evict(path: Path) -> None:
    """Drop a file (or every file of a folder) from the page cache: the next read is from disk."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cut_timing_main() -> None:
    """Child process: argv = model, artifact, sparsity, dtype, device. Prints one JSON line."""
    import gc

    from core.loading import load_model

    model, artifact, sparsity, dtype, device = sys.argv[1:6]
    lm = load_model(model, dtype, device)
    evict(Path(artifact))
    cold = timed_cut(artifact, lm, float(sparsity))
    gc.collect()  # the cold cut's artifact and masks go before the warm one is read
    warm = timed_cut(artifact, lm, float(sparsity))
    print(json.dumps({"cold": cold, "warm": warm}))


def run_cut_timing(model: Path, artifact: Path, sparsity: float, args, logs: Path) -> dict:
    code = CUT_TIMING.format(bench=str(ROOT), engine=str(args.engine))
    argv = [sys.executable, "-c", code, str(model), str(artifact), str(sparsity), args.dtype, args.device]
    result = run_measured(argv, logs, args.timeout, args.engine)
    note = failure_note(result, "cut timing")
    if note:
        return {"note": note}
    times = last_json(logs.with_suffix(".out"))
    cold, warm = times.get("cold", {}), times.get("warm", {})
    return {"cut_cold_s": _sum(cold, "load_s", "cut_s"), "cut_warm_s": _sum(warm, "load_s", "cut_s"),
            "cut_cold_load_s": cold.get("load_s"), "cut_warm_load_s": warm.get("load_s"),
            "masks_make_s": warm.get("masks_s"), "cut_timing_peak_rss_bytes": result["peak_rss_bytes"]}


def _sum(times: dict, *keys) -> float | None:
    return round(sum(times[k] for k in keys), 3) if all(k in times for k in keys) else None


# ---------------------------------------------------------------- one row: a shape and a method

def common_flags(model: Path, args) -> list[str]:
    flags = ["--model", str(model), "--dtype", args.dtype, "--device", args.device]
    if args.offload:  # only when asked: the CLI may not have the flag
        flags += ["--offload", args.offload]
    return flags


def calib_flags(method: str, args) -> list[str]:
    return ["--method", method, "--calib-text", args.calib_text, "--calib-windows", str(args.calib_windows),
            "--seqlen", str(args.seqlen), "--no-eval"]


def per_block(seconds, blocks: int) -> float | None:
    return round(seconds / blocks, 2) if isinstance(seconds, (int, float)) else None


def measure_prune(model: Path, method: str, folder: Path, facts: dict, args) -> dict:
    out = folder / "prune"
    command = ["prune", *common_flags(model, args), *calib_flags(method, args),
               "--sparsity", str(args.sparsity), "--out", str(out)]
    result = run_cli(command, folder / "prune", args)
    row = {"peak_rss_bytes": result["peak_rss_bytes"], "wall_s": result["wall_s"], "core": result.get("core"),
           "gpu_peak_bytes": result.get("gpu_peak_bytes"), "note": failure_note(result, "prune")}
    if row["note"] is None:
        seconds = read_json(out / "result.json").get("prune_seconds")
        row.update(calib_s=seconds, s_per_block=per_block(seconds, facts["blocks"]),
                   mask_bytes=size_on_disk(out / "masks.safetensors"))
    return row


def measure_artifact(model: Path, method: str, folder: Path, facts: dict, args) -> dict:
    artifact = folder / "artifact" / "artifact.safetensors"  # its own folder: sized whatever the layout
    command = ["calibrate", *common_flags(model, args), *calib_flags(method, args), "--out", str(artifact)]
    result = run_cli(command, folder / "calibrate", args)
    row = {"peak_rss_bytes": result["peak_rss_bytes"], "wall_s": result["wall_s"], "core": result.get("core"),
           "gpu_peak_bytes": result.get("gpu_peak_bytes"), "note": failure_note(result, "calibrate")}
    if row["note"]:
        return row
    seconds = last_json(folder / "calibrate.out").get("calibration_seconds")
    row.update(calib_s=seconds, s_per_block=per_block(seconds, facts["blocks"]),
               artifact_bytes=size_on_disk(artifact.parent))
    row.update(measure_cut(model, artifact, folder, args))
    return row


def measure_cut(model: Path, artifact: Path, folder: Path, args) -> dict:
    """`cut --artifact` through the CLI, then the cut timed cold and warm in a process of its own."""
    out = folder / "cut"
    command = ["cut", *common_flags(model, args), "--artifact", str(artifact), "--sparsity", str(args.cut_sparsity),
               "--no-eval", "--out", str(out)]
    result = run_cli(command, folder / "cut", args)
    row = {"cut_cli_peak_rss_bytes": result["peak_rss_bytes"], "cut_cli_wall_s": result["wall_s"],
           "cut_cli_gpu_peak_bytes": result.get("gpu_peak_bytes"), "note": failure_note(result, "cut")}
    if row["note"]:
        return row
    row.update(cut_cli_s=read_json(out / "result.json").get("cut_seconds"),
               mask_bytes=size_on_disk(out / "masks.safetensors"))
    row.update(run_cut_timing(model, artifact, args.cut_sparsity, args, folder / "cut_timing"))
    return row


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def skip_reason(facts: dict, method: str, args) -> str | None:
    """Too little RAM for the weights (unless offloaded to disk), or too little disk for the outputs."""
    need = MARGIN_BYTES + (0 if args.offload == "disk" else facts["model_bytes"])
    have = meminfo("MemAvailable") or 0
    if need > have:
        hint = "" if args.offload == "disk" else "; try --offload disk"
        return (f"skipped: the weights need about {need / GIB:.1f} GiB ({args.dtype} + {MARGIN_BYTES / GIB:.0f} "
                f"GiB), MemAvailable is {have / GIB:.1f} GiB{hint}")
    disk_need = facts["bf16_bytes"] * (3 if method in ARTIFACT_METHODS else 1)
    args.out_prefix.mkdir(parents=True, exist_ok=True)
    disk_have = os.statvfs(args.out_prefix).f_bavail * os.statvfs(args.out_prefix).f_frsize
    if disk_need > disk_have:
        return (f"skipped: outputs may need {disk_need / GIB:.1f} GiB of disk, {args.out_prefix} has "
                f"{disk_have / GIB:.1f}")
    return None


def measure_row(shape: str, method: str, args) -> dict:
    model = args.models_dir / shape
    row = {**row_key_fields(shape, method, args), "status": "skipped", "started": time.strftime("%Y-%m-%d %H:%M:%S"),
           **git_state(args.engine), "loadavg_1m": os.getloadavg()[0], "mem_available_bytes": meminfo("MemAvailable")}
    if not (model / "config.json").exists():
        row["note"] = (f"skipped: no model at {model}; build it with python -m bench.random_models "
                       f"--shape {shape} --out {model}")
        return row
    facts = model_facts(model, args.dtype)
    row.update(facts)
    reason = skip_reason(facts, method, args)
    if reason:
        row["note"] = reason
        return row
    folder = args.out_prefix / args.name / run_name(row)
    measure = measure_artifact if method in ARTIFACT_METHODS else measure_prune
    row.update(measure(model, method, folder, facts, args))
    row["status"] = "failed" if row.get("note") else "ok"
    row["logs"] = str(folder)
    if not args.keep:
        remove_outputs(folder)
    return row


def remove_outputs(folder: Path) -> None:
    """Masks and artifacts are gigabytes at 8B: keep the logs (and result.json), drop the tensors."""
    for file in folder.rglob("*.safetensors"):
        file.unlink()


# ---------------------------------------------------------------- rows, keys, resuming

KEY_FIELDS = ("shape", "method", "dtype", "device", "offload", "calib_windows", "seqlen")


def row_key_fields(shape: str, method: str, args) -> dict:
    return {"shape": shape, "method": method, "dtype": args.dtype, "device": args.device,
            "offload": args.offload or "none", "calib_windows": args.calib_windows, "seqlen": args.seqlen}


def row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY_FIELDS)


def run_name(row: dict) -> str:
    return (f"{row['shape']}-{row['method']}-{row['dtype']}-{row['device']}-offload-{row['offload']}-"
            f"{row['calib_windows']}x{row['seqlen']}")


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def keep_row(rows: list[dict], row: dict) -> list[dict]:
    """Replace the row of the same key (a rerun), else append."""
    return [r for r in rows if row_key(r) != row_key(row)] + [row]


# ---------------------------------------------------------------- output

def display(row: dict) -> dict:
    """The table's view of a row: GiB, MB, ratios."""
    def gib(key):
        return row[key] / GIB if row.get(key) is not None else None

    def mb(key):
        return row[key] / 1e6 if row.get(key) is not None else None

    ratio = (row["peak_rss_bytes"] / row["model_bytes"]
             if row.get("peak_rss_bytes") and row.get("model_bytes") and row["status"] == "ok" else None)
    return {**row, "params_b": row["params"] / 1e9 if row.get("params") else None, "peak_gib": gib("peak_rss_bytes"),
            "ratio": ratio, "gpu_gib": gib("gpu_peak_bytes"), "predicted_gib": gib("predicted_peak_bytes"), "mask_mb": mb("mask_bytes"),
            "artifact_mb": mb("artifact_bytes"), "cut_peak_gib": gib("cut_cli_peak_rss_bytes"),
            "setting": (f"{row['dtype']} {row['device']} offload {row['offload']} "
                        f"{row['calib_windows']}x{row['seqlen']}"),
            "note": row.get("note") or ""}


COLUMNS = [("shape", "shape", ""), ("params_b", "params (B)", ".3f"), ("method", "method", ""),
           ("setting", "setting", ""), ("peak_gib", "peak RSS GiB", ".2f"),
           ("predicted_gib", "memory model GiB", ".2f"), ("ratio", "RSS / model", ".1f"),
           ("gpu_gib", "peak GPU GiB", ".2f"), ("wall_s", "wall s", ".1f"), ("s_per_block", "s / block", ".2f"),
           ("mask_mb", "mask MB", ".1f"), ("artifact_mb", "artifact MB", ".1f"),
           ("cut_peak_gib", "cut CLI peak GiB", ".2f"), ("cut_cold_s", "cut cold s", ".2f"),
           ("cut_warm_s", "cut warm s", ".2f"), ("masks_make_s", "all masks s", ".2f"), ("note", "note", "")]


def protocol(args) -> dict:
    return {"calib_text": args.calib_text, "calib_windows": args.calib_windows, "seqlen": args.seqlen,
            "sparsity": args.sparsity, "cut_sparsity": args.cut_sparsity, "dtype": args.dtype, "device": args.device,
            "offload": args.offload or "none", "eval": "none (--no-eval)",
            "peak_rss": "the CLI child's own ru_maxrss (os.wait4); RSS / model = peak over the weights in the dtype",
            "cut_cold": "artifact evicted from the page cache (POSIX_FADV_DONTNEED), load_artifact + cut",
            "cut_warm": "load_artifact + cut again in the same process; all masks s = making every mask of that cut"}


# The process before any model: interpreter, torch, transformers, this tool's modules, a tokenizer.
RUNTIME_CODE = ("import sys, torch, transformers; from core import cli, pruning, loading; "
                "from transformers import AutoTokenizer; AutoTokenizer.from_pretrained(sys.argv[1])")


def measure_runtime(args) -> int | None:
    """Peak RSS of a child that imports everything a CLI run imports and loads a tokenizer."""
    folder = next((args.models_dir / s for s in args.shapes.split(",") if (args.models_dir / s.strip()).is_dir()),
                  None)
    if folder is None:
        return None
    result = run_measured([sys.executable, "-c", RUNTIME_CODE, str(folder)],
                          args.out_prefix / args.name / "runtime", 600, args.engine)
    return result["peak_rss_bytes"] if result["rc"] == 0 else None


def predicted_peak(row: dict, runtime: int, models_dir: Path) -> int | None:
    """core.memory.memory_model's peak host memory for the row's model and settings."""
    import torch
    from transformers import AutoConfig

    from core.memory import memory_model

    folder = models_dir / row["shape"]
    if not (folder / "config.json").exists():
        return None
    config = AutoConfig.from_pretrained(folder)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(
        row["dtype"], torch.bfloat16 if row.get("model_bytes") == row.get("bf16_bytes") else torch.float32)
    mode = "calibrate" if row["method"] in ARTIFACT_METHODS else "prune"
    parts = memory_model(config, dtype, row["method"], row["calib_windows"], row["seqlen"],
                         offload=row.get("offload") or "none", mode=mode, runtime=runtime)
    return int(sum(parts.values()))


def report(rows: list[dict], payload: dict, name: str) -> None:
    rows = sorted(rows, key=lambda r: (r.get("params") or 0, r["shape"], r["method"], run_name(r)))
    runtime = payload.get("runtime_bytes")
    if runtime and payload.get("models_dir"):
        for row in rows:
            if row["status"] == "ok":
                folder = Path(payload["models_dir"]) / row["shape"]
                if (folder / "config.json").exists():
                    row.update(model_facts(folder, row["dtype"]))
                row["predicted_peak_bytes"] = predicted_peak(row, runtime, Path(payload["models_dir"]))
    payload = {**payload, "rows": rows}
    shown = [display(r) for r in rows]
    table = print_table(shown, COLUMNS)
    head = (f"Rows of bench/scale.py (protocol: {payload['protocol']['calib_windows']} windows x "
            f"{payload['protocol']['seqlen']} tokens of {Path(payload['protocol']['calib_text']).name}, "
            f"sparsity {payload['protocol']['sparsity']}, cut at {payload['protocol']['cut_sparsity']}); machine: "
            f"{payload['machine']['cpus']} CPUs, {payload['machine']['ram_bytes'] / GIB:.0f} GiB RAM, "
            f"torch {payload['machine']['torch']}, transformers {payload['machine']['transformers']}.\n\n")
    path = save(name, payload, head + table)
    plot(rows, path.with_suffix(".html"))
    print(f"saved {path}")


def plot(rows: list[dict], path: Path) -> None:
    import plotly.graph_objects as go

    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["params"])
    fig = go.Figure()
    for method in dict.fromkeys(r["method"] for r in ok):
        pts = [r for r in ok if r["method"] == method]
        fig.add_trace(go.Scatter(x=[r["params"] for r in pts], y=[r["peak_rss_bytes"] / GIB for r in pts],
                                 mode="lines+markers", name=f"{method} (measured)",
                                 text=[f"{r['shape']}, {r['dtype']}, offload {r['offload']}" for r in pts]))
        predicted = [r for r in pts if r.get("predicted_peak_bytes")]
        if predicted:
            fig.add_trace(go.Scatter(x=[r["params"] for r in predicted],
                                     y=[r["predicted_peak_bytes"] / GIB for r in predicted], mode="lines+markers",
                                     line={"dash": "dot"}, name=f"{method} (memory model)"))
    sizes = sorted({r["params"] for r in rows if r.get("params")})
    if sizes:
        fig.add_trace(go.Scatter(x=sizes, y=[p * 2 / GIB for p in sizes], mode="lines", name="model size in bf16",
                                 line={"dash": "dash", "color": "gray"}))
    fig.update_layout(title="Peak RSS of the CLI against model parameters", xaxis_title="parameters",
                      yaxis_title="peak RSS (GiB)", xaxis_type="log", yaxis_type="log")
    fig.write_html(path, include_plotlyjs="cdn")


# ---------------------------------------------------------------- main

def parse_args():
    from core.offload import OFFLOAD_CHOICES  # here, not at import: importing core loads torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b",
                    help="model folders under --models-dir (bench/random_models.py shapes)")
    ap.add_argument("--methods", default="wanda,sparsegpt,unipruning")
    ap.add_argument("--models-dir", type=Path, default=ROOT.parent / "scale-models")
    ap.add_argument("--out-prefix", type=Path, default=ROOT.parent / "scale-runs",
                    help="folder for each run's outputs and logs (masks and artifacts removed after unless --keep)")
    ap.add_argument("--calib-text", default=None, help="calibration text (default: protocol wt2-512's calib-20.txt)")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--sparsity", type=float, default=0.5, help="prune's sparsity")
    ap.add_argument("--cut-sparsity", type=float, default=0.7, help="the sparsity cut from an artifact")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--offload", choices=OFFLOAD_CHOICES, default=None,
                    help="passed to the CLI as --offload when given (not passed otherwise)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per CLI command")
    ap.add_argument("--keep", action="store_true", help="keep masks and artifacts")
    ap.add_argument("--redo", action="store_true", help="measure again rows already measured")
    ap.add_argument("--name", default="scale")
    ap.add_argument("--engine", type=Path, default=ROOT,
                    help="the checkout whose core/ runs (default this one), e.g. a `git archive` of an older commit")
    ap.add_argument("--report-only", action="store_true", help="no runs: outputs from <name>.partial.json")
    args = ap.parse_args()
    args.calib_text = args.calib_text or wt2_sources()[0]
    args.out_prefix = args.out_prefix.resolve()
    args.engine = args.engine.resolve()
    return args


def main() -> None:
    args = parse_args()
    partial = RESULTS / f"{args.name}.partial.json"
    rows = load_rows(partial)
    payload = {"machine": machine(), "protocol": protocol(args), "models_dir": str(args.models_dir)}
    previous = json.loads(partial.read_text()) if partial.exists() else {}
    payload["runtime_bytes"] = previous.get("runtime_bytes") or measure_runtime(args)
    if not args.report_only:
        done = {row_key(r) for r in rows if r["status"] == "ok" and not args.redo}
        for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
            for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
                if row_key(row_key_fields(shape, method, args)) in done:
                    continue
                print(f"== {shape} {method} ...", flush=True)
                row = measure_row(shape, method, args)
                rows = keep_row(rows, row)
                print(json.dumps(row, default=str), flush=True)
                save(args.name + ".partial", {**payload, "rows": rows}, "")
    report(rows, {**payload, "rows": rows}, args.name)


if __name__ == "__main__":
    main()
