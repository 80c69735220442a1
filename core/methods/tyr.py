"""Týr-the-Pruner (Li et al., 2025): a supernet of locally pruned sublayers at several sparsity
levels, then an evolutionary search of the sparsity distribution under an exact budget.

The tensor maths (group OBS, levels, mutation, KL fitness) is in `core.structured.tyr`; this
file walks the model. A sublayer is an output projection (o / down and their counterparts):
a block's function only depends on their kept input columns, so a candidate is assembled by
copying each sublayer's level weight into the model, and q/k/v and up/gate stay dense until
the pipeline applies the final plan's masks (same function).
"""
from __future__ import annotations

import math
import random

import torch

from ..calibrate import BlockContext, run_layerwise
from ..errors import Cancelled
from ..structured import tyr
from ..structured.plan import StructuredPlan
from ..structured.units import all_block_units, decoder_params
from . import register
from .base import Param, StructuredMethod

STAGE_CHOICES = ("128,512,2048", "256,1024,4096", "512,2048,8192", "1024,4096,16384", "1024,8192,32768")
EVAL_SEQLEN = 512  # fitness chunks: at most this many tokens (and the first stage's), cut from the windows
EVAL_BATCH_TOKENS = 2048  # tokens per fitness forward


def _stop(should_stop, where: str) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled(f"Týr cancelled {where}.")


