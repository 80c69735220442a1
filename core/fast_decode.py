"""Compiled decoding: `model.generate` with a static KV cache and a torch.compile'd forward.

Eager decoding of a small model on a CPU spends a large share of each step outside the matrix
products (dozens of small operator calls per layer, Python dispatch, growing the KV cache by
concatenation). That share does not shrink when a model is pruned, so it caps the speedup a
physically sliced model can show. Compiling the decode step fuses those calls, and a static
cache writes in place, which leaves the weights (what pruning removes) as most of the cost.

Two ways in, for any causal LM, dense or sliced (core.structured.slicing):

- `compile_for_decode(model)` switches transformers' own generation settings: every later
  `model.generate` keeps a static cache and runs its decode steps through `torch.compile`
  (sampling, stopping criteria, streamers: everything generate offers still works);
- `compiled_greedy(model, ids, n)` is a minimal greedy loop over the same kind of compiled
  step: prefill, then one compiled single-token forward and an argmax per token, nothing else.
  generate's per-step bookkeeping (logits processors, stopping criteria, input preparation,
  a few milliseconds a step on a small CPU) is not there, so what is timed is the model.

The prefill stays eager in both. The first call compiles (tens of seconds on a small CPU), and
each new total length (prompt + new tokens) or batch size compiles once more; later calls with
a size seen before are fast.

Sliced models work as they are: transformers' static cache sizes each layer from its first
keys, so layers with fewer KV heads (or `EmptyAttention`'s one-wide placeholder) get caches of
their own width. The whole forward is captured as one graph (`fullgraph=True`), so per-layer
shapes are constants of that graph instead of recompilations of one layer's code.
"""
from __future__ import annotations

import os
import shutil
import time
import weakref

import torch

from .errors import PruneError
from .kv_cache import with_cache

# Every compiled model adds guarded entries for the same code objects (the model class's
# forward); the default of 8 would fall back to eager after a few models in one process.
_RECOMPILE_LIMIT = 64


class CompileUnavailable(PruneError):
    """torch.compile cannot run here (typically: no C++ compiler for the CPU backend)."""


def cpu_compiler() -> str | None:
    """The C++ compiler torch's CPU backend (inductor) would call, or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def check_can_compile(device: str | torch.device) -> None:
    """Raise CompileUnavailable (with what to do) where compiled decoding cannot run on `device`:
    on CPU, torch.compile needs a C++ compiler. Cheap: callers can check before loading a model."""
    if torch.device(device).type == "cpu" and cpu_compiler() is None:
        raise CompileUnavailable("Compiled decoding on CPU needs a C++ compiler (torch.compile builds C++ kernels): "
                                 "install one (e.g. `apt-get install g++`) or decode eagerly.")


def _allow_many_models() -> None:
    """Raise dynamo's process-wide recompile limit to _RECOMPILE_LIMIT (never lower it)."""
    import torch._dynamo.config as dynamo_config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)


def compile_for_decode(model, mode: str = "default"):
    """Make `model.generate` decode with a static cache and a compiled forward (in place).

    `mode` is torch.compile's mode ("default"; "reduce-overhead" only helps on CUDA). Returns
    the model. Raises CompileUnavailable with what to do when the CPU backend has no compiler.
    Undo with `eager_decode(model)`."""
    from transformers import CompileConfig

    check_can_compile(next(model.parameters()).device)
    _allow_many_models()
    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
    config._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config
    model.generation_config.disable_compile = False
    return model


def eager_decode(model):
    """Undo compile_for_decode: dynamic cache, eager decode steps."""
    model.generation_config.cache_implementation = None
    model.generation_config.compile_config = None
    model.generation_config.disable_compile = True
    return model


def is_compiled_for_decode(model) -> bool:
    config = model.generation_config
    return config.cache_implementation == "static" and getattr(config, "compile_config", None) is not None \
        and not config.disable_compile


class _Stamps:
    """A pass-through logits processor that records when each new token's scores arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def timed_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation of `ids` by exactly `new_tokens` ids through `model.generate`, and the
    decode rate in tokens/s: from the first new token's scores to the last one's (new_tokens - 1
    steps), so the prefill (the prompt's forward) is not counted. new_tokens >= 2."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise ValueError("timed_greedy needs at least 2 new tokens (decode time runs from the first to the last).")
    stamps = _Stamps()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=model.generation_config.pad_token_id or 0,
                         logits_processor=LogitsProcessorList([stamps]))
    assert out.shape[1] == ids.shape[1] + new_tokens and len(stamps.times) == new_tokens
    return out, (new_tokens - 1) / (stamps.times[-1] - stamps.times[0])


def greedy_ids(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation of `ids` by exactly `new_tokens` ids, through `model.generate`."""
    return timed_greedy(model, ids, max(new_tokens, 2))[0][:, : ids.shape[1] + new_tokens]


# Per model, kept outside it (a deep copy of a model, such as a sliced one, must not inherit
# the compiled step bound to the original's forward) and dropped with it.
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decode_step(model):
    """The model's compiled forward for single-token steps, built once per model."""
    if model not in _STEPS:
        _allow_many_models()
        _STEPS[model] = torch.compile(model.forward, fullgraph=True, dynamic=False)
    return _STEPS[model]


def has_compiled_step(model) -> bool:
    return model in _STEPS


def _static_cache(model, batch: int, max_len: int):
    """A static cache for this model and size, reused across calls (a new cache object would
    fail the compiled step's guards and recompile it), reset before each use. One is kept per
    size the model was asked for."""
    from transformers import StaticCache

    caches = _CACHES.setdefault(model, {})
    key = (batch, max_len)
    if key not in caches:
        caches[key] = StaticCache(config=model.config, max_cache_len=max_len)
    cache = caches[key]
    cache.reset()
    return cache


@torch.no_grad()
def compiled_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy continuation of `ids` (a batch of equal-length prompts, no padding) by exactly
    `new_tokens` ids: eager prefill into a static cache, then compiled single-token steps. Returns
    the ids and the decode rate in tokens/s, timed like `timed_greedy` (first new token to last).
    No end-of-text stop: it always produces `new_tokens` ids."""
    if new_tokens < 2:
        raise ValueError("compiled_greedy needs at least 2 new tokens (decode time runs from the first to the last).")
    check_can_compile(next(model.parameters()).device)
    batch, length = ids.shape
    step = _decode_step(model)
    cache = _static_cache(model, batch, length + new_tokens)
    # Positions are passed explicitly: a model that derives them from a mask and the cache's
    # length (OPT) would otherwise slice by a data-dependent size, which a static graph cannot hold.
    positions = torch.arange(length, device=ids.device).expand(batch, -1)
    cache_kw = with_cache(model, cache)
    out = model(ids, **cache_kw, use_cache=True, logits_to_keep=1, position_ids=positions)
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token]
    position = positions[:, -1:].clone()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        position += 1  # in place: the same tensor every step, only its value changes
        out = step(token, **cache_kw, use_cache=True, position_ids=position)
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    elapsed = time.perf_counter() - start
    return torch.cat([ids, *tokens], dim=1), (new_tokens - 1) / elapsed
