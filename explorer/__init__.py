"""The Gradio explorer. `from explorer import demo` builds the app without loading any model:
the model loads when a page opens or a handler first needs it.

    from explorer import demo, launch_kwargs
    demo.queue(default_concurrency_limit=1).launch(**launch_kwargs())
"""
from .app import build_app, launch_kwargs

demo = build_app()

__all__ = ["demo", "build_app", "launch_kwargs"]
