"""The command line: python -m core {methods,prune,calibrate,cut,sweep,eval,export} ...

Examples
  python -m core methods
  python -m core prune --model smollm2-135m --method wanda --sparsity 0.5 --out runs/wanda50
  python -m core calibrate --method unipruning --out runs/uni.artifact.safetensors
  python -m core cut --artifact runs/uni.artifact.safetensors --sparsity 0.7 --out runs/uni70
  python -m core sweep --method wanda --sparsities 0.3,0.5,0.7 --patterns unstructured,2:4
  python -m core eval --model smollm2-135m --masks runs/wanda50/masks.safetensors
  python -m core export --masks runs/wanda50/masks.safetensors --out runs/wanda50/model
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .errors import PruneError
from .offload import OFFLOAD_CHOICES
from .outputs import DiskFullError, cache_dir, check_replaceable, check_run_folder, check_writable, write_text_atomic


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = {"bar": None}

    def update(done: int, total: int, what: str) -> None:
        if bar["bar"] is None or bar["bar"].total != total:
            if bar["bar"] is not None:
                bar["bar"].close()
            bar["bar"] = tqdm(total=total, desc=desc, unit="step", leave=False)
        bar["bar"].n = done
        bar["bar"].set_postfix_str(what, refresh=True)
        if done >= total:
            bar["bar"].close()
            bar["bar"] = None

    return update


def _add_model_args(p: argparse.ArgumentParser, from_artifact: bool = False) -> None:
    """from_artifact: the command may read an --artifact, which names its model; --model then
    defaults to None and _load fills it in (the artifact's model, else the default model)."""
    from .bundled import BUNDLED, DEFAULT_MODEL

    default_text = f"the model --artifact was calibrated on, else {DEFAULT_MODEL}" if from_artifact else DEFAULT_MODEL
    p.add_argument("--model", default=None if from_artifact else DEFAULT_MODEL,
                   help=f"bundled name ({', '.join(BUNDLED)}), local folder, .gguf file or hub id "
                        f"(default: {default_text})")
    p.add_argument("--dtype", default="auto", help="auto (default: the checkpoint's own when it is stored in "
                   "bfloat16/float16, else float32), float32, bfloat16 or float16. Statistics are float32 either way")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where blocks run: cpu, cuda or cuda:N (default: cuda when a GPU is visible)")
    p.add_argument("--offload", default="none", choices=OFFLOAD_CHOICES,
                   help="where the decoder blocks' weights live: none (on --device), cpu (CPU memory, each block "
                        "brought to the GPU when it runs), disk (read from the checkpoint when a block runs; pruned "
                        "blocks go to an offload folder). For models bigger than the device or the RAM")
    p.add_argument("--offload-folder", default=None,
                   help="with --offload disk: where this run's offload folder is made, in a pruning-explorer-offload subfolder "
                        "(default: the cache folder); "
                        "removed at exit")


def _add_data_args(p: argparse.ArgumentParser, calibration: bool = True) -> None:
    from .data import DEFAULT_SOURCE

    if calibration:
        p.add_argument("--calib-text", default=DEFAULT_SOURCE,
                       help=f"calibration text: {DEFAULT_SOURCE} (offline default), wikitext2, c4, or a "
                            ".txt/.jsonl/.json/.parquet file")
        p.add_argument("--calib-windows", type=int, default=32, help="number of calibration windows (default 32)")
        p.add_argument("--seed", type=int, default=0, help="seed for the calibration window starts")
    p.add_argument("--eval-text", default=DEFAULT_SOURCE, help="evaluation text (same choices)")
    p.add_argument("--eval-windows", type=int, default=32, help="at most this many evaluation windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--no-eval", action="store_true", help="skip perplexity")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    from .methods import all_methods

    p.add_argument("--method", default="wanda", choices=sorted(all_methods()), help="pruning method")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a method parameter (see `python -m core methods`); repeatable")
    p.add_argument("--skip-misfit-layers", action="store_true",
                   help="with N:M, leave dense the layers whose width is not a multiple of M")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward during calibration")


def _params(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise PruneError(f"--param wants NAME=VALUE, got {item!r}.")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _fill_model(args) -> None:
    """--model not given (cut, sweep): the model the --artifact names, else the default model."""
    from .artifacts import read_artifact_meta
    from .bundled import DEFAULT_MODEL

    artifact = getattr(args, "artifact", None)
    if not artifact:
        args.model = DEFAULT_MODEL
        return
    named = read_artifact_meta(artifact).get("model_id")  # the header only: no tensor is read
    if not named:
        raise PruneError(f"{artifact} does not name the model it was calibrated on; give --model.")
    args.model = named
    print(f"--model not given: using {named!r}, the model {artifact} was calibrated on.", file=sys.stderr)


def _load(args):
    from .data import check_seqlen
    from .errors import ModelLoadError
    from .loading import load_model

    from_artifact = getattr(args, "model", None) is None and bool(getattr(args, "artifact", None))
    if getattr(args, "model", None) is None:
        _fill_model(args)
    print(f"Loading {args.model} ...", file=sys.stderr)
    try:
        lm = load_model(args.model, args.dtype, args.device, args.offload, args.offload_folder)
    except ModelLoadError as exc:
        if not from_artifact:
            raise
        raise ModelLoadError(f"{args.artifact} was calibrated on {args.model!r}, which cannot be loaded here "
                             f"({exc}). Give --model with that model's folder or name.") from exc
    # Refuse a --seqlen the model cannot take now, before any text is tokenized or forward run.
    calibrates = hasattr(args, "calib_text") and not getattr(args, "artifact", None)
    evaluates = hasattr(args, "seqlen") and (args.command == "eval" or not args.no_eval)
    if calibrates or evaluates:
        check_seqlen(lm, args.seqlen)
    return lm


# The integer options (argparse makes them ints) and the least value each can take: what a
# zero or negative one would do is fail deep in the work (range() step 0, an empty torch.cat).
_COUNTS = {
    "calib_windows": ("--calib-windows", 1, "calibration windows"),
    "eval_windows": ("--eval-windows", 1, "evaluation windows, at most"),
    "seqlen": ("--seqlen", 2, "tokens per window; a perplexity needs two"),
    "batch_size": ("--batch-size", 1, "windows per forward"),
    "new_tokens": ("--new-tokens", 2, "the decode rate is timed from the first new token"),
}


def _check_params(args) -> None:
    """Every --param through its method's schema (finite numbers, in range, of the right kind),
    before any model is loaded. With --artifact the method is the artifact's (its header names it);
    an artifact that cannot be read is left to the command, which says why."""
    from .artifacts import read_artifact_meta
    from .methods import all_methods

    params = _params(args.param)
    name = getattr(args, "method", None)
    if getattr(args, "artifact", None):
        try:
            name = read_artifact_meta(args.artifact).get("method")
        except PruneError:
            return
    method = all_methods().get(name)
    if method is None:
        return
    try:
        method.resolve_params(params)
    except ValueError as exc:
        raise PruneError(f"--param: {exc} See `python -m core methods` for {method.name}'s parameters.") from None


def _check_args(args) -> None:
    """Validate what argparse cannot, before any model is loaded."""
    from .patterns import check_sparsity, parse_pattern

    for attr, (flag, least, what) in _COUNTS.items():
        value = getattr(args, attr, None)
        if value is not None and value < least:
            raise PruneError(f"{flag} must be at least {least} ({what}); got {value}.")
    if hasattr(args, "sparsity"):
        args.sparsity = check_sparsity(args.sparsity)
    if hasattr(args, "param"):
        _check_params(args)
    if getattr(args, "sparsities", None) is not None:
        for text in args.sparsities.split(","):
            try:
                check_sparsity(text.strip())
            except PruneError as exc:
                raise PruneError(f"--sparsities {args.sparsities!r}: {exc} Give comma-separated numbers "
                                 "in [0, 1), e.g. 0.3,0.5,0.7.") from None
    if getattr(args, "patterns", None) is not None:
        for text in args.patterns.split(","):
            try:
                parse_pattern(text)
            except PruneError as exc:
                raise PruneError(f"--patterns {args.patterns!r}: {exc}") from None


def _read_masks(path, lm):
    """load_masks, and a stderr note naming the matrices the file leaves dense on purpose."""
    from .mask_file import load_masks
    from .maskset import dense_note

    masks = load_masks(path, lm)
    note = dense_note(masks)
    if note:
        print(f"note: {path}: {note}", file=sys.stderr)
    return masks


def _eval(lm, args, label: str):
    from .data import evaluation_set
    from .evaluate import perplexity

    windows, protocol = evaluation_set(lm.tokenizer, args.eval_text, args.seqlen, args.eval_windows)
    return perplexity(lm, windows, protocol.as_dict(), progress=_progress_bar(f"perplexity ({label})"))


def cmd_methods(args) -> int:
    from .methods import all_methods

    for method in all_methods().values():
        if args.json:
            continue
        print(f"{method.name:<12} {method.title}  [patterns: {', '.join(method.patterns)}]")
        print(f"{'':<12} {method.description}")
        for p in method.params:
            rng = f" in [{p.low}, {p.high}]" if p.low is not None else ""
            ch = f" one of {list(p.choices)}" if p.choices else ""
            print(f"{'':<14}--param {p.name}=<{p.kind}>  default {p.default}{rng}{ch}: {p.help}")
    if args.json:
        print(json.dumps([m.describe() for m in all_methods().values()], indent=2))
    return 0


def _save_run(folder: str, masks, lm, results: dict) -> int:
    """What prune and cut leave behind: masks.safetensors and result.json, a summary printed."""
    from .maskset import dense_note

    out = Path(folder)
    # achieved_sparsity counts every prunable weight, those of matrices left dense (skipped) at 0
    results["skipped_layers"] = masks.skipped_layers
    note = dense_note(masks)
    if note:
        print(f"note: {note}", file=sys.stderr)
    try:
        _write_run_files(out, masks, lm, results)
    except DiskFullError as exc:  # the work is done: keep it where there is room, and say where
        kept = _rescue_run(masks, lm, results)
        if kept is None:
            raise DiskFullError(f"{exc} The masks could not be saved anywhere else either (the cache and "
                                f"temporary folders are full too): run again once there is room.") from exc
        raise DiskFullError(f"{exc} The masks and result.json were saved to {kept} instead: move them to "
                            f"{out} once there is room.") from exc
    print(json.dumps({k: v for k, v in results.items() if k != "eval_protocol"}, indent=2))
    print(f"Masks saved to {out / 'masks.safetensors'}", file=sys.stderr)
    return 0


def _write_run_files(out: Path, masks, lm, results: dict) -> None:
    """masks.safetensors, then result.json, each written atomically (a full disk leaves neither
    half written)."""
    from .mask_file import save_masks

    save_masks(out / "masks.safetensors", masks, lm)
    write_text_atomic(out / "result.json", json.dumps(results, indent=2, default=str))


def _rescue_run(masks, lm, results: dict) -> Path | None:
    """When --out has no room for a finished prune / cut: its files written to a new folder in the
    cache folder, else in the temporary folder (the first with room), so the masks, the costly part,
    survive; None if neither has room. A half-written masks.safetensors in --out would be useless,
    so the whole pair goes to one place."""
    import tempfile

    from .outputs import DiskFullError as Full, fix_modes

    stamp = time.strftime("%Y%m%d-%H%M%S")
    for root in (cache_dir() / "unsaved-runs", Path(tempfile.gettempdir()) / "pruning-explorer-unsaved-runs"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix=f"{stamp}-", dir=root))
        except OSError:
            continue
        try:
            _write_run_files(folder, masks, lm, results)
            fix_modes(folder)  # mkdtemp's 0700 -> the umask's ordinary mode, like --out would have had
            return folder
        except (Full, OSError):
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _add_cut_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", default=0.5, help="fraction of weights to prune, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", default="unstructured", help="unstructured (default) or N:M such as 2:4; "
                   "structured methods (wanda-sp, flap, spap, structprune, tyr) always prune whole units")
    p.add_argument("--out", default="runs/latest",
                   help="folder for masks.safetensors and result.json (default runs/latest). Other files in it "
                        "are left alone; its own earlier masks.safetensors / result.json are overwritten, files "
                        "of those names that this tool did not write only with --force")
    p.add_argument("--force", action="store_true",
                   help="overwrite a masks.safetensors / result.json in --out that this tool did not write")


