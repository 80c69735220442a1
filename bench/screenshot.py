"""Regenerate docs/screenshot.png: the real explorer comparing methods, driven in headless chromium.

    GRADIO_ANALYTICS_ENABLED=False python -m bench.screenshot [--model smollm2-135m] [--methods wanda,owl,unipruning]

Starts the app, loads the model through the UI, calibrates each method on a few short windows
(one run each), sets the sparsity slider (every run is re-cut), then opens the Compare masks tab
for the first two runs. Saves full-page screenshots of the Live view (the runs overlaid) and of
the Compare masks tab under assets/, and docs/screenshot.png (the README's): the top of the Live
view (slider, runs, overlaid allocation) above the comparison (agreement map, overlap per
matrix). Needs chromium on PATH (or --chromium) and the playwright python package; the model
must be loadable offline (smollm2-135m from ~/.cache/pruning-explorer).
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


def _box(page, selector: str) -> dict:
    """An element's box in page coordinates (what a full-page clip takes)."""
    box = page.locator(selector).first.bounding_box()  # relative to the viewport as scrolled now
    if box is None:
        raise SystemExit(f"{selector} is not on the page")
    sx, sy = page.evaluate("() => [window.scrollX, window.scrollY]")
    return {**box, "x": box["x"] + sx, "y": box["y"] + sy}


def _stack(parts: list[Path], out: Path, gap: int = 12) -> None:
    """Images one above the other on the page's background colour."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in parts]
    width = max(im.width for im in images)
    height = sum(im.height for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), images[0].getpixel((2, 2)))
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    from playwright.sync_api import expect, sync_playwright

    from explorer.app import build_app, launch_kwargs

    t0 = time.perf_counter()
    demo = build_app(model=args.model, autoload=False)
    demo.queue(default_concurrency_limit=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs())
    live_png, compare_png = args.assets / "screenshot-runs.png", args.assets / "screenshot-compare.png"
    parts = [args.out.with_suffix(".part1.png"), args.out.with_suffix(".part2.png")]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.set_default_timeout(300_000)
                expect.set_options(timeout=300_000)
                _load_and_calibrate(page, expect, port, args, methods, t0)
                _shoot_live(page, args, methods, live_png, parts[0])
                _shoot_compare(page, args, methods, compare_png, parts[1])
            finally:
                browser.close()
        _stack(parts, args.out)
    finally:
        for part in parts:
            part.unlink(missing_ok=True)
        demo.close()
    print(f"wrote {args.out}, {live_png}, {compare_png} in {time.perf_counter() - t0:.1f} s")
    return 0


def _parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="wanda,owl,unipruning", help="one run each; the first two are compared")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--block", type=int, default=3, help="the block whose matrix the agreement map shows")
    ap.add_argument("--matrix", default="o", help="the matrix type the agreement map shows")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "screenshot.png")
    ap.add_argument("--assets", type=Path, default=REPO / "assets")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = ap.parse_args(argv)
    if not args.chromium:
        ap.error("no chromium found: pass --chromium PATH")
    return args


def _load_and_calibrate(page, expect, port: int, args, methods: list[str], t0: float) -> None:
    """Load the model through the page, then calibrate one run per method."""
    page.goto(f"http://127.0.0.1:{port}/")
    chooser = page.get_by_label("Model", exact=True)
    chooser.click()
    chooser.fill(args.model)
    chooser.press("Enter")
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.locator(STATUS)).to_contain_text("Loaded")
    print(f"loaded {args.model} after {time.perf_counter() - t0:.1f} s")

    page.get_by_label("windows", exact=True).fill(str(args.windows))
    page.get_by_label("seqlen", exact=True).first.fill(str(args.seqlen))
    for method in methods:
        picker = page.get_by_label("Method", exact=True)
        picker.click()
        page.get_by_role("option", name=re.compile(rf"\({re.escape(method)}\)")).click()
        page.get_by_role("button", name="Calibrate").click()
        expect(page.locator(STATUS)).to_contain_text(f"Calibrated {method}")
        print(f"calibrated {method} after {time.perf_counter() - t0:.1f} s")


def _shoot_live(page, args, methods: list[str], full: Path, part: Path) -> None:
    """Every run re-cut at the target sparsity: the whole page, and the status-to-allocation part."""
    number = page.get_by_label("number input for Target sparsity")
    number.fill(f"{args.sparsity:g}")
    number.press("Tab")  # leaving the box fires `release`: every shown run is re-cut
    page.wait_for_function(
        """([n, target]) => { const el = document.querySelector('#alloc-plot .js-plotly-plot');
            return el && el.data && el.data.length == n && el.layout.title.text.includes(target); }""",
        arg=[len(methods), f"target {args.sparsity:.0%}"])
    page.mouse.move(0, 0)  # no hover labels in the picture
    page.wait_for_timeout(1000)  # let plotly finish its transitions
    args.assets.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(full), full_page=True)
    top = _box(page, STATUS)
    bottom = _box(page, "#alloc-plot")
    page.screenshot(path=str(part), full_page=True,
                    clip={"x": bottom["x"] - 8, "y": top["y"] - 8, "width": bottom["width"] + 16,
                          "height": bottom["y"] + bottom["height"] - top["y"] + 16})


def _shoot_compare(page, args, methods: list[str], full: Path, part: Path) -> None:
    """The first two runs compared on one matrix: the whole page, and the summary-to-Jaccard part."""
    page.get_by_role("tab", name="Compare masks").click()
    # A and B are the first two runs already (the run lists' defaults)
    block = page.locator("#compare-block input[type=number]")
    block.fill(str(args.block))
    block.press("Tab")
    page.locator("#compare-matrix input").click()
    page.get_by_role("option", name=args.matrix, exact=True).click()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.wait_for_function(
        """(want) => { const el = document.querySelector('#agree-plot .js-plotly-plot');
            return el && el.layout && el.layout.title.text.includes(want); }""",
        arg=f"A = {methods[0]}, B = {methods[1]}")
    page.wait_for_function("() => document.querySelector('#jaccard-plot .js-plotly-plot')")
    page.mouse.move(0, 0)
    page.wait_for_timeout(1000)
    page.screenshot(path=str(full), full_page=True)
    top = _box(page, "#compare-summary")
    bottom = _box(page, "#jaccard-plot")
    page.screenshot(path=str(part), full_page=True,
                    clip={"x": bottom["x"] - 8, "y": top["y"] - 8, "width": bottom["width"] + 16,
                          "height": bottom["y"] + bottom["height"] - top["y"] + 16})
    print(page.locator("#compare-summary").inner_text())


if __name__ == "__main__":
    raise SystemExit(main())
