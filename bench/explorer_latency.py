"""Latency of the explorer's slider (the /cut handler) through gradio_client, and in a browser.

    python bench/explorer_latency.py                      # a tiny random Llama (seconds)
    python bench/explorer_latency.py --model smollm2-135m --windows 16 --seqlen 256
    python bench/explorer_latency.py --model smollm2-135m --windows 16 --seqlen 256 --browser
    python bench/explorer_latency.py --model smollm2-135m --windows 16 --seqlen 256 --browser \
        --runs wanda,owl,unipruning --name explorer_latency_runs  # several runs (issue 14)

With --runs, every method listed is calibrated through the API (one run each, all shown), then
it times N slider releases (each re-cuts every run and redraws the overlaid allocation), N mask
comparisons of the first two runs right after a cut (every mask of both made and counted) and N
with the counts cached (another matrix), saves the session (file size) and reopens it in a new
session N_REOPEN times; --browser then opens that session file in chromium and times slider
release -> overlaid allocation and heatmap redrawn.

Starts the app in a separate server process on a free port (as a user runs it: the client
does not share the server's interpreter), loads the model, calibrates once, then times N cuts
at alternating sparsities (each a real re-cut), N switches between unstructured and 2:4, and N
redraws of the matrix view. For every call it records the round trip, the server process's
CPU time (robust on a busy machine, where wall time mostly measures the neighbours) and,
inside the server, each part: gradio's processing of the event, the cut, the allocation
table and each figure. With --browser it also opens the app in Debian chromium (Playwright),
calibrates through the page, and times slider release -> the allocation chart and the
heatmap both redrawn with the new cut (in-page clock, a timeout per sample). Prints a table
and writes bench/results/explorer_latency.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_folder() -> str:
    from tiny import build_tiny_module, tiny_tokenizer

    folder = tempfile.mkdtemp(prefix="tiny-llama-")
    build_tiny_module("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- the server process

class _Parts:
    """perf_counter time of named parts of the server's work, per API call (sequential calls)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: list[dict] = []  # {"api": name, part: seconds, ...}

    def wrap_sync(self, fn, part: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(part, time.perf_counter() - start)
        return timed

    def wrap_async(self, fn, part: str):
        @functools.wraps(fn)
        async def timed(self_, block_fn, *args, **kwargs):
            api = getattr(block_fn, "api_name", None) or getattr(block_fn, "name", "?")
            event = kwargs.get("event_id")
            with self.lock:
                if event is not None and self.calls and self.calls[-1].get("event") == event:
                    pass  # a streamed handler's next step: the same call
                else:
                    self.calls.append({"api": str(api), "event": event})
            start = time.perf_counter()
            try:
                return await fn(self_, block_fn, *args, **kwargs)
            finally:
                self._add(part, time.perf_counter() - start)
        return timed

    def _add(self, part: str, seconds: float) -> None:
        with self.lock:
            if self.calls:
                self.calls[-1][part] = self.calls[-1].get(part, 0.0) + seconds


def serve(port: int, spec: str, parts_path: str) -> None:
    """Run the app (in this process) with its parts timed; write the timings on SIGTERM."""
    import signal

    import gradio as gr

    import core.maskset
    import explorer.app as app
    from explorer import figures, views as views_module, compare
    from explorer.tabs import live as live_tab, masks as masks_tab

    parts = _Parts()
    gr.Blocks.process_api = parts.wrap_async(gr.Blocks.process_api, "gradio process_api")
    live_tab.recut_run = parts.wrap_sync(live_tab.recut_run, "cut()")  # one run brought to the new cut
    views_module.allocation_table = parts.wrap_sync(core.maskset.allocation_table, "allocation table")
    for name in ("allocation_figure", "allocation_overlay_figure", "saliency_figure", "histogram_figure", "to_plot",
                 "agreement_figure", "jaccard_figure"):
        setattr(figures, name, parts.wrap_sync(getattr(figures, name), name))
    live_tab.views = parts.wrap_sync(live_tab.views, "views (all figures)")
    masks_tab.pair_overlaps = parts.wrap_sync(masks_tab.pair_overlaps, "overlaps (every matrix of A and B)")
    compare.pooled_agreement = parts.wrap_sync(compare.pooled_agreement, "agreement map (one matrix)")

    demo = app.build_app(model=spec, autoload=False)
    demo.queue(default_concurrency_limit=1)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **app.launch_kwargs())
    done.wait()
    Path(parts_path).write_text(json.dumps(parts.calls))
    demo.close()


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _start_server(spec: str, parts_path: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--model", spec,
                             "--parts", parts_path], env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app's server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the app's server did not start within 300 s")