def cmd_prune(args) -> int:
    from .data import calibration_set
    from .dense import DenseWeights
    from .pruning import prune_sequential
    from .structured.units import all_block_units
    from .patterns import parse_pattern

    structured = _is_structured(args.method)
    pattern = None if structured else parse_pattern(args.pattern)
    check_run_folder(args.out, args.force)  # before any work
    lm = _load(args)
    dense = DenseWeights(lm)
    _check_memory(args, lm, "structured" if structured else "prune")  # before any data or activation
    results = {"model": lm.model_id, "method": args.method, "pattern": "structured" if structured else str(pattern),
               "sparsity": args.sparsity}
    if not args.no_eval and args.eval_dense:
        results["dense_ppl"] = _eval(lm, args, "dense").value
    windows, protocol = calibration_set(lm.tokenizer, args.calib_text, args.calib_windows, args.seqlen, args.seed)
    start = time.perf_counter()
    if structured or args.one_shot:  # a run source: pruned (structured) or cut from a calibration
        source = _run_source(args, lm, dense, windows, protocol)
        masks = source.masks_at(args.sparsity, pattern, _progress_bar(f"{args.method} (structured)" if structured
                                                                      else "cutting"))
        dense.apply(masks)
        if source.structured:
            results["structured_sparsity"] = round(source.plan.structured_sparsity(all_block_units(lm)), 6)
            results["allocation"] = source.plan.allocation(all_block_units(lm))
    else:  # the papers' procedure: block by block, the model pruned as it goes
        masks, _ = prune_sequential(lm, args.method, windows, args.sparsity, pattern, _params(args.param),
                                    protocol.as_dict(), dense, args.skip_misfit_layers, args.batch_size,
                                    _progress_bar("pruning block by block"), keep_artifact=False)
    results["prune_seconds"] = round(time.perf_counter() - start, 2)
    results["achieved_sparsity"] = round(masks.total_sparsity(), 6)
    if not args.no_eval:
        ppl = _eval(lm, args, "pruned")
        results["ppl"] = ppl.value
        results["eval_protocol"] = ppl.protocol
        masks.meta["perplexity"] = json.dumps({"value": ppl.value, "protocol": ppl.protocol})
    return _save_run(args.out, masks, lm, results)


