"""Orchestration: calibrate once, cut many.

- `calibrate` runs the engine once over the dense model and keeps, per prunable matrix, what the
  method needs to cut later (ranks, and the scores or, where they are cheap to recompute, the
  small input statistics they come from; for weight-updating methods the input statistics).
- `cut` turns an artifact into masks at any sparsity / pattern in well under a second for
  score methods (ranks are computed once, then every cut is one comparison).
- `prune_sequential` is the papers' own procedure: block by block, later blocks calibrated on
  the outputs of pruned earlier ones. Its artifact can be re-cut too (statistics then reflect
  the sparsity it was run at, recorded in the protocol).
"""
from __future__ import annotations

import json
import time
from typing import Callable

import torch

from .artifacts import Artifact, block_names, new_store
from .calibrate import BlockContext, release_free_memory, run_layerwise
from .progress import ProgressFn, staged
from .cutting import LazyMasks, cut_mask, pruned_count
from .data import check_seqlen
from .dense import DenseWeights
from .loaded_model import LoadedModel
from .maskset import MaskSet
from .packing import PackedMasks, pack_mask
from .patterns import Pattern, check_nm_fits, check_sparsity
from .methods import Method, get_method
from .offload import onloaded
from .errors import PatternError, Cancelled

__all__ = ["Artifact", "calibrate", "cut", "matrix_sparsities", "prune_sequential",
           "update_cut_params"]


