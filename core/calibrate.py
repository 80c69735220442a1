"""The layer-sequential calibration engine.

Capture the inputs of block 0 for every calibration window, then for each block: run it with
hooks on its prunable linears to gather statistics, hand the statistics to a callback (which
may prune the block), re-run the block if its weights changed, and pass its outputs on as the
next block's inputs. Peak memory: the model (or, offloaded, the
block being worked on) plus one block's activations for all windows, an input and an output
buffer in the model's dtype, plus the block's statistics in float32 and what the callback keeps;
freed memory goes back to the OS after every block (`release_free_memory`), so the process's
resident size follows that too.

The engine knows nothing about pruning methods: it gathers what it is asked for
(``sum_x2``, ``sum_x`` for means/variances, ``xtx`` for the Hessian) and calls back.
"""
from __future__ import annotations

import ctypes
import inspect
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import Cancelled
from .progress import ProgressFn
from .kv_cache import CACHE_ARG_NAMES
from .layer_stats import STAT_KINDS, LayerStats
from .loaded_model import LoadedModel
from .offload import onloaded



@dataclass
class BlockContext:
    """What a block callback receives."""

    index: int
    block: nn.Module
    linears: dict[str, nn.Module]  # full name -> module
    stats: dict[str, LayerStats]  # full name -> stats (modules sharing an input share the object)
    inputs: torch.Tensor  # (n_windows, seqlen, hidden): the block's inputs, read-only


class _StopForward(Exception):
    pass


_malloc_trim = None  # glibc's malloc_trim once looked up; False where the C library has none


def release_free_memory() -> None:
    """Give the memory the C allocator holds free back to the OS (glibc's malloc_trim(0));
    nothing where the C library has no malloc_trim (macOS, Windows, musl).

    Why the engine needs it: a block's activations (up to ~25 MB each at 8 windows x 512
    tokens) come from glibc's heap, and what the block leaves behind (ranks, statistics,
    tensor headers) lands between them. The freed activations then sit in holes the heap
    can neither shrink past nor, split by those small survivors, fit the next block's
    activations into, so the heap grows every block. Measured on smollm2-135m at wt2-512
    (one-shot Wanda, 30 blocks): ~0.45-1.2 GB of free-but-resident heap at the end without
    this, ~0.02 GB with it. Cost: milliseconds per call plus re-faulting the pages the next
    block uses; no measurable change in the calibration's CPU time (within run-to-run noise)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError, TypeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


# The dtype statistics are summed in. float32 by default (as the reference code); float64 is for
# checking how much fp32 summation moves a result (bench/high_sparsity.py). Either way a block's
# statistics reach the methods as float32 (see _as_float32).
_STATS_DTYPE: ContextVar[torch.dtype] = ContextVar("stats_dtype", default=torch.float32)


@contextmanager
def statistics_dtype(dtype: torch.dtype):
    """Within the with-block, calibration sums its statistics in `dtype` (torch.float64 or the
    default torch.float32)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"statistics are summed in float32 or float64, not {dtype}")
    token = _STATS_DTYPE.set(dtype)
    try:
        yield
    finally:
        _STATS_DTYPE.reset(token)


def _accumulate(stats: LayerStats, x: torch.Tensor, kinds: frozenset) -> None:
    dtype = _STATS_DTYPE.get()
    if "window_x2" in kinds:  # before flattening: x is (windows, tokens, d_in)
        if stats.window_x2 is None:
            stats.window_x2 = []
        per_window = x.to(dtype).reshape(x.shape[0], -1, x.shape[-1])
        stats.window_x2.append(per_window.pow(2).mean(dim=1))
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    if stats.sum_x2 is None:
        d = x.shape[1]
        stats.sum_x2 = torch.zeros(d, device=x.device, dtype=dtype)
        if "sum_x" in kinds:
            stats.sum_x = torch.zeros(d, device=x.device, dtype=dtype)
        if "xtx" in kinds:
            stats.xtx = torch.zeros(d, d, device=x.device, dtype=dtype)
    stats.n_tokens += x.shape[0]
    stats.sum_x2.add_((x * x).sum(0))
    if stats.sum_x is not None:
        stats.sum_x.add_(x.sum(0))
    if stats.xtx is not None:
        stats.xtx.addmm_(x.t(), x)


def _as_float32(stats: LayerStats) -> None:
    """Round statistics summed in float64 to the float32 every method computes with."""
    for name in ("sum_x2", "sum_x", "xtx"):
        value = getattr(stats, name)
        if value is not None and value.dtype != torch.float32:
            setattr(stats, name, value.float())
    if stats.window_x2 is not None:
        stats.window_x2 = [w.float() for w in stats.window_x2]


_CACHE_ARGS = (*CACHE_ARG_NAMES, "use_cache", "output_attentions", "cache_position")


def _as_keywords(block: nn.Module, hidden_states, args: tuple, kwargs: dict) -> dict:
    """A block call's arguments after hidden_states, all as keywords (GPT-2 passes some by
    position), without the KV cache: the engine replays blocks one at a time, with no cache."""
    signature = inspect.signature(type(block).forward)
    bound = signature.bind(block, hidden_states, *args, **kwargs).arguments
    params = list(signature.parameters.values())
    out = {}
    for param in params[2:]:
        if param.name not in bound:
            continue
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(bound[param.name])
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL:
            out[param.name] = bound[param.name]
    return {k: v for k, v in out.items() if k not in _CACHE_ARGS}


