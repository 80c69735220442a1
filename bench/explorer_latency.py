"""Latency of the explorer's slider (the /cut handler) through gradio_client.

    python bench/explorer_latency.py                      # a tiny random Llama (seconds)
    python bench/explorer_latency.py --model smollm2-135m --windows 16 --seqlen 256
    python bench/explorer_latency.py --model smollm2-135m --windows 16 --seqlen 256 --browser

Starts the app in-process on a free port, loads the model, calibrates once, then times N cuts
at alternating sparsities (each a real re-cut) and N redraws of the matrix view. Prints a
table and writes bench/results/explorer_latency.json. With --browser it also opens the app in
Debian chromium (Playwright), calibrates through the page, and times slider release -> the
allocation chart and the heatmap redrawn in the page (end to end, what a user sees).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: a tiny random Llama)")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("-n", type=int, default=20, help="timed calls per handler")
    parser.add_argument("--browser", action="store_true", help="also time the slider end to end in chromium")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "explorer_latency.json"))
    args = parser.parse_args(argv)

    from gradio_client import Client

    from explorer.app import build_app

    spec = args.model or _tiny_folder()
    demo = build_app(model=spec, autoload=False)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        start = time.perf_counter()
        facts = client.predict(spec, "float32", "cpu", api_name="/load_model")[0]
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        client.predict(method_name=args.method, windows=args.windows, seqlen=args.seqlen, sparsity=0.5,
                       api_name="/calibrate")
        calib_s = time.perf_counter() - start
        timings = {"cut (unstructured)": [], "cut (2:4)": [], "view (heatmap + histogram)": []}
        for i in range(args.n):
            sparsity = 0.3 if i % 2 else 0.6  # alternate so every call really re-cuts
            t = time.perf_counter()
            client.predict(sparsity=sparsity, pattern="unstructured", api_name="/cut")
            timings["cut (unstructured)"].append(time.perf_counter() - t)
        for i in range(args.n):
            t = time.perf_counter()
            client.predict(sparsity=0.5 + 0.01 * (i % 2), pattern="2:4", api_name="/cut")
            timings["cut (2:4)"].append(time.perf_counter() - t)
        for i in range(args.n):
            t = time.perf_counter()
            client.predict(block=i % facts["layers"], mtype="down", api_name="/view")
            timings["view (heatmap + histogram)"].append(time.perf_counter() - t)
        if args.browser:
            timings["browser: slider -> allocation + heatmap redrawn"] = _browser_timings(
                f"http://127.0.0.1:{port}/", spec, args)
    finally:
        demo.close()

    rows = {name: {"median_ms": 1000 * statistics.median(v), "p90_ms": 1000 * sorted(v)[int(0.9 * (len(v) - 1))],
                   "n": len(v)} for name, v in timings.items()}
    print(f"model {facts['model']} ({facts['parameters']:,} params), load {load_s:.1f} s, "
          f"calibrate ({args.method}, {args.windows}x{args.seqlen}) {calib_s:.1f} s")
    print(f"{'handler':32} {'median ms':>10} {'p90 ms':>10} {'n':>4}")
    for name, r in rows.items():
        print(f"{name:32} {r['median_ms']:10.1f} {r['p90_ms']:10.1f} {r['n']:4d}")
    result = {"model": facts["model"], "parameters": facts["parameters"], "method": args.method,
              "calibration": {"windows": args.windows, "seqlen": args.seqlen, "seconds": calib_s},
              "load_seconds": load_s, "handlers": rows, "note": "round trip through gradio_client, "
              "including plotly figure serialisation", "machine": {"python": platform.python_version(),
              "cpus": os.cpu_count(), "platform": platform.platform()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def _browser_timings(url: str, spec: str, args) -> list[float]:
    import shutil

    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("--browser needs Debian chromium on PATH (scripts/setup.sh --browser)")
    status = "[data-testid=markdown].status"
    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(600_000)
            page.goto(url)
            chooser = page.get_by_label("Model", exact=True)
            chooser.click()
            chooser.fill(spec)
            chooser.press("Enter")
            page.get_by_role("button", name="Load", exact=True).click()
            expect(page.locator(status)).to_contain_text("Loaded", timeout=300_000)
            page.get_by_label("windows", exact=True).fill(str(args.windows))
            page.get_by_label("seqlen", exact=True).first.fill(str(args.seqlen))
            page.get_by_role("button", name="Calibrate").click()
            expect(page.locator(status)).to_contain_text("Calibrated", timeout=600_000)
            number = page.get_by_label("number input for Target sparsity")
            # plotly.js keeps typed arrays as given in el.data; the decoded grid is in _fullData
            total = ("const sumZ = (el) => { const d = el && el._fullData; const z = d && d[d.length - 1].z;"
                     " if (!z) return null; let s = 0; for (let i = 0; i < z.length; i++) { const r = z[i];"
                     " if (r && r.length !== undefined) { for (let j = 0; j < r.length; j++) s += r[j]; }"
                     " else s += r; } return s; };")
            heat_sum = "() => { " + total + " return sumZ(document.querySelectorAll('.js-plotly-plot')[1]); }"
            for i in range(args.n):
                sparsity = 0.3 if i % 2 else 0.6
                before_heat = page.evaluate(heat_sum)
                t = time.perf_counter()
                number.fill(str(sparsity))
                number.press("Tab")  # leaving the box releases the slider
                page.wait_for_function(
                    "([target, before]) => { " + total + """
                        const plots = document.querySelectorAll('.js-plotly-plot');
                        const title = plots[0]?.layout?.title?.text || '';
                        if (!title.includes('total ' + target)) return false;
                        const s = sumZ(plots[1]); return s !== null && s !== before; }""",
                    arg=[f"{sparsity * 100:.1f}%", before_heat], polling="raf")
                out.append(time.perf_counter() - t)
        finally:
            browser.close()
    return out


if __name__ == "__main__":
    main()
