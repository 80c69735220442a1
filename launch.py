"""Start the pruning explorer: python launch.py [--model smollm2-135m] [--port 7860] [--share] [--auth user:pass]"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def main(argv=None) -> None:
    from core.models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description="The pruning explorer (Gradio app).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="default model: bundled name, local folder, .gguf path or hub id")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    parser.add_argument("--no-autoload", action="store_true", help="do not load the model when a page opens")
    args = parser.parse_args(argv)
    auth = None
    if args.auth:
        if ":" not in args.auth:
            parser.error("--auth takes USER:PASS")
        auth = tuple(args.auth.split(":", 1))

    from explorer.app import build_app, launch_kwargs

    demo = build_app(model=args.model, autoload=not args.no_autoload)
    # Heavy jobs share one slot (see concurrency_id in explorer/app.py); slider cuts run beside them.
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                **launch_kwargs())


if __name__ == "__main__":
    main()
