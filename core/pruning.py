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
from dataclasses import dataclass, field
from typing import Callable

import torch

from .calibrate import BlockContext, LayerStats, ProgressFn, release_free_memory, run_layerwise
from .data import check_seqlen
from .masks import LazyMasks, MaskSet, Pattern, ascending_ranks, check_nm_fits, check_sparsity, cut_mask, pruned_count
from .dense import DenseWeights
from .methods import Method, get_method
from .models import LoadedModel


@dataclass
class Artifact:
    """Everything a cut needs, per prunable matrix, from one calibration."""

    method: str
    params: dict
    protocol: dict
    fingerprint: str
    dense: DenseWeights
    stats: dict[str, LayerStats] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    block_of: dict[str, int] = field(default_factory=dict)
    calibration_seconds: float = 0.0
    _ranks: dict = field(default_factory=dict, repr=False)
    _profile: list | None = field(default=None, repr=False)
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # method-specific, per matrix
    _sorted: dict = field(default_factory=dict, repr=False)
    # N:M masks do not depend on the sparsity: the last pattern's masks are kept, so moving the
    # slider (or switching back) at N:M costs nothing after the first cut (~3 s of top-k).
    _nm_cache: tuple | None = field(default=None, repr=False)
    # Weight-updating methods: (settings key, {matrix: (weight, mask)}) of the latest cut's
    # solves, kept as they finish. A cut cancelled half way (the explorer's Cancel) leaves what it
    # solved here, and the next cut at the same settings solves only the rest.
    _solve_cache: tuple | None = field(default=None, repr=False)

    @property
    def method_obj(self) -> Method:
        return get_method(self.method)

    @property
    def recomputes_scores(self) -> bool:
        """Whether this artifact keeps small per-matrix statistics instead of scores.

        For score methods whose score is a cheap function of the dense weight and vector input
        statistics (magnitude, Wanda, RIA, OWL) the artifact keeps those statistics (a few KB
        per matrix) and the ranks, not 4 bytes of scores per weight (0.43 GB for a 135M
        model), and `score(name)` recomputes one matrix's scores when something asks for them
        (the explorer's heatmap, an N:M cut: milliseconds per matrix). Unstructured cuts never
        need scores: they compare ranks. Scores that come out of a method's own optimisation
        (UniPruning's Gamma) or a solve are stored. A method can decide for itself with a
        class attribute `recompute_scores = True / False`."""
        return recomputes_scores(self.method_obj)

    def _can_recompute(self, name: str) -> bool:
        return self.recomputes_scores and (name in self.stats or not self.method_obj.stats)

    def score(self, name: str) -> torch.Tensor:
        """Scores of one matrix: stored ones, else computed now from the dense weight and the
        statistics. Recomputable scores (see `recomputes_scores`) are not kept, so reading
        every matrix's scores one after another never holds more than one matrix's; others
        (e.g. SparseGPT's drawing saliency, a Cholesky per matrix) are kept once computed."""
        stored = self.scores.get(name)
        if stored is not None:
            return stored
        scores = self.method_obj.score(self.dense.dense[name], self.stats.get(name), self.params)
        if not self._can_recompute(name):
            self.scores[name] = scores
        return scores

    def set_scores(self, name: str, scores: torch.Tensor, scope: str, stats: LayerStats | None = None) -> None:
        """Rank a matrix's scores now, during calibration, so that every later unstructured cut
        is one comparison (~0.1 s for 135M weights instead of ~5 s of sorting). The scores
        themselves are kept only when they cannot be recomputed from `stats` (the statistics
        they were computed from, kept instead) and the dense weight."""
        if stats is not None:
            self.stats[name] = stats
        if not self._can_recompute(name):
            self.scores[name] = scores
        if scope == "sorted":  # the method cuts by counts over sorted scores, not by ranks
            self._sorted[name] = scores.reshape(-1).sort().values
        else:
            self._ranks[(name, scope)] = ascending_ranks(scores, scope)
        for extra in self.method_obj.also_rank_by:
            self._ranks[(name, extra)] = ascending_ranks(scores, extra)

    def sorted_scores(self, name: str) -> torch.Tensor:
        """A matrix's scores sorted ascending, flat (for cuts by count, e.g. a global budget)."""
        if name not in self._sorted:
            self._sorted[name] = self.score(name).reshape(-1).sort().values
        return self._sorted[name]

    def ranks(self, name: str, scope: str) -> torch.Tensor:
        key = (name, scope)
        if key not in self._ranks:
            self._ranks[key] = ascending_ranks(self.score(name), scope)
        return self._ranks[key]

    def block_profile(self) -> list[float]:
        """The method's per-block allocation inputs (e.g. OWL outlier ratios), computed once."""
        if self._profile is None:
            method = self.method_obj
            if self.recomputes_scores:  # one block's scores at a time: a profile entry is its block's
                self._profile = [method.block_profile([[self.score(n) for n in names]], self.params)[0]
                                 for names in self.blocks()]
            else:
                groups = [[self.score(n) for n in names] for names in self.blocks()]
                self._profile = method.block_profile(groups, self.params)
        return self._profile

    def nbytes(self) -> int:
        """Memory held by the artifact's own tensors (scores, sorted scores, ranks, per-matrix
        extras, statistics), not counting the dense weights it shares with the model's copy."""
        def size(x) -> int:
            if isinstance(x, torch.Tensor):
                return x.numel() * x.element_size()
            if isinstance(x, dict):
                return sum(size(v) for v in x.values())
            if isinstance(x, (list, tuple)):
                return sum(size(v) for v in x)
            if isinstance(x, LayerStats):
                return sum(size(v) for v in vars(x).values())
            return 0
        return sum(size(d) for d in (self.scores, self._sorted, self._ranks, self.extras, self.stats))

    def blocks(self) -> list[list[str]]:
        n = max(self.block_of.values()) + 1
        out = [[] for _ in range(n)]
        for name, b in self.block_of.items():
            out[b].append(name)
        return out