def _run_source(args, lm, dense, windows, protocol):
    """What gives this command's masks at a sparsity (core.run_source): a structured method pruned
    from the calibration windows, else a cut from a calibration (made now from them)."""
    from .pruning import calibrate
    from .run_source import ArtifactCut, StructuredReprune

    if _is_structured(args.method):
        return StructuredReprune(lm, dense, args.method, windows, _params(args.param), protocol.as_dict())
    artifact = calibrate(lm, args.method, windows, protocol.as_dict(), _params(args.param), dense,
                         args.batch_size, _progress_bar("calibrating"))
    return ArtifactCut(artifact, args.skip_misfit_layers)


def _check_memory(args, lm, mode: str) -> None:
    """Refuse, before anything is allocated, a calibration whose estimated memory (core.memory:
    activations, statistics, artifact, temporaries from the model's shapes) will not fit."""
    from .memory import CLI_HINTS, check_calibration_memory

    check_calibration_memory(lm, args.method, args.calib_windows, args.seqlen, args.batch_size, mode,
                             _params(args.param), device=args.device, hints=CLI_HINTS)


def _calibrate_or_load(args, lm, dense):
    """The sweep's / cut's artifact: read from --artifact, else calibrated now (and saved with
    --save-artifact)."""
    from .artifacts import load_artifact, save_artifact
    from .data import calibration_set
    from .pruning import calibrate

    if getattr(args, "artifact", None):
        artifact = load_artifact(args.artifact, lm, dense)
        print(f"Loaded the {artifact.method} artifact {args.artifact} (calibrated on "
              f"{artifact.protocol.get('source', '?')}).", file=sys.stderr)
        return artifact
    _check_memory(args, lm, "calibrate")
    windows, protocol = calibration_set(lm.tokenizer, args.calib_text, args.calib_windows, args.seqlen, args.seed)
    artifact = calibrate(lm, args.method, windows, protocol.as_dict(), _params(args.param), dense,
                         args.batch_size, _progress_bar("calibrating"))
    if getattr(args, "save_artifact", None):
        save_artifact(args.save_artifact, artifact, lm)
        print(f"Artifact saved to {args.save_artifact}", file=sys.stderr)
    return artifact


