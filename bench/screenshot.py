"""Regenerate docs/screenshot.png: the real explorer, driven in headless chromium.

    GRADIO_ANALYTICS_ENABLED=False python -m bench.screenshot [--model smollm2-135m] [--out docs/screenshot.png]

Starts the app, loads the model through the UI, calibrates Wanda on a few short windows,
sets the sparsity slider and takes a full-page screenshot. Needs chromium on PATH (or
--chromium) and the playwright python package; the model must be loadable offline
(smollm2-135m from ~/.cache/pruning-explorer).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
STATUS = "[data-testid=markdown].status"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args(argv)
    if not args.chromium:
        ap.error("no chromium found: pass --chromium PATH")

    from playwright.sync_api import expect, sync_playwright

    from explorer.app import build_app, launch_kwargs

    t0 = time.perf_counter()
    demo = build_app(model=args.model, autoload=False)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.set_default_timeout(120_000)
                expect.set_options(timeout=120_000)
                page.goto(f"http://127.0.0.1:{port}/")
                chooser = page.get_by_label("Model", exact=True)
                chooser.click()
                chooser.fill(args.model)
                chooser.press("Enter")
                page.get_by_role("button", name="Load", exact=True).click()
                expect(page.locator(STATUS)).to_contain_text("Loaded")
                print(f"loaded {args.model} after {time.perf_counter() - t0:.1f} s")

                if args.method != "wanda":
                    method = page.get_by_label("Method", exact=True)
                    method.click()
                    page.get_by_role("option", name=re.compile(rf"\({re.escape(args.method)}\)")).click()
                page.get_by_label("windows", exact=True).fill(str(args.windows))
                page.get_by_label("seqlen", exact=True).first.fill(str(args.seqlen))
                page.get_by_role("button", name="Calibrate").click()
                expect(page.locator(STATUS)).to_contain_text("Calibrated")
                print(f"calibrated after {time.perf_counter() - t0:.1f} s")

                number = page.get_by_label("number input for Target sparsity")
                number.fill(f"{args.sparsity:g}")
                number.press("Tab")  # leaving the box fires `release`: the app re-cuts
                page.wait_for_function(
                    """([sel, target]) => {
                        const m = /achieved sparsity\\s*([\\d.]+)%/.exec(document.querySelector(sel)?.innerText || "");
                        return m && Math.abs(parseFloat(m[1]) / 100 - target) <= 0.02; }""",
                    arg=[STATUS, args.sparsity])
                page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 3")
                page.mouse.move(0, 0)  # no hover labels in the picture
                page.wait_for_timeout(1000)  # let plotly finish its transitions
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
            finally:
                browser.close()
    finally:
        demo.close()
    print(f"wrote {args.out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