def recomputes_scores(method: Method) -> bool:
    """Whether an artifact of `method` recomputes scores from statistics rather than storing
    them (see Artifact.recomputes_scores): the method's own `recompute_scores` if it sets one,
    else True for a plain score method (no weight update, no own calibration or per-matrix
    artifacts) whose statistics are vectors (sum_x2, sum_x; not X^T X or per-window ones)."""
    declared = getattr(method, "recompute_scores", None)
    if declared is not None:
        return bool(declared)
    cls = type(method)
    return (not method.updates_weights and not method.structured
            and cls.score is not Method.score
            and cls.matrix_artifacts is Method.matrix_artifacts
            and cls.calibrate_model is Method.calibrate_model
            and frozenset(method.stats) <= {"sum_x2", "sum_x"})


def _block_names(lm: LoadedModel) -> dict[str, int]:
    prefix = lm.family.blocks_path + "."
    return {name: int(name[len(prefix):].split(".", 1)[0]) for name in lm.prunable()}


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
                        lm.fingerprint, dense, block_of=_block_names(lm))
    start = time.perf_counter()

    def on_block(ctx: BlockContext) -> bool:
        for name in ctx.linears:
            stats = ctx.stats.get(name)
            if method.updates_weights:
                artifact.stats[name] = stats
            else:
                kept = method.matrix_artifacts(dense.dense[name], stats, params)
                artifact.set_scores(name, kept.pop("score"), _scope(method, params), stats)
                if kept:
                    artifact.extras[name] = kept
        return False

    own = method.calibrate_model(lm, windows, params, dense, progress, should_stop)
    if own is not None:  # a whole-model calibration (UniPruning's AdamW variant)
        for name, kept in own.items():
            artifact.set_scores(name, kept.pop("score"), _scope(method, params))
            if kept:
                artifact.extras[name] = kept
    elif method.stats:
        run_layerwise(lm, windows, method.stats, on_block, batch_size, progress, should_stop)
    else:  # magnitude: no data needed
        for name in lm.prunable():
            artifact.set_scores(name, method.score(dense.dense[name], None, params), _scope(method, params))
            # the matrix's scoring buffers, freed between the ranks kept: without this the heap
            # grew by ~0.27 GB of free-but-resident holes over smollm2-135m's 210 matrices
            release_free_memory()
        if progress:
            progress(1, 1, "scored")
    artifact.calibration_seconds = time.perf_counter() - start
    return artifact