def cmd_calibrate(args) -> int:
    from .dense import DenseWeights

    _refuse_structured(args, "calibrate")
    check_writable(args.out, "file")  # before any work
    args.save_artifact = args.out
    lm = _load(args)
    artifact = _calibrate_or_load(args, lm, DenseWeights(lm))
    print(json.dumps({"method": artifact.method, "params": artifact.params, "artifact": args.out,
                      "calibration_seconds": round(artifact.calibration_seconds, 2)}, indent=2, default=str))
    return 0


def cmd_cut(args) -> int:
    from .dense import DenseWeights
    from .pruning import update_cut_params
    from .run_source import ArtifactCut
    from .patterns import parse_pattern

    _refuse_structured(args, "cut")
    check_run_folder(args.out, args.force)  # before any work
    lm = _load(args)
    dense = DenseWeights(lm)
    artifact = _calibrate_or_load(args, lm, dense)
    needs = update_cut_params(artifact, _params(args.param))
    if needs:
        raise PruneError(f"Changing {', '.join(needs)} needs a new calibration (python -m core calibrate ...); "
                         "a cut can only change the cut-time parameters.")
    masks = ArtifactCut(artifact, args.skip_misfit_layers).masks_at(args.sparsity, parse_pattern(args.pattern),
                                                                    _progress_bar("cutting"))
    results = {"model": lm.model_id, "method": artifact.method, "pattern": args.pattern,
               "sparsity": args.sparsity, "achieved_sparsity": round(masks.total_sparsity(), 6),
               "cut_seconds": float(masks.meta["cut_seconds"])}
    if not args.no_eval:
        dense.apply(masks)
        ppl = _eval(lm, args, "pruned")
        results["ppl"], results["eval_protocol"] = ppl.value, ppl.protocol
    return _save_run(args.out, masks, lm, results)


