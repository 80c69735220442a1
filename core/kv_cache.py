"""The KV cache across transformers releases.

transformers 5.24 renamed the cache argument of every forward (and the field of every model
output) from `past_key_values` to `cache`; the old name still works for now, with a
deprecation warning, at the top of the model but not inside it: decoder layers and attention
modules receive the cache only under the name their release uses (`cache`,
`past_key_values`, GPT-NeoX's `layer_past`). Code that passes or reads a cache goes through
these helpers, so it works on every release pyproject allows.
"""
from __future__ import annotations

import inspect

from torch import nn

# Every name a release has given the cache argument of a model, layer or attention forward.
CACHE_ARG_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")


def find_cache(kwargs: dict):
    """The KV cache among a forward's keyword arguments (whatever it is called), or None."""
    from transformers.cache_utils import Cache

    for name in CACHE_ARG_NAMES:
        value = kwargs.get(name)
        if isinstance(value, Cache):
            return value
    return None


def cache_arg_name(model: nn.Module) -> str:
    """The keyword `model`'s forward takes its cache by: `cache` (5.24+) or `past_key_values`."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model: nn.Module, cache) -> dict:
    """Keyword arguments that hand `cache` to `model`'s forward under the name it expects."""
    return {cache_arg_name(model): cache}


def output_cache(output):
    """The cache a model output carries (`cache` from 5.24 on, `past_key_values` before)."""
    keys = output.keys() if hasattr(output, "keys") else ()
    if "cache" in keys:
        return output["cache"]
    return output["past_key_values"] if "past_key_values" in keys else None