# ---------------------------------------------------------------- the client

def _stats(values: list[float]) -> dict:
    ms = sorted(1000 * v for v in values)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[int(0.9 * (len(ms) - 1))], "n": len(ms)}


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: a tiny random Llama)")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--dtype", default="float32", help="the model's dtype (auto: the checkpoint's if 16-bit)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("-n", type=int, default=20, help="timed calls per handler")
    parser.add_argument("--browser", action="store_true", help="also time the slider end to end in chromium")
    parser.add_argument("--browser-only", action="store_true", help="only the browser timing")
    parser.add_argument("--sample-timeout", type=float, default=30.0,
                        help="seconds one browser sample may take before it counts as timed out")
    parser.add_argument("--runs", default="", help="comma-separated methods: one run each, all shown")
    parser.add_argument("--reopen", type=int, default=3, help="times the saved session is reopened (--runs)")
    parser.add_argument("--name", default="explorer_latency", help="result file name under bench/results")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/NAME.json)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server here
    parser.add_argument("--parts", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = _parse(argv)
    if args.serve:
        return serve(args.serve, args.model, args.parts)
    args.out = args.out or str(ROOT / "bench" / "results" / f"{args.name}.json")
    methods = [m.strip() for m in args.runs.split(",") if m.strip()]

    from gradio_client import Client

    spec = args.model or _tiny_folder()
    parts_path = tempfile.mktemp(prefix="explorer-parts-", suffix=".json")
    proc, url = _start_server(spec, parts_path)
    timings: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    order: list[tuple[str, str]] = []  # (api name, timed label or "") of every call the server sees
    facts, load_s, calib_s = {}, 0.0, 0.0
    try:
        # One SSL context for every request: gradio_client otherwise builds a new one (loading the
        # system CA bundle, even for http://) per request, ~80% of its own CPU per call (~100 ms
        # on a busy 2-core machine): client overhead, not the app's.
        client = Client(url, verbose=False, download_files=False, ssl_verify=ssl.create_default_context())
        start = time.perf_counter()
        facts = client.predict(spec, args.dtype, "cpu", api_name="/load_model")[0]
        load_s = time.perf_counter() - start
        order.append(("load_model", ""))
        runs_info: dict = {}
        if methods and not args.browser_only:
            runs_info = _time_runs(client, proc, url, spec, methods, args, timed_factory=None,
                                   timings=timings, cpu=cpu, order=order, facts=facts)
            calib_s = sum(runs_info["calibration_seconds"].values())
        elif not args.browser_only:
            start = time.perf_counter()
            client.predict(method_name=args.method, windows=args.windows, seqlen=args.seqlen, sparsity=0.5,
                           api_name="/calibrate")
            calib_s = time.perf_counter() - start
            order.append(("calibrate", ""))
            _time_handlers(client, proc, args, facts, timings, cpu, order)
        if args.browser or args.browser_only:
            browser = _browser_timings(url, spec, args, runs_info.get("session_file"))
            timings[BROWSER_LABEL] = browser["samples"]
            if browser["cpu"]:
                cpu[BROWSER_LABEL] = browser["cpu"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    parts = _server_parts(parts_path, order)

    rows = {name: _stats(v) for name, v in timings.items() if v}
    for name, v in cpu.items():
        rows[name]["cpu_median_ms"] = 1000 * statistics.median(v)
    if BROWSER_LABEL in timings:
        rows.setdefault(BROWSER_LABEL, {"n": 0})
        rows[BROWSER_LABEL]["timeouts"] = browser["timeouts"]
    part_rows = {label: {part: 1000 * statistics.median(v) for part, v in by_part.items()}
                 for label, by_part in parts.items()}
    _print_report(args, facts, load_s, calib_s, runs_info, methods, rows, part_rows)
    if runs_info.get("session_file"):
        try:
            os.remove(runs_info.pop("session_file"))
        except OSError:
            pass
    result = {"model": facts.get("model"), "parameters": facts.get("parameters"),
              "method": args.runs or args.method, "runs": {k: v for k, v in runs_info.items() if k != "session_file"},
              "calibration": {"windows": args.windows, "seqlen": args.seqlen, "seconds": calib_s},
              "load_seconds": load_s, "handlers": rows, "server_parts_median_ms": part_rows,
              "note": "round trip through gradio_client to the app in its own process, including plotly "
                      "figure serialisation; CPU = user+system time per call of the server process (handlers) "
                      "or of everything the bench started: server, chromium, playwright's driver (browser: before "
                      "the release to 300 ms after the redraw)",
              "load_average_at_end": os.getloadavg(),
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _time_handlers(client, proc, args, facts, timings, cpu, order) -> None:
    """N cuts at alternating sparsities, N switches to 2:4 and N matrix redraws, timed."""
    def timed(label: str, **kwargs) -> None:
        before, t = _cpu_seconds(proc.pid), time.perf_counter()
        client.predict(**kwargs)
        timings.setdefault(label, []).append(time.perf_counter() - t)
        after = _cpu_seconds(proc.pid)
        if before is not None and after is not None:
            cpu.setdefault(label, []).append(after - before)
        order.append((kwargs["api_name"].strip("/"), label))

    for i in range(args.n):  # alternate so every call really re-cuts
        timed("cut (unstructured)", sparsity=0.3 if i % 2 else 0.6, pattern="unstructured", api_name="/cut")
    for i in range(2 * args.n):  # unstructured <-> 2:4: the 2:4 calls are timed
        pattern = "2:4" if i % 2 else "unstructured"
        if pattern == "2:4":
            timed("cut (2:4, from unstructured)", sparsity=0.5, pattern=pattern, api_name="/cut")
        else:
            client.predict(sparsity=0.5, pattern=pattern, api_name="/cut")
            order.append(("cut", ""))
    for i in range(args.n):
        timed("view (heatmap + histogram)", block=i % facts["layers"], mtype="down", api_name="/view")


def _server_parts(parts_path: str, order: list[tuple[str, str]]) -> dict:
    """Each timed call's parts as the server recorded them (its calls must line up with the client's)."""
    parts = {}
    try:
        calls = json.loads(Path(parts_path).read_text())
        os.remove(parts_path)
    except (OSError, ValueError):
        calls = []
    if [c["api"] for c in calls[:len(order)]] != [api for api, _ in order]:
        got, want = [c["api"] for c in calls[:len(order)]], [api for api, _ in order]
        first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        print(f"the server's calls do not match the client's: no per-part timings (call {first}: server "
              f"{got[first:first + 3]}, client {want[first:first + 3]})", file=sys.stderr)
    else:  # the browser's calls come after the timed ones
        for (_, label), call in zip(order, calls):
            if label:
                for part, seconds in call.items():
                    if part not in ("api", "event"):
                        parts.setdefault(label, {}).setdefault(part, []).append(seconds)
    return parts


def _print_report(args, facts, load_s, calib_s, runs_info, methods, rows, part_rows) -> None:
    if facts:
        print(f"model {facts['model']} ({facts['parameters']:,} params), load {load_s:.1f} s, "
              f"calibrate ({args.runs or args.method}, {args.windows}x{args.seqlen}) {calib_s:.1f} s")
    if runs_info.get("session_bytes"):
        print(f"session file of {len(methods)} runs: {runs_info['session_bytes'] / 2**20:.1f} MiB, saved in "
              f"{runs_info['save_seconds']:.1f} s; reopened in {runs_info['reopen_seconds']} s (round trip), "
              f"server {runs_info['reopen_server_seconds']} s")
    print(f"{'handler':48} {'median ms':>10} {'p90 ms':>8} {'CPU ms':>8} {'n':>4}")
    for name, r in rows.items():
        cpu_ms = r.get("cpu_median_ms")
        print(f"{name:48} {r.get('median_ms', float('nan')):10.1f} {r.get('p90_ms', float('nan')):8.1f} "
              f"{'' if cpu_ms is None else f'{cpu_ms:.1f}':>8} {r['n']:4d}"
              + (f"  ({r['timeouts']} timed out)" if r.get("timeouts") else ""))
    for label, by_part in part_rows.items():
        print(f"  server parts of {label} (median ms): "
              + ", ".join(f"{part} {ms:.1f}" for part, ms in by_part.items()))


# ---------------------------------------------------------------- several runs

BROWSER_LABEL = "browser: slider -> allocation + heatmap redrawn"


def _time_runs(client, proc, url: str, spec: str, methods: list[str], args, timed_factory, timings: dict,
               cpu: dict, order: list, facts: dict) -> dict:
    """Calibrate one run per method, then time the slider over all of them, the comparison of the
    first two, saving the session and reopening it in a new session."""
    import shutil

    from gradio_client import Client

    def timed(label: str, *a, **kwargs):
        before, t = _cpu_seconds(proc.pid), time.perf_counter()
        out = client.predict(*a, **kwargs)
        timings.setdefault(label, []).append(time.perf_counter() - t)
        after = _cpu_seconds(proc.pid)
        if before is not None and after is not None:
            cpu.setdefault(label, []).append(after - before)
        order.append((kwargs["api_name"].strip("/"), label))
        return out

    info: dict = {"calibration_seconds": {}}
    for method in methods:
        start = time.perf_counter()
        client.predict(method_name=method, windows=args.windows, seqlen=args.seqlen, sparsity=0.5,
                       api_name="/calibrate")
        info["calibration_seconds"][method] = round(time.perf_counter() - start, 2)
        order.append(("calibrate", ""))
        print(f"calibrated {method} in {info['calibration_seconds'][method]:.1f} s", flush=True)
    n_runs = len(methods)
    for i in range(args.n):  # alternate so every call really re-cuts every run
        _status, alloc, *_rest = timed(f"cut, {n_runs} runs shown (all re-cut, overlay)",
                                       sparsity=0.3 if i % 2 else 0.6, pattern="unstructured", api_name="/cut")
    traces = json.loads(alloc["plot"])["data"] if isinstance(alloc, dict) else []
    info["overlay_traces"] = [t.get("name") for t in traces]
    if n_runs >= 2:
        a, b = methods[0], methods[1]
        layers = facts.get("layers", 1)
        for i in range(args.n):
            client.predict(sparsity=0.3 if i % 2 else 0.6, pattern="unstructured", api_name="/cut")
            order.append(("cut", ""))
            timed(f"compare {a} vs {b}, after a cut (all masks made and counted)", a, b, i % layers, "down",
                  api_name="/compare")
        for i in range(args.n):
            timed(f"compare {a} vs {b}, another matrix (counts kept)", a, b, (i + 1) % layers, "q" if i % 2 else "o",
                  api_name="/compare")
    start = time.perf_counter()
    path, note = client.predict(api_name="/save_session")
    order.append(("save_session", ""))
    info["save_seconds"] = round(time.perf_counter() - start, 2)
    path = path["path"] if isinstance(path, dict) else path
    keep = tempfile.mktemp(prefix="explorer-session-", suffix=".safetensors")
    shutil.copyfile(path, keep)  # the server's copy goes with the session
    info["session_file"], info["session_bytes"] = keep, os.path.getsize(keep)
    info["save_note"] = note
    from gradio_client import handle_file

    reopen, server = [], []
    for _ in range(args.reopen):
        other = Client(url, verbose=False, download_files=False, ssl_verify=ssl.create_default_context())
        other.predict(spec, args.dtype, "cpu", api_name="/load_model")
        start = time.perf_counter()
        status, *_views = other.predict(file=handle_file(keep), api_name="/open_session")
        reopen.append(round(time.perf_counter() - start, 2))
        m = re.search(r"in ([\d.]+) s\.", status)
        server.append(float(m.group(1)) if m else None)
        other.close()
    info["reopen_seconds"], info["reopen_server_seconds"] = reopen, server
    return info


# ---------------------------------------------------------------- the browser

# The signature of what the page shows: the allocation chart's title (it names the achieved
# sparsity) and the heatmap's mask panel (its base64 grid, as given to plotly.js), plus whether
# plotly has drawn both. Gradio re-creates a plot's element on every new value, so the
# elements are looked up afresh each time.
_SIGNATURE = """() => {
    const plot = (id) => document.querySelector('#' + id + ' .js-plotly-plot');
    const alloc = plot('alloc-plot'), heat = plot('heat-plot');
    const drawn = (el) => !!(el && el._fullLayout && el.querySelector('.main-svg'));
    const z = heat && heat.data && heat.data.length ? heat.data[heat.data.length - 1].z : null;
    return {title: (alloc && alloc.layout && alloc.layout.title && alloc.layout.title.text) || '',
            heat: z ? (z.bdata || JSON.stringify(z)) : '', drawn: drawn(alloc) && drawn(heat)};
}"""

# Polled every animation frame: done (the in-page time) once both plots show something other
# than `before` and are drawn.
_REDRAWN = """([before, sig]) => {
    const now = (""" + _SIGNATURE + """)();
    if (!now.drawn || now.title === before.title || now.heat === before.heat) return false;
    return performance.now();
}"""


# The release moment, on the page's clock: the slider's number box losing focus fires gradio's
# release event (a capture listener runs first).
_ON_RELEASE = """() => {
    window.__released = null;
    const box = document.querySelector('input[aria-label="number input for Target sparsity"]');
    box.addEventListener('blur', () => { window.__released = performance.now(); }, {capture: true, once: true});
}"""


def _descendants_cpu_seconds(root: int) -> float:
    """User + system CPU time of every process descended from `root` (here: chromium's)."""
    parent, cpu = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid, seconds in cpu.items():
        p = parent.get(pid)
        while p and p != root:
            p = parent.get(p)
        if p == root:
            total += seconds
    return total


def _browser_timings(url: str, spec: str, args, session_file: str | None = None) -> dict:
    import shutil

    from playwright.sync_api import Error as PlaywrightError, expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("--browser needs Debian chromium on PATH (scripts/setup.sh --browser)")
    status = "[data-testid=markdown].status"
    samples, cpu, timeouts = [], [], 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url)
            chooser = page.get_by_label("Model", exact=True)
            chooser.click()
            chooser.fill(spec)
            chooser.press("Enter")
            page.get_by_role("button", name="Load", exact=True).click()
            expect(page.locator(status)).to_contain_text("Loaded", timeout=300_000)
            if session_file:  # the runs come from the saved session, as a presenter's would
                page.get_by_role("tab", name="Export").click()
                page.locator("#session-in input[type=file]").set_input_files(session_file)
                page.wait_for_timeout(1000)
                page.get_by_role("button", name="Open session").click()
                expect(page.locator(status)).to_contain_text("Opened", timeout=900_000)
                page.get_by_role("tab", name="Live view").click()
            else:
                page.get_by_label("windows", exact=True).fill(str(args.windows))
                page.get_by_label("seqlen", exact=True).first.fill(str(args.seqlen))
                page.get_by_role("button", name="Calibrate").click()
                expect(page.locator(status)).to_contain_text("Calibrated", timeout=900_000)
            page.wait_for_function("(sig) => (" + _SIGNATURE + ")().drawn", arg=None, timeout=60_000)
            number = page.get_by_label("number input for Target sparsity")
            try:  # every sample moves the slider away from where it is (a reopened session sets it)
                offset = 1 if abs(float(number.input_value()) - 0.6) < 1e-9 else 0
            except ValueError:
                offset = 0
            for i in range(args.n + 1):  # the first is a warm-up, not counted
                sparsity = 0.3 if (i + offset) % 2 else 0.6
                before = page.evaluate(_SIGNATURE)
                page.evaluate(_ON_RELEASE)
                cpu0 = _descendants_cpu_seconds(os.getpid())
                number.fill(str(sparsity))
                number.press("Tab")  # leaving the box releases the slider
                try:
                    t1 = page.wait_for_function(_REDRAWN, arg=[before, None], polling="raf",
                                                timeout=1000 * args.sample_timeout).json_value()
                except PlaywrightError:
                    timeouts += 1
                    print(f"browser sample {i}: no redraw within {args.sample_timeout:.0f} s", file=sys.stderr)
                    page.wait_for_timeout(1000)
                    continue
                t0 = page.evaluate("() => window.__released")
                page.wait_for_timeout(300)  # let plotly's follow-up (a resize after 100 ms) finish
                if i:
                    samples.append((t1 - t0) / 1000)
                    cpu.append(_descendants_cpu_seconds(os.getpid()) - cpu0)
        finally:
            browser.close()
    return {"samples": samples, "cpu": cpu, "timeouts": timeouts}


if __name__ == "__main__":
    main()