def _is_structured(method_name: str) -> bool:
    from .methods import get_method

    return bool(getattr(get_method(method_name), "structured", False))


def _refuse_structured(args, command: str) -> None:
    if _is_structured(args.method):
        raise PruneError(f"{args.method} is structured: its units and refitted weights are solved for one "
                         f"sparsity, so there is no artifact to `{command}` from. Use `python -m core prune "
                         f"--method {args.method} --sparsity S` (or `sweep`, which prunes once per sparsity).")


def _sweep_points(args, source) -> list:
    """(pattern, sparsity) of every row: a structured method at each sparsity (its pattern is its
    own: None), others at each sparsity of each pattern (an N:M pattern once: its sparsity is fixed)."""
    from .patterns import parse_pattern

    sparsities = [float(s) for s in args.sparsities.split(",")]
    if source.structured:
        return [(None, s) for s in sparsities]
    points = []
    for pattern_text in args.patterns.split(","):
        pattern = parse_pattern(pattern_text)
        points += [(pattern, s) for s in ([pattern.sparsity] if pattern.is_nm else sparsities)]
    return points


def _sweep_rows(args, lm, dense, source) -> list[dict]:
    """One row per point: the masks from the source, the time they took, their perplexity."""
    from .maskset import dense_note
    from .structured.units import all_block_units

    time_key = "prune_s" if source.structured else "cut_s"
    rows = [{"pattern": "dense", "target": 0.0, "achieved": 0.0, time_key: 0.0,
             "ppl": None if args.no_eval else _eval(lm, args, "dense").value}]
    noted = set()
    for pattern, sparsity in _sweep_points(args, source):
        what = "structured" if pattern is None else str(pattern)
        start = time.perf_counter()
        masks = source.masks_at(sparsity, pattern,
                                _progress_bar(f"{args.method} at {sparsity:.3f}") if source.structured else None)
        if masks.skipped_layers and what not in noted:  # achieved counts them, at 0: say so once
            print(f"note: {what}: {dense_note(masks)}", file=sys.stderr)
            noted.add(what)
        seconds = time.perf_counter() - start
        dense.apply(masks)
        label = f"structured {sparsity:.3f}" if source.structured else f"{pattern} {sparsity:.2f}"
        ppl = None if args.no_eval else _eval(lm, args, label).value
        dense.restore()
        achieved = (source.plan.structured_sparsity(all_block_units(lm)) if source.structured
                    else masks.total_sparsity())
        rows.append({"pattern": what, "target": sparsity, "achieved": achieved, time_key: seconds, "ppl": ppl})
    return rows


