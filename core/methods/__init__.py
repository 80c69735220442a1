"""The one registry of pruning methods. Every module in this package is imported on first use;
each registers its method class with @register."""
from __future__ import annotations

import importlib
import pkgutil

from .base import Method, Param

_REGISTRY: dict[str, Method] = {}
_loaded = False


def register(cls):
    instance = cls()
    if instance.name in _REGISTRY:
        raise ValueError(f"two methods named {instance.name!r}")
    _REGISTRY[instance.name] = instance
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def all_methods() -> dict[str, Method]:
    _load_all()
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    methods = all_methods()
    if name not in methods:
        raise ValueError(f"Unknown method {name!r}. Known methods: {', '.join(methods)} "
                         "(`python -m core methods` describes them).")
    return methods[name]


__all__ = ["Method", "Param", "register", "all_methods", "get_method"]