def calibrate(lm: LoadedModel, method: str | Method, windows: torch.Tensor, protocol: dict | None = None,
              params: dict | None = None, dense: DenseWeights | None = None, batch_size: int = 8,
              progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> Artifact:
    """One pass over the dense model: the artifact every later cut is made from."""
    if windows is not None:
        check_seqlen(lm, windows.shape[-1])  # before any forward pass
    method = get_method(method) if isinstance(method, str) else method
    params = method.resolve_params(params)
    dense = dense or DenseWeights(lm)
    artifact = Artifact(method.name, params, {**(protocol or {}), "mode": "one-shot (dense statistics)"},
                        lm.fingerprint, dense, block_of=block_names(lm), store=new_store(lm, method, params))
    start = time.perf_counter()

    def on_block(ctx: BlockContext) -> bool:
        for name in ctx.linears:
            stats = ctx.stats.get(name)
            if method.updates_weights:
                artifact.set_stats(name, stats)
            else:
                kept = method.matrix_artifacts(dense.weight(name), stats, params)
                artifact.set_scores(name, kept.pop("score"), method.cut_scope(params), stats)
                artifact.set_extras(name, kept)
        return False

    own = method.calibrate_model(lm, windows, params, dense, progress, should_stop)
    if own is not None:  # a whole-model calibration (UniPruning's AdamW variant)
        for name, kept in own.items():
            artifact.set_scores(name, kept.pop("score"), method.cut_scope(params))
            artifact.set_extras(name, kept)
    elif method.stats:
        run_layerwise(lm, windows, method.stats, on_block, batch_size, progress, should_stop)
    else:  # magnitude: no data needed
        for name in lm.prunable():
            artifact.set_scores(name, method.score(dense.weight(name), None, params), method.cut_scope(params))
            # the matrix's scoring buffers, freed between the ranks kept: without this the heap
            # grew by ~0.27 GB of free-but-resident holes over smollm2-135m's 210 matrices
            release_free_memory()
        if progress:
            progress(1, 1, "scored")
    artifact.record_calibration_time(time.perf_counter() - start)
    return artifact


def _validate(artifact_shapes: dict, method: Method, sparsity: float, pattern: Pattern,
              skip_misfits: bool) -> tuple[float, list[str]]:
    if pattern.is_nm and "nm" not in method.patterns:
        raise PatternError(f"{method.name} supports {', '.join(method.patterns)}, not N:M.")
    sparsity = pattern.sparsity if pattern.is_nm else check_sparsity(sparsity)
    skipped = check_nm_fits(artifact_shapes, pattern, skip_misfits)
    return sparsity, skipped


def matrix_sparsities(artifact: Artifact, sparsity: float) -> dict[str, float]:
    """Target sparsity of every matrix (uniform, or per block where the method allocates)."""
    method = artifact.method_obj
    groups = artifact.blocks()
    if not method.allocates:
        per_block = [sparsity] * len(groups)
    else:
        per_block = method.block_sparsities(artifact.block_profile(), sparsity, artifact.params)
    return {name: per_block[artifact.block_of[name]] for name in artifact.block_of}


def cut(artifact: Artifact, sparsity: float, pattern: Pattern = Pattern(), skip_misfits: bool = False,
        progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None) -> MaskSet:
    """Masks (and, for weight-updating methods, the re-solved weights) at a new sparsity."""
    method = artifact.method_obj
    shapes = artifact.dense.shapes()
    sparsity, skipped = _validate(shapes, method, sparsity, pattern, skip_misfits)
    start = time.perf_counter()
    names = [n for n in artifact.block_of if n not in skipped]
    if method.updates_weights:
        (masks, weights), pruned = _cut_solved(artifact, sparsity, pattern, names, progress, should_stop), None
    else:
        (masks, pruned), weights = _cut_scored(artifact, sparsity, pattern, names, skipped), {}
    meta = {"method": method.name, "params": dict(artifact.params), "pattern": str(pattern),
            "target_sparsity": f"{sparsity:.6f}", "calibration": artifact.protocol,
            "skipped_layers": skipped, "cut_seconds": f"{time.perf_counter() - start:.4f}"}
    return MaskSet(masks=masks, weights=weights, meta=meta, pruned=pruned,
                   dense_layers={name: shapes[name] for name in skipped})


def _nm_key(artifact: Artifact, pattern: Pattern, skipped: list[str]) -> tuple:
    return (str(pattern), json.dumps(artifact.params, sort_keys=True, default=str), tuple(skipped))


def _targets(artifact: Artifact, sparsity: float, pattern: Pattern, names: list[str]) -> dict[str, float]:
    if pattern.is_nm:
        return {n: sparsity for n in names}
    return matrix_sparsities(artifact, sparsity)


def _cut_scored(artifact: Artifact, sparsity: float, pattern: Pattern, names: list[str], skipped: list[str]):
    """Score methods: (masks, pruned counts or None), from the method's own cut where it has one,
    else the generic one. N:M masks do not depend on the sparsity: the artifact keeps what cuts at
    the same N:M settings made, so moving the slider at N:M costs nothing after the first cut."""
    record = artifact.nm_masks(_nm_key(artifact, pattern, skipped)) if pattern.is_nm else None
    own = record.own if record is not None else None
    if own is None and not (record is not None and record.made):
        own = artifact.method_obj.cut_masks(artifact, sparsity, pattern, names)  # e.g. one global budget
        if own is not None and record is not None:
            record.own = own
    if own is not None:
        return own, own.known_pruned if isinstance(own, LazyMasks) else None
    return _cut_lazy(artifact, sparsity, pattern, names, record.made if record is not None else {})


def _cut_lazy(artifact: Artifact, sparsity: float, pattern: Pattern, names: list[str], made: dict):
    """The generic cut: LazyMasks whose masks are one comparison of ranks (or N:M top-k) each, made
    when a reader first needs them (the explorer draws one matrix per slider move) into `made`;
    the pruned counts are known without making any."""
    method = artifact.method_obj
    scope = method.cut_scope(artifact.params)
    shapes = artifact.dense.shapes()
    targets = _targets(artifact, sparsity, pattern, names)
    pruned = {}
    for name in names:
        d_out, d_in = shapes[name]
        # known without counting: k per row (or per matrix), or M - N per group
        pruned[name] = (d_out * d_in // pattern.m * (pattern.m - pattern.n) if pattern.is_nm else
                        pruned_count(targets[name], d_in) * d_out if scope == "row" else
                        pruned_count(targets[name], d_out * d_in))

    def make(name: str) -> torch.Tensor:
        ranks = None if pattern.is_nm else artifact.ranks(name, scope)
        scores = artifact.score(name) if ranks is None else None  # ranks alone cut (scores may be recomputed)
        return cut_mask(scores, targets[name], pattern, scope, ranks)

    return LazyMasks({name: shapes[name] for name in names}, make, made), pruned


def _cut_solved(artifact: Artifact, sparsity: float, pattern: Pattern, names: list[str], progress, should_stop):
    """Weight-updating methods: each matrix re-solved from its statistics, solves kept in the
    artifact as they finish so a cancelled cut is resumed by the next at the same settings."""
    method = artifact.method_obj
    targets = _targets(artifact, sparsity, pattern, names)
    solved = artifact.solved((f"{sparsity:.6f}", str(pattern),
                              json.dumps(artifact.params, sort_keys=True, default=str)))
    masks, weights = {}, {}
    for i, name in enumerate(names):
        if name not in solved:
            if should_stop is not None and should_stop():
                done = sum(n in solved for n in names)
                exc = Cancelled(f"Cancelled while re-solving, after {done} of {len(names)} matrices; "
                                "those are kept for the next cut at the same settings.")
                exc.solved, exc.total = done, len(names)
                raise exc
            solved[name] = method.solve(artifact.dense.weight(name), artifact.stats[name], targets[name],
                                        pattern, artifact.params)
        weights[name], masks[name] = solved[name]
        if progress:
            progress(i + 1, len(names), name)
    return masks, weights


def update_cut_params(artifact: Artifact, params: dict) -> list[str]:
    """Apply new values of parameters that only change the cut (e.g. UniPruning's controller,
    OWL's M and lambda) to an artifact. Returns the names of given parameters that differ but
    need a new calibration (those are not applied)."""
    method = artifact.method_obj
    resolved = method.resolve_params({**artifact.params, **params})
    needs = [p.name for p in method.params
             if p.recalibrate and p.name in params and resolved[p.name] != artifact.params.get(p.name)]
    changed = {p.name: resolved[p.name] for p in method.params
               if not p.recalibrate and resolved[p.name] != artifact.params.get(p.name)}
    if changed:
        artifact.update_cut_params(changed)
    return needs


def prune_sequential(lm: LoadedModel, method: str | Method, windows: torch.Tensor, sparsity: float,
                     pattern: Pattern = Pattern(), params: dict | None = None, protocol: dict | None = None,
                     dense: DenseWeights | None = None, skip_misfits: bool = False, batch_size: int = 8,
                     progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
                     keep_artifact: bool = True) -> tuple[MaskSet, Artifact | None]:
    """Prune block by block as the papers do; the model is left pruned. On any error or
    cancellation the dense weights are restored.

    With keep_artifact=False nothing per weight is kept but the masks (packed, one bit per weight)
    and, for weight-updating methods, no updated weight either: the mask set's `weights` then read
    the pruned model's own (valid while it stays pruned: save or export it before restoring).
    That is what lets a model that barely fits in memory be pruned."""
    if windows is not None:
        check_seqlen(lm, windows.shape[-1])  # before any forward pass
    method = get_method(method) if isinstance(method, str) else method
    params = method.resolve_params(params)
    dense = dense or DenseWeights(lm)
    sparsity, skipped = _validate(dense.shapes(), method, sparsity, pattern, skip_misfits)
    if not method.sequential:  # a global budget: every matrix's scores first, then one cut
        artifact = calibrate(lm, method, windows, protocol, params, dense, batch_size, progress, should_stop)
        masks = cut(artifact, sparsity, pattern, skip_misfits)
        dense.apply(masks)
        return masks, artifact
    block_of = block_names(lm)
    per_block = None
    if method.needs_dense_prepass and not pattern.is_nm:
        pre = calibrate(lm, method, windows, protocol, params, dense, batch_size,
                        staged(progress, "dense pass for the allocation"), should_stop)
        per_block = matrix_sparsities(pre, sparsity)
        del pre
    mode = f"sequential at {pattern if pattern.is_nm else sparsity}"
    artifact = Artifact(method.name, params, {**(protocol or {}), "mode": mode}, lm.fingerprint, dense,
                        block_of=block_of, store=new_store(lm, method, params)) if keep_artifact else None
    scope = method.cut_scope(params)
    packed, mask_shapes = {}, {}  # one bit per weight: an 8B model's masks in 1 GB, not 8
    weights = {} if keep_artifact or not method.updates_weights else dense.current_weights()

    def on_block(ctx: BlockContext) -> bool:
        for name, module in ctx.linears.items():
            if name in skipped:
                continue
            target = per_block[name] if per_block else sparsity
            view = lm.family.weight_view(module)
            stats = ctx.stats.get(name)
            if method.updates_weights:
                new, mask = method.solve(view, stats, target, pattern, params)
                dense.write(name, new)
                if artifact is not None:
                    artifact.set_stats(name, stats)
                    weights[name] = new
                else:
                    weights.track(name)  # read back from the model when saved
            else:
                scores = method.score(view, stats, params)
                if artifact is not None:
                    artifact.set_scores(name, scores, scope)
                ranks = artifact.ranks(name, scope) if artifact is not None and not pattern.is_nm else None
                mask = cut_mask(scores, target, pattern, scope, ranks)
                dense.write(name, view * mask)
            packed[name], mask_shapes[name] = pack_mask(mask), tuple(mask.shape)
        return True

    start = time.perf_counter()
    try:
        if method.stats:
            run_layerwise(lm, windows, method.stats, on_block, batch_size, staged(progress, "pruning"), should_stop)
        else:  # data-free (magnitude): no forward pass can change the masks
            _prune_data_free(lm, block_of, on_block, progress, should_stop)
    except BaseException:
        dense.restore()
        raise
    if artifact is not None:
        artifact.record_calibration_time(time.perf_counter() - start)
    meta = {"method": method.name, "params": params, "pattern": str(pattern),
            "target_sparsity": f"{sparsity:.6f}", "calibration": {**(protocol or {}), "mode": mode},
            "skipped_layers": skipped}
    shapes = dense.shapes()
    return MaskSet(masks=PackedMasks(packed=packed, shapes=mask_shapes), weights=weights, meta=meta,
                   dense_layers={name: shapes[name] for name in skipped}), artifact


def _prune_data_free(lm: LoadedModel, block_of: dict[str, int], on_block, progress, should_stop=None) -> None:
    blocks = lm.blocks
    prunable = lm.prunable()
    for index, block in enumerate(blocks):
        if should_stop is not None and should_stop():  # same contract as run_layerwise
            raise Cancelled(f"Cancelled before block {index} of {len(blocks)}.")
        linears = {name: module for name, module in prunable.items() if block_of[name] == index}
        with onloaded(block):
            on_block(BlockContext(index, block, linears, {}, None))
        if progress:
            progress(index + 1, len(blocks), f"block {index + 1}/{len(blocks)}")