def cmd_sweep(args) -> int:
    from .data import calibration_set
    from .dense import DenseWeights

    if args.out:  # before any work
        check_writable(args.out, "file")
    if args.save_artifact:
        check_writable(args.save_artifact, "file", "--save-artifact")
    lm = _load(args)
    dense = DenseWeights(lm)
    if _is_structured(args.method):
        _check_memory(args, lm, "structured")
        windows, protocol = calibration_set(lm.tokenizer, args.calib_text, args.calib_windows, args.seqlen,
                                            args.seed)
        source = _run_source(args, lm, dense, windows, protocol)
    else:
        from .run_source import ArtifactCut

        source = ArtifactCut(_calibrate_or_load(args, lm, dense), args.skip_misfit_layers)
    rows = _sweep_rows(args, lm, dense, source)
    if source.structured:
        print(f"{args.method} on {lm.model_id} (structured: one prune per sparsity, calibration {protocol.source})")
        head, time_key, width, digits = "prune s", "prune_s", 9, 1
        saved = {"method": args.method, "calibration": protocol.as_dict()}
    else:
        artifact = source.artifact
        print(f"{artifact.method} on {lm.model_id}; calibration {artifact.calibration_seconds:.1f} s "
              f"(on {artifact.protocol.get('source', '?')})")
        head, time_key, width, digits = "cut s", "cut_s", 8, 3
        saved = {"method": artifact.method, "calibration": artifact.protocol,
                 "calibration_seconds": artifact.calibration_seconds}
    print(f"{'pattern':<14}{'target':>8}{'achieved':>10}{head:>{width}}{'ppl':>12}")
    for r in rows:
        ppl = "-" if r["ppl"] is None else f"{r['ppl']:.3f}"
        print(f"{r['pattern']:<14}{r['target']:>8.3f}{r['achieved']:>10.4f}{r[time_key]:>{width}.{digits}f}{ppl:>12}")
    if args.out:
        write_text_atomic(args.out, json.dumps({**saved, "rows": rows}, indent=2))
    return 0


def cmd_eval(args) -> int:
    from .dense import DenseWeights

    lm = _load(args)
    if args.masks:
        DenseWeights(lm).apply(_read_masks(args.masks, lm))
    ppl = _eval(lm, args, "masked" if args.masks else "dense")
    print(json.dumps({"model": lm.model_id, "masks": args.masks, "ppl": ppl.value, "protocol": ppl.protocol},
                     indent=2))
    return 0