def _validate(artifact_shapes: dict, method: Method, sparsity: float, pattern: Pattern,
              skip_misfits: bool) -> tuple[float, list[str]]:
    if pattern.is_nm and "nm" not in method.patterns:
        from .errors import PatternError
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
    masks, weights, pruned = {}, {}, {}
    names = [n for n in artifact.block_of if n not in skipped]
    nm_key = (str(pattern), json.dumps(artifact.params, sort_keys=True, default=str), tuple(skipped))
    cached = (artifact._nm_cache[1] if pattern.is_nm and not method.updates_weights and artifact._nm_cache
              and artifact._nm_cache[0] == nm_key else None)  # ("made", masks) or ("lazy", masks made so far)
    own = None
    if cached is not None and cached[0] == "made":
        masks, names = dict(cached[1]), []
    elif cached is None:
        own = method.cut_masks(artifact, sparsity, pattern, names)
    if own is not None:
        masks, names = own, []
    targets = matrix_sparsities(artifact, sparsity) if names and not pattern.is_nm else {n: sparsity for n in names}
    scope = _scope(method, artifact.params)
    solved = None
    if method.updates_weights and names:
        solve_key = (f"{sparsity:.6f}", str(pattern), json.dumps(artifact.params, sort_keys=True, default=str))
        if artifact._solve_cache is None or artifact._solve_cache[0] != solve_key:
            artifact._solve_cache = (solve_key, {})  # other settings: earlier solves cannot be reused
        solved = artifact._solve_cache[1]
    lazy = []  # score methods: masks made on first read (LazyMasks); their counts are known now
    for i, name in enumerate(names):
        if method.updates_weights:
            if name not in solved:
                if should_stop is not None and should_stop():
                    from .errors import Cancelled
                    done = sum(n in solved for n in names)
                    exc = Cancelled(f"Cancelled while re-solving, after {done} of {len(names)} matrices; "
                                    "those are kept for the next cut at the same settings.")
                    exc.solved, exc.total = done, len(names)
                    raise exc
                solved[name] = method.solve(artifact.dense.dense[name], artifact.stats[name],
                                            targets[name], pattern, artifact.params)
            weights[name], masks[name] = solved[name]
            if progress:
                progress(i + 1, len(names), name)
        else:
            lazy.append(name)
            d_out, d_in = shapes[name]
            # known without counting: k per row (or per matrix), or M - N per group
            pruned[name] = (d_out * d_in // pattern.m * (pattern.m - pattern.n) if pattern.is_nm else
                            pruned_count(targets[name], d_in) * d_out if scope == "row" else
                            pruned_count(targets[name], d_out * d_in))
    if lazy:
        # One comparison of ranks per matrix (~100 ms for all 135M weights), or N:M top-k, made
        # when a reader first needs the mask: the explorer draws one matrix per slider move.
        def make(name: str) -> torch.Tensor:
            ranks = None if pattern.is_nm else artifact.ranks(name, scope)
            scores = artifact.score(name) if ranks is None else None  # ranks alone cut (scores may be recomputed)
            return cut_mask(scores, targets[name], pattern, scope, ranks)

        # N:M masks do not depend on the sparsity: share what earlier cuts at this pattern made
        done = cached[1] if cached is not None else {}
        masks = LazyMasks({name: shapes[name] for name in lazy}, make, done)
    if pattern.is_nm and not method.updates_weights:
        artifact._nm_cache = (nm_key, ("lazy", done) if lazy else ("made", dict(masks)))
    meta = {"method": method.name, "params": dict(artifact.params), "pattern": str(pattern),
            "target_sparsity": f"{sparsity:.6f}", "calibration": artifact.protocol,
            "skipped_layers": skipped, "cut_seconds": f"{time.perf_counter() - start:.4f}"}
    return MaskSet(masks=masks, weights=weights, meta=meta, pruned=pruned if set(pruned) == set(masks) else None,
                   dense_layers={name: shapes[name] for name in skipped})