def _capture_inputs(lm: LoadedModel, windows: torch.Tensor, batch_size: int):
    """Block-0 inputs for all windows, and each block's keyword arguments per batch.

    Every block's forward is swapped for a recorder that returns its input unchanged, so the
    model runs only its embeddings and mask/position set-up; the last block stops the pass so
    the (large) lm_head never runs. Keyword arguments can differ per block (Gemma 3's sliding
    and global layers get different masks and rotary tables), so each block's are kept.
    """
    blocks = lm.blocks
    n_blocks = len(blocks)
    hidden_batches: list[torch.Tensor] = []
    kwargs_per_batch: list[list[dict]] = []
    current: list[dict] = []

    def make_recorder(index: int, block: nn.Module):
        def recorder(hidden_states, *args, **kwargs):
            kwargs = _as_keywords(block, hidden_states, args, kwargs)
            if index == 0:
                hidden_batches.append(hidden_states)
            current.append(kwargs)
            if index == n_blocks - 1:
                raise _StopForward
            return hidden_states
        return recorder

    # An accelerate-dispatched block already has an instance forward (its hook's): put that back after.
    own_forward = {index: block.__dict__.get("forward") for index, block in enumerate(blocks)}
    try:
        for index, block in enumerate(blocks):
            block.forward = make_recorder(index, block)
        for start in range(0, windows.shape[0], batch_size):
            current = []
            try:
                lm.model(windows[start:start + batch_size].to(lm.device), use_cache=False)
            except _StopForward:
                pass
            kwargs_per_batch.append(current)
    finally:
        for index, block in enumerate(blocks):
            block.__dict__.pop("forward", None)  # back to the class's forward, or the hook's
            if own_forward[index] is not None:
                block.forward = own_forward[index]
    return torch.cat(hidden_batches), kwargs_per_batch, [b.shape[0] for b in hidden_batches]


def _run_block(block: nn.Module, inputs: torch.Tensor, kwargs_per_batch: list[list[dict]], index: int,
               sizes: list[int], out: torch.Tensor) -> torch.Tensor:
    start = 0
    for batch, size in enumerate(sizes):
        result = block(inputs[start:start + size], **kwargs_per_batch[batch][index])
        out[start:start + size] = result[0] if isinstance(result, tuple) else result
        start += size
    return out




@torch.no_grad()
def run_layerwise(
    lm: LoadedModel,
    windows: torch.Tensor,
    stats: frozenset | set = frozenset({"sum_x2"}),
    on_block: Callable[[BlockContext], bool] | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Walk the blocks in order, gathering `stats` and calling `on_block` for each.

    `on_block` returns True when it changed the block's weights; the block is then re-run so the
    next block sees the pruned outputs (layer-sequential pruning). `progress(done, total, what)`
    is called after each block; `should_stop()` is checked between blocks and raises Cancelled.
    """
    kinds = frozenset(stats)
    unknown = kinds - STAT_KINDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; known: {sorted(STAT_KINDS)}")
    release_free_memory()  # what earlier work freed (e.g. a forward pass), before the inputs are held
    inputs, kwargs_per_batch, sizes = _capture_inputs(lm, windows, batch_size)
    release_free_memory()  # the embedding pass's temporaries
    outputs = torch.empty_like(inputs)
    blocks = lm.blocks
    total = len(blocks)
    for index, block in enumerate(blocks):
        if should_stop is not None and should_stop():
            raise Cancelled(f"Cancelled before block {index} of {total}.")
        linears = {f"{lm.family.block_prefix(index)}.{rel}": module
                   for rel, module in lm.family.linear_modules(block).items()}
        with onloaded(block):  # an offloaded block's weights, loaded once for all of this
            layer_stats = _gather(block, linears, inputs, kwargs_per_batch, index, sizes, outputs, kinds)
            changed = False
            if on_block is not None:
                changed = on_block(BlockContext(index, block, linears, layer_stats, inputs))
            if changed:
                _run_block(block, inputs, kwargs_per_batch, index, sizes, outputs)
        inputs, outputs = outputs, inputs
        release_free_memory()  # this block's activations, before the next block's are made
        if progress is not None:
            progress(index + 1, total, f"block {index + 1}/{total}")
    del inputs, outputs


def _gather(block, linears, inputs, kwargs_per_batch, index, sizes, outputs, kinds) -> dict[str, LayerStats]:
    """Run the block once with statistics hooks; modules fed the same tensor share one LayerStats."""
    if not kinds:
        _run_block(block, inputs, kwargs_per_batch, index, sizes, outputs)
        return {}
    per_module: dict[str, LayerStats] = {}
    # (data_ptr, shape) -> (stats, tensor), reset per batch. Holding the tensor keeps its memory
    # from being reused by a different tensor of the same shape within the batch.
    seen_input: dict[tuple, tuple[LayerStats, torch.Tensor]] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            shared = seen_input.get(key, (None, None))[0]
            if name not in per_module:
                per_module[name] = shared if shared is not None else LayerStats()
            target = per_module[name]
            if shared is target:
                return  # already accumulated through the module that saw this tensor first
            _accumulate(target, x, kinds)
            seen_input[key] = (target, x)
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in linears.items()]
    try:
        start = 0
        for batch, size in enumerate(sizes):
            seen_input.clear()
            result = block(inputs[start:start + size], **kwargs_per_batch[batch][index])
            outputs[start:start + size] = result[0] if isinstance(result, tuple) else result
            start += size
    finally:
        for handle in handles:
            handle.remove()
    for stats in {id(v): v for v in per_module.values()}.values():  # shared objects once
        _as_float32(stats)
    return per_module