def cmd_generate(args) -> int:
    """Greedy continuation of a prompt with its decode speed: a quick check of a pruned or
    sliced model (load_model reads sliced folders), eager or compiled (core.fast_decode)."""
    from .dense import DenseWeights
    from .fast_decode import check_can_compile, compiled_greedy, timed_greedy
    from .prompts import check_prompt_chars, prompt_ids

    if args.new_tokens < 2:
        raise PruneError("--new-tokens must be at least 2 (the decode rate is timed from the first new token).")
    if not args.prompt.strip():
        raise PruneError("--prompt is empty: give some text to continue.")
    check_prompt_chars(len(args.prompt), None)  # a prompt too long for any model, before the model loads
    if args.compile:
        check_can_compile(args.device)  # before the model is loaded
    lm = _load(args)
    ids = prompt_ids(lm, args.prompt, args.new_tokens)  # refused if it and the new tokens overflow the context
    if ids.shape[1] == 0:
        raise PruneError("--prompt gives no tokens: give some text to continue.")
    if args.masks:
        DenseWeights(lm).apply(_read_masks(args.masks, lm))
    decode = timed_greedy
    if args.compile:
        decode = compiled_greedy
        print("Compiling the decode step (once per prompt + new-tokens length) ...", file=sys.stderr)
        start = time.perf_counter()
        compiled_greedy(lm.model, ids, args.new_tokens)
        print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    out, decode_tok_s = decode(lm.model, ids, args.new_tokens)
    text = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(args.prompt + text)
    print(json.dumps({"model": lm.model_id, "masks": args.masks, "prompt_tokens": ids.shape[1],
                      "new_tokens": args.new_tokens, "decode_tok_s": round(decode_tok_s, 2),
                      "runtime": "compiled" if args.compile else "eager"}), file=sys.stderr)
    return 0


def _model_paths(spec: str) -> list[Path]:
    """The local files / folders a --model spec reads (an export must never replace them)."""
    import os

    from .bundled import BUNDLED

    if spec in BUNDLED:  # converted once into the model cache
        return [cache_dir()]
    path = Path(os.path.expanduser(spec))
    return [path] if path.exists() else []