def update_cut_params(artifact: Artifact, params: dict) -> list[str]:
    """Apply new values of parameters that only change the cut (e.g. UniPruning's controller,
    OWL's M and lambda) to an artifact. Returns the names of given parameters that differ but
    need a new calibration (those are not applied)."""
    method = artifact.method_obj
    resolved = method.resolve_params({**artifact.params, **params})
    needs = [p.name for p in method.params
             if p.recalibrate and p.name in params and resolved[p.name] != artifact.params.get(p.name)]
    changed = False
    for p in method.params:
        if not p.recalibrate and resolved[p.name] != artifact.params.get(p.name):
            artifact.params[p.name] = resolved[p.name]
            changed = True
    if changed:
        artifact._profile = None  # allocation inputs may depend on the changed parameters
    return needs


def _scope(method: Method, params: dict) -> str:
    return params.get("scope", method.scope)


def prune_sequential(lm: LoadedModel, method: str | Method, windows: torch.Tensor, sparsity: float,
                     pattern: Pattern = Pattern(), params: dict | None = None, protocol: dict | None = None,
                     dense: DenseWeights | None = None, skip_misfits: bool = False, batch_size: int = 8,
                     progress: ProgressFn | None = None,
                     should_stop: Callable[[], bool] | None = None) -> tuple[MaskSet, Artifact]:
    """Prune block by block as the papers do; the model is left pruned. On any error or
    cancellation the dense weights are restored."""
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
    block_of = _block_names(lm)
    per_block = None
    if method.needs_dense_prepass and not pattern.is_nm:
        pre = calibrate(lm, method, windows, protocol, params, dense, batch_size,
                        _stage(progress, "dense pass for the allocation"), should_stop)
        per_block = matrix_sparsities(pre, sparsity)
        del pre
    artifact = Artifact(method.name, params, {**(protocol or {}), "mode": f"sequential at {pattern if pattern.is_nm else sparsity}"},
                        lm.fingerprint, dense, block_of=block_of)
    masks, weights = {}, {}

    def on_block(ctx: BlockContext) -> bool:
        for name, module in ctx.linears.items():
            if name in skipped:
                continue
            target = per_block[name] if per_block else sparsity
            view = lm.family.weight_view(module)
            stats = ctx.stats.get(name)
            if method.updates_weights:
                artifact.stats[name] = stats
                weights[name], masks[name] = method.solve(view, stats, target, pattern, params)
                view.copy_(weights[name])
            else:
                scores = method.score(view, stats, params)
                artifact.set_scores(name, scores, _scope(method, params))
                masks[name] = cut_mask(scores, target, pattern, _scope(method, params),
                                       None if pattern.is_nm else artifact.ranks(name, _scope(method, params)))
                view.mul_(masks[name])
        return True

    start = time.perf_counter()
    try:
        if method.stats:
            run_layerwise(lm, windows, method.stats, on_block, batch_size, _stage(progress, "pruning"), should_stop)
        else:  # data-free (magnitude): no forward pass can change the masks
            _prune_data_free(lm, block_of, on_block, progress, should_stop)
    except BaseException:
        dense.restore()
        raise
    artifact.calibration_seconds = time.perf_counter() - start
    meta = {"method": method.name, "params": params, "pattern": str(pattern),
            "target_sparsity": f"{sparsity:.6f}", "calibration": artifact.protocol, "skipped_layers": skipped}
    shapes = dense.shapes()
    return MaskSet(masks=masks, weights=weights, meta=meta,
                   dense_layers={name: shapes[name] for name in skipped}), artifact


def _prune_data_free(lm: LoadedModel, block_of: dict[str, int], on_block, progress, should_stop=None) -> None:
    blocks = lm.blocks
    prunable = lm.prunable()
    for index, block in enumerate(blocks):
        if should_stop is not None and should_stop():  # same contract as run_layerwise
            from .errors import Cancelled
            raise Cancelled(f"Cancelled before block {index} of {len(blocks)}.")
        linears = {name: module for name, module in prunable.items() if block_of[name] == index}
        on_block(BlockContext(index, block, linears, {}, None))
        if progress:
            progress(index + 1, len(blocks), f"block {index + 1}/{len(blocks)}")


def _stage(progress: ProgressFn | None, label: str) -> ProgressFn | None:
    if progress is None:
        return None
    return lambda done, total, what: progress(done, total, f"{label}: {what}")
