"""The Gradio explorer. `import explorer` builds nothing and loads no model; `explorer.demo`
builds the app on first access (the model loads when a page opens or a handler first needs it).

    from explorer.app import build_app, launch_kwargs
    build_app().queue(default_concurrency_limit=1).launch(**launch_kwargs())
"""
from __future__ import annotations

__all__ = ["demo", "build_app", "launch_kwargs"]

_DEMO = None


def build_app(*args, **kwargs):
    from .app import build_app as build

    return build(*args, **kwargs)


def launch_kwargs() -> dict:
    from .app import launch_kwargs as kwargs

    return kwargs()


def __getattr__(name: str):
    global _DEMO
    if name == "demo":  # built once, when first asked for
        if _DEMO is None:
            _DEMO = build_app()
        return _DEMO
    raise AttributeError(f"module 'explorer' has no attribute {name!r}")
