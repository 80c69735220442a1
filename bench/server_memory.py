"""The explorer server's memory under the sweep that used to kill it: a real server process
(launch.py) on a real model, one Wanda run, then a sweep of 199 sparsities (refused before any
work), a 12-point sweep of the active run and of every run (streamed, one mask set at a time).
The server's resident memory (VmRSS) is read before and after each request, and its peak during
each (VmHWM, reset before the request through /proc/PID/clear_refs; Linux, as root or the owner).

    python -m bench.server_memory [--model smollm2-135m]

Prints a table and writes bench/results/server_memory.{json,md,html}."""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, print_table, save

MIB = 2**20


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=64)
    args = ap.parse_args()
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--model", args.model, "--port", str(port),
                             "--no-autoload"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        client = None
        deadline = time.time() + 300
        while client is None and time.time() < deadline:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
            except Exception:
                time.sleep(1)
        client.predict(args.model, "auto", "cpu", "none", api_name="/load_model")
        client.predict(method_name="wanda", windows=4, seqlen=args.seqlen, sparsity=0.5, params_json="",
                       api_name="/calibrate")
        evaluation = ("python-docs", args.seqlen, 1)
        client.predict("0.5", *evaluation, api_name="/sweep")  # the dense perplexity, once

        def request(label: str, api: str, sparsities: str) -> None:
            time.sleep(1)
            before = _vm(proc.pid, "VmRSS")
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            start = time.perf_counter()
            try:
                client.predict(sparsities, *evaluation, api_name=api)
                outcome = "done"
            except AppError as exc:
                outcome = f"refused: {str(exc)[:70]}"
            seconds = time.perf_counter() - start
            peak = _vm(proc.pid, "VmHWM")
            time.sleep(1)
            after = _vm(proc.pid, "VmRSS")
            rows.append(dict(request=label, outcome=outcome, before=before / MIB, peak=peak / MIB, after=after / MIB,
                             growth=(after - before) / MIB, seconds=seconds))

        many = ", ".join(f"{i / 200:.3f}" for i in range(1, 200))
        twelve = ", ".join(f"{0.2 + i * 0.05:.2f}" for i in range(12))
        request("/sweep, 199 sparsities", "/sweep", many)
        request("/sweep_runs, 199 sparsities", "/sweep_runs", many)
        request("/sweep, 12 sparsities", "/sweep", twelve)
        request("/sweep_runs, 12 sparsities", "/sweep_runs", twelve)
        request("/sweep, 12 sparsities again", "/sweep", twelve)
    finally:
        proc.terminate()
        proc.wait(60)
    table = print_table(rows, [("request", "request", ""), ("outcome", "outcome", ""), ("before", "RSS before, MiB", ".0f"),
                               ("peak", "peak during, MiB", ".0f"), ("after", "RSS after, MiB", ".0f"),
                               ("growth", "after - before, MiB", "+.0f"), ("seconds", "s", ".1f")])
    header = (f"{args.model}, one Wanda run (4 x {args.seqlen} calibration), perplexity on 1 window of "
              f"{args.seqlen} tokens (python-docs); 2-core machine, times are upper bounds")
    print(header)
    save("server_memory", {"model": args.model, "seqlen": args.seqlen, "rows": rows}, header + "\n\n" + table)
    import plotly.graph_objects as go

    fig = go.Figure([go.Bar(name=key, x=[r["request"] for r in rows], y=[r[key] for r in rows])
                     for key in ("before", "peak", "after")])
    fig.update_layout(title=f"Explorer server memory, {args.model}", yaxis_title="MiB", barmode="group")
    fig.write_html(RESULTS / "server_memory.html", include_plotlyjs="cdn")


if __name__ == "__main__":
    main()