def cmd_export(args) -> int:
    from .dense import DenseWeights
    from .run_source import is_structured
    from .export import export_pruned_model

    # Before any work: --out must be writable, and replaceable (missing, empty, an earlier export,
    # or --force), and must not hold the mask file or the model's own folder (never, even with --force).
    inputs = [args.masks, *_model_paths(args.model)]
    check_writable(args.out, "replace")
    check_replaceable(args.out, inputs, args.force)
    lm = _load(args)
    masks = _read_masks(args.masks, lm)
    if is_structured(masks) and not args.masked:
        from .export import export_sliced_model
        from .structured.plan import plan_from_maskset

        path = export_sliced_model(lm, plan_from_maskset(lm, masks), args.out, masks.meta, force=args.force,
                                   inputs=inputs)
        print(f"Sliced (physically smaller) model written to {path}; load it with "
              f"core.loading.load_model({str(path)!r}) or core.structured.slicing.load_sliced({str(path)!r})")
        return 0
    DenseWeights(lm).apply(masks)
    path = export_pruned_model(lm, args.out, masks.meta, force=args.force, inputs=inputs)
    print(f"Pruned model written to {path}; load it with AutoModelForCausalLM.from_pretrained({str(path)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list the pruning methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("prune", help="calibrate, prune, evaluate, save masks")
    _add_model_args(p)
    _add_method_args(p)
    _add_data_args(p)
    _add_cut_args(p)
    p.add_argument("--one-shot", action="store_true",
                   help="statistics from the dense model (as the explorer does) instead of block by block")
    p.add_argument("--eval-dense", action="store_true", help="also measure the dense model's perplexity")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("calibrate", help="calibrate once and save the artifact every later cut is made from")
    _add_model_args(p)
    _add_method_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="artifact file to write (.safetensors)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("cut", help="masks at any sparsity / pattern from a saved artifact (no calibration)")
    _add_model_args(p, from_artifact=True)
    _add_method_args(p)
    _add_data_args(p)
    p.add_argument("--artifact", required=True, help="an artifact written by `calibrate` (or --save-artifact)")
    _add_cut_args(p)
    p.set_defaults(func=cmd_cut)

    p = sub.add_parser("sweep", help="one calibration, many sparsities and patterns, one table")
    _add_model_args(p, from_artifact=True)
    _add_method_args(p)
    _add_data_args(p)
    p.add_argument("--artifact", default=None, help="cut from this saved artifact instead of calibrating")
    p.add_argument("--save-artifact", default=None, help="save the calibration artifact here for later cuts")
    p.add_argument("--sparsities", default="0.3,0.5,0.6,0.7", help="comma-separated unstructured sparsities")
    p.add_argument("--patterns", default="unstructured", help="comma-separated: unstructured,2:4,4:8")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="perplexity of a model, optionally with a mask file applied")
    _add_model_args(p)
    _add_data_args(p, calibration=False)
    p.add_argument("--masks", default=None, help="a mask file written by prune / the explorer")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy continuation of a prompt and the decode tokens/s")
    _add_model_args(p)
    p.add_argument("--masks", default=None, help="a mask file written by prune / the explorer")
    p.add_argument("--prompt", default="The history of the city", help="text to continue")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--compile", action="store_true",
                   help="static KV cache + torch.compile'd decode steps in a minimal greedy loop (compiles first, "
                        "then times a second run)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write the pruned model as a transformers folder")
    _add_model_args(p)
    p.add_argument("--masks", required=True, help="a mask file written by prune / the explorer")
    p.add_argument("--out", required=True,
                   help="output folder, written atomically. An existing one is replaced only if it is empty or an "
                        "earlier export (it has a PRUNING.json); never the folder holding --masks or the model")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out folder that is not an earlier export (the old folder is "
                        "removed only once the new one is complete)")
    p.add_argument("--masked", action="store_true",
                   help="structured masks: write the full-size model with zeroed units instead of slicing")
    p.set_defaults(func=cmd_export)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP (kill, a service manager, a closed terminal) taken as Ctrl-C is: raised in the
    main thread, it unwinds every with-block and finally, and the process then exits normally, so
    atexit removes the offload and spill folders (the default action would kill it on the spot and
    leave them behind). Exit code 128 + the signal's number (143 for SIGTERM), as a shell reports."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _catch_termination() -> dict:
    """Install the handler for SIGTERM and SIGHUP (main thread only: Python allows no other);
    returns the previous handlers, for main to put back (main also runs in-process in tests)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, _raise_terminated)
    return previous


def _disk_full_line(exc: BaseException) -> str:
    """The one line for a full disk that no writer reported itself (DiskFullError says it better)."""
    from .outputs import free_bytes, human_bytes

    where = None
    while exc is not None and where is None:
        where = getattr(exc, "filename", None)
        exc = exc.__cause__ or exc.__context__
    if where is None:
        return "No space left on device. Free some space on the disks this command writes to and run it again."
    free = free_bytes(Path(where).parent)
    has = f" ({human_bytes(free)} free there)" if free is not None else ""
    return f"No space left on device writing {where}{has}. Free some space there or write to another disk."


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input, or a disk that filled (one line on stderr, partial files
    removed); 130 Ctrl-C, 143 SIGTERM (129 SIGHUP): cancelled, temporary folders removed."""
    import signal

    from .outputs import is_no_space

    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
    except PruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    previous = _catch_termination()
    try:
        return args.func(args)
    except PruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # parameter schema violations
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("Cancelled; nothing was written.", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Terminated) else 130
    except Exception as exc:  # a write no DiskFullError covers (a library's own files): still one line
        if not is_no_space(exc):
            raise
        print(f"error: {_disk_full_line(exc)}", file=sys.stderr)
        return 2
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
