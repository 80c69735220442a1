"""Start the pruning explorer: python launch.py [--model smollm2-135m] [--port 7860] [--share] [--auth user:pass]"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 1..65535")
    return port


def _port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (busy, not allowed, unknown host); None if it can.

    Checked by binding, as the server will, so a busy port is refused at once with one line
    instead of a traceback after gradio's own retries."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host!r}: {exc.strerror or exc}; check --host"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", None)):
                return f"port {port} on {host} is already in use; stop what holds it or pick another with --port"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def main(argv=None) -> None:
    from core.bundled import DEFAULT_MODEL
    from core.offload import OFFLOAD_CHOICES

    parser = argparse.ArgumentParser(description="The pruning explorer (Gradio app).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=_port, default=7860, help="port to listen on, 1..65535 (default 7860)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="default model: bundled name, local folder, .gguf path or hub id")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    parser.add_argument("--no-autoload", action="store_true", help="do not load the model when a page opens")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="the model's dtype (default auto: the checkpoint's own if 16-bit, else float32)")
    parser.add_argument("--device", default="cpu", help="where blocks run: cpu (default), cuda or cuda:N")
    parser.add_argument("--offload", default="none", choices=OFFLOAD_CHOICES,
                        help="where the decoder blocks live: none (on --device), cpu (CPU memory, brought to the "
                             "GPU one at a time), disk (read from the checkpoint one at a time)")
    args = parser.parse_args(argv)
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user.strip() or not password:
            parser.error("--auth takes USER:PASS with a non-empty user and password")
        auth = (user, password)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        parser.error(f"--device takes cpu, cuda or cuda:N, not {args.device!r}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda was asked for but no GPU is visible; use --device cpu")
    problem = _port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)

    from explorer.app import build_app, launch_kwargs

    demo = build_app(model=args.model, autoload=not args.no_autoload, dtype=args.dtype, device=args.device,
                     offload=args.offload)
    # SIGTERM (kill, systemd, docker stop) stops the server as Ctrl-C does, so gradio deletes its
    # cached files and the app's temporary folder goes with the normal exit (atexit).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # Heavy jobs share one slot (see concurrency_id in explorer/app.py); slider cuts run beside them.
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth,
                **launch_kwargs())


if __name__ == "__main__":
    main()