class _Fitness:
    """KL(dense || candidate) on fixed chunks of the calibration windows, with results cached
    per state and extended stage by stage (stages are prefixes of one chunk list)."""

    def __init__(self, lm, windows: torch.Tensor, stage_tokens: list[int], topk: int, should_stop):
        self.lm, self.should_stop = lm, should_stop
        n, seqlen = windows.shape
        length = min(seqlen, EVAL_SEQLEN, min(stage_tokens))
        per_window = seqlen // length
        chunks = windows[:, :per_window * length].reshape(n, per_window, length).transpose(0, 1).reshape(-1, length)
        need = [min(max(1, math.ceil(t / length)), chunks.shape[0]) for t in stage_tokens]
        self.stage_chunks = sorted(set(need))
        self.chunks = chunks[:self.stage_chunks[-1]].to(lm.device)
        self.length = length
        self.batch = max(1, EVAL_BATCH_TOKENS // length)
        idx, logp = [], []
        for start in range(0, self.chunks.shape[0], self.batch):  # dense reference (model is dense now)
            _stop(should_stop, "while computing the dense reference")
            i, lp = tyr.topk_reference(self._logits(start, start + self.batch), topk)
            idx.append(i)
            logp.append(lp)
        self.idx, self.logp = torch.cat(idx), torch.cat(logp)
        self.cache: dict[tuple, list] = {}  # state -> [kl_sum, chunks_done]

    @property
    def tokens(self) -> list[int]:
        return [c * self.length for c in self.stage_chunks]

    @torch.no_grad()
    def _logits(self, start: int, stop: int) -> torch.Tensor:
        return self.lm.model(self.chunks[start:stop], use_cache=False).logits

    def reset(self) -> None:
        self.cache.clear()  # new supernet weights: the same state is a different model

    def evaluate(self, state: tuple, n_chunks: int, load) -> float:
        """Mean per-token KL of `state` over the first `n_chunks` chunks (only new chunks run)."""
        entry = self.cache.setdefault(state, [0.0, 0])
        if entry[1] < n_chunks:
            load(state)
            while entry[1] < n_chunks:
                _stop(self.should_stop, "during the search")
                start, stop = entry[1], min(entry[1] + self.batch, n_chunks)
                kl = tyr.kl_to_reference(self._logits(start, stop), self.idx[start:stop], self.logp[start:stop])
                entry[0] += float(kl.double().sum())
                entry[1] = stop
        return entry[0] / (n_chunks * self.length)


class _Supernet:
    """Every sublayer's levels, and the model's out-projection views to load them into."""

    def __init__(self, views: list[torch.Tensor]):
        self.views = views
        self.levels: list[tyr.SublayerLevels | None] = [None] * len(views)
        self.loaded: list[int | None] = [None] * len(views)

    @property
    def counts(self) -> list[list[int]]:
        return [lv.counts for lv in self.levels]

    @torch.no_grad()
    def load(self, state) -> None:
        for s, level in enumerate(state):
            if self.loaded[s] != level:
                self.views[s].copy_(self.levels[s].weights[level])
                self.loaded[s] = level

    def forget(self) -> None:
        self.loaded = [None] * len(self.views)


@register
class Tyr(StructuredMethod):
    name = "tyr"
    title = "Týr-the-Pruner"
    description = (
        "Structured (Li et al., 2025): a supernet where every attention and MLP sublayer is pruned at E "
        "nested sparsity levels around its target (group OBS, a few units per round, exact least-squares "
        "refit of the kept columns), built block by block with the centre (or expected) level feeding the "
        "next block; then an evolutionary search over one level per sublayer, mutations moving one sublayer "
        "up and another of the same kind down so the removed parameter count is exact, fitness = top-k KL "
        "to the dense model on growing token stages; coarse to fine (re-centre, halve the step). "
        "Cost: each supernet build is a layer-wise pass over the calibration windows (build_tokens), plus "
        "Hessians, group OBS and the refits of every level; each generation evaluates about "
        "offspring*t1 + offspring/4*(t2-t1) + (t3-t2) tokens (~3.3k with the defaults). Measured on "
        "smollm2-135m (32 x 512 windows, 12.5%, idle 2-core CPU): "
        "~128 s per build, ~7 s per generation, ~6.7 min in all with the defaults (2 builds + 20 generations); "
        "search=False: one build.")
    params = (
        Param("levels", "int", 9, "sparsity levels per sublayer in the supernet (E), centred on its target", 1, 33),
        Param("step", "float", 0.125, "initial level step as a fraction of a sublayer's units (at least one "
              "unit); halved each iteration", 0.001, 0.5),
        Param("offspring", "int", 8, "mutated candidates per generation", 1, 512),
        Param("generations", "int", 10, "generations per iteration", 0, 1000),
        Param("iterations", "int", 2, "coarse-to-fine iterations: rebuild the supernet centred on the best "
              "distribution with half the step", 1, 10),
        Param("mutations", "int", 3, "each offspring gets 1 to this many budget-preserving moves", 1, 64),
        Param("stage_tokens", "choice", "128,512,2048", "tokens per selection stage (1/4 of the candidates "
              "survive each stage); taken from the calibration windows", choices=STAGE_CHOICES),
        Param("topk", "int", 64, "dense model's top-k tokens kept for the KL fitness", 1, 4096),
        Param("propagation", "choice", "centre", "next block's input during the build: the centre level's "
              "output, or the expected output over the levels (mean level weight)", choices=("centre", "expected")),
        # proportional: lower perplexity on held-out calibration text at 25% and 50% (bench/heldout.py,
        # search=False: 60.2 vs 65.6, 154.1 vs 186.3; 12.5%: 44.65 vs 44.57)
        Param("start", "choice", "proportional", "the uniform start (and the no-search result): proportional = "
              "attention loses its proportional share of units, spread evenly over the blocks (at 12.5%, a "
              "third of the attention of 11 of 30 blocks where a unit is a KV group of three heads); block = "
              "each block loses the target fraction, attention in whole units rounded per block, MLP channels "
              "the rest (the uniform allocation of the other structured methods). Mutations trade only within "
              "a kind, so the start fixes how the budget splits between attention and MLP",
              choices=("proportional", "block")),
        Param("search", "bool", True, "False: no search, the uniform (centre) distribution (ablation)"),
        # 0 (all): lower perplexity on held-out calibration text than 8192 tokens (bench/heldout.py, 32
        # windows, search=False: 12.5% 42.93 vs 44.65, 50% 149.39 vs 154.11), for a 1.5x longer build
        Param("build_tokens", "int", 0, "calibration tokens (whole windows, at least one) per supernet "
              "build; 0 = all windows, as the other methods use", 0, 10_000_000),
        Param("seed", "int", 0, "seed of the mutations", 0, 2**31 - 1),
    )
    stats = frozenset({"xtx"})

    @torch.no_grad()
    def prune_structured(self, lm, windows, sparsity, params, progress=None, should_stop=None, on_plan=None):
        units = all_block_units(lm)
        n_blocks = len(units)
        rng = random.Random(params["seed"])
        centre_level = params["levels"] // 2
        iterations = params["iterations"] if params["search"] else 1
        generations = params["generations"] if params["search"] else 0
        total_steps = iterations * (n_blocks + generations)
        done = 0

        subs = _Sublayers(lm, units)
        total_params = decoder_params(units)
        target = sparsity * total_params
        if params["start"] == "block":  # the uniform allocation every structured method here shares
            attn_c, mlp_c = (list(c) for c in zip(*(u.removal_counts(sparsity) for u in units)))
        else:
            attn_c, mlp_c = tyr.initial_counts(target, [u.attn_units for u in units], [u.attn_unit_params for u in units],
                                               [u.channels for u in units], [u.channel_params for u in units])
        centres = [c for pair in zip(attn_c, mlp_c) for c in pair]
        n_build = windows.shape[0] if params["build_tokens"] == 0 else \
            max(1, min(windows.shape[0], params["build_tokens"] // windows.shape[1]))
        stage_tokens = [int(t) for t in params["stage_tokens"].split(",")]
        best = _Best(subs, total_params, target, on_plan)
        try:
            fitness = _Fitness(lm, windows, stage_tokens, params["topk"], should_stop)
            no_search = None
            generation = 0
            for it in range(iterations):
                subs.restore()

                def build_progress(i, total, what, it=it):
                    if progress is not None:
                        progress(done + i, total_steps,
                                 f"iteration {it + 1}/{iterations}: supernet block {i}/{total}")

                net = _build_supernet(lm, windows[:n_build], subs, centres, params["step"] / 2 ** it, params,
                                      build_progress, should_stop)
                done += n_blocks
                fitness.reset()
                state = tuple([centre_level] * len(subs.views))
                parent_f = fitness.evaluate(state, fitness.stage_chunks[-1], net.load)
                if no_search is None:
                    no_search = parent_f
                best.offer(net, state, parent_f, {"generation": generation, "iteration": it + 1})
                for g in range(generations):
                    _stop(should_stop, f"at generation {g + 1}")
                    generation += 1
                    state, parent_f = _generation(state, parent_f, net, subs, fitness, params, rng)
                    best.offer(net, state, parent_f, {"generation": generation, "iteration": it + 1})
                    done += 1
                    if progress is not None:
                        progress(done, total_steps, f"iteration {it + 1}/{iterations}: generation {g + 1}/"
                                 f"{generations}, best KL {best.fitness:.5g}")
                centres = best.counts  # re-centre on the best distribution so far
            plan = best.plan
            plan.meta.update({"fitness_tokens": fitness.tokens[-1], "stage_tokens": fitness.tokens,
                              "no_search_fitness_kl": no_search, "generations_run": generation,
                              "build_windows": n_build, "history": best.history})
            return plan
        finally:
            subs.restore()


class _Sublayers:
    """The model's out-projections in supernet order (block i -> 2i attention out, 2i+1 MLP out),
    what a unit of each is, and their dense weights to restore."""

    def __init__(self, lm, units):
        family = lm.family
        self.names, self.kinds, self.unit_size, self.unit_params, self.n_units, self.views = [], [], [], [], [], []
        for u in units:
            prefix = family.block_prefix(u.index)
            mods = family.linear_modules(lm.blocks[u.index])
            for kind, rel, size, p, n in (("attn", family.attention.out, u.q_heads_per_unit * u.head_dim,
                                           u.attn_unit_params, u.attn_units),
                                          ("mlp", family.mlp.out, 1, u.channel_params, u.channels)):
                self.names.append(f"{prefix}.{rel}")
                self.kinds.append(kind)
                self.unit_size.append(size)
                self.unit_params.append(p)
                self.n_units.append(n)
                self.views.append(family.weight_view(mods[rel]))
        self.dense = [v.clone() for v in self.views]

    @torch.no_grad()
    def restore(self) -> None:
        for v, d in zip(self.views, self.dense):
            v.copy_(d)


def _build_supernet(lm, build_windows, subs: _Sublayers, centres, step_frac: float, params, progress,
                    should_stop) -> _Supernet:
    """One pass block by block: each sublayer's levels around its centre count, with the next
    blocks calibrated on the centre (or the levels' mean) weights."""
    net = _Supernet(subs.views)
    centre_level = params["levels"] // 2

    def on_block(ctx: BlockContext) -> bool:
        _stop(should_stop, f"at block {ctx.index}")
        for s in (2 * ctx.index, 2 * ctx.index + 1):
            lv = tyr.sublayer_levels(subs.dense[s], ctx.stats[subs.names[s]].xtx, subs.unit_size[s], centres[s],
                                     tyr.step_units(step_frac, subs.n_units[s]), params["levels"])
            net.levels[s] = lv
            if params["propagation"] == "expected":
                w = torch.stack([x.double() for x in lv.weights]).mean(0).to(subs.views[s].dtype)
            else:
                w = lv.weights[centre_level]
            subs.views[s].copy_(w)
        return True

    run_layerwise(lm, build_windows, {"xtx"}, on_block, progress=progress, should_stop=should_stop)
    net.forget()
    return net


def _generation(state: tuple, parent_f: float, net: _Supernet, subs: _Sublayers, fitness: _Fitness, params,
                rng: random.Random) -> tuple[tuple, float]:
    """One generation: mutate the parent into offspring under the same budget, keep the best quarter
    at each fitness stage, and replace the parent if the final stage's best beats it."""
    counts = net.counts
    budget = tyr.removed_params(list(state), counts, subs.unit_params)
    offspring = []
    for _ in range(params["offspring"]):
        child = tuple(tyr.mutate(list(state), counts, subs.unit_params, subs.kinds, rng,
                                 1 + rng.randrange(params["mutations"])))
        if tyr.removed_params(list(child), counts, subs.unit_params) != budget:
            raise RuntimeError("Týr mutation changed the parameter budget (a bug).")
        if child != state and child not in offspring:
            offspring.append(child)
    survivors = offspring
    for si, n_chunks in enumerate(fitness.stage_chunks):
        scored = sorted(((fitness.evaluate(c, n_chunks, net.load), i) for i, c in enumerate(survivors)))
        if si < len(fitness.stage_chunks) - 1:
            keep = max(1, math.ceil(len(offspring) / 4 ** (si + 1)))
            survivors = [survivors[i] for _, i in scored[:keep]]
        elif scored:
            f, i = scored[0]
            if f < parent_f:
                state, parent_f = survivors[i], f
    return state, parent_f


class _Best:
    """The best distribution found so far, as a plan, with the history of improvements."""

    def __init__(self, subs: _Sublayers, total_params: int, target: float, on_plan):
        self.subs, self.total_params, self.target, self.on_plan = subs, total_params, target, on_plan
        self.fitness, self.plan, self.counts, self.history = math.inf, None, None, []

    def offer(self, net: _Supernet, state: tuple, fitness: float, info: dict) -> None:
        if fitness >= self.fitness:
            return
        self.fitness, self.plan = fitness, self._plan(net, state, fitness)
        self.counts = [c[level] for c, level in zip(net.counts, state)]
        self.history.append({**info, "fitness": fitness})
        if self.on_plan is not None:
            self.on_plan(self.plan, {"generation": info["generation"], "fitness": fitness,
                                     "iteration": info["iteration"]})

    def _plan(self, net: _Supernet, state: tuple, fitness: float) -> StructuredPlan:
        keeps = [net.levels[s].keeps[level] for s, level in enumerate(state)]
        weights = {self.subs.names[s]: net.levels[s].weights[level] for s, level in enumerate(state)
                   if net.levels[s].counts[level] > 0}
        removed = tyr.removed_params(list(state), net.counts, self.subs.unit_params)
        plan = StructuredPlan(keeps[0::2], keeps[1::2], weights)
        plan.meta.update({"achieved_sparsity": round(removed / self.total_params, 6), "removed_params": removed,
                          "target_removed_params": round(self.target), "fitness_kl": fitness})
        return plan
