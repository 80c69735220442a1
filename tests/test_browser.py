"""The explorer in a real browser: Debian chromium driven by Playwright against the running app.

Load a tiny model through the model chooser, calibrate, move the sparsity slider, check that the
allocation chart and the status follow, and download an export. Screenshots of every step go to
$BROWSER_ARTIFACTS (default tests/artifacts/browser/, git-ignored).

Run with: pytest -m browser tests/test_browser.py
"""
from __future__ import annotations

import json
import os
import re

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

pytestmark = pytest.mark.browser

from browser_support import STATUS, chromium_page, expect  # noqa: E402 (skips without chromium)

TIMEOUT_MS = 30_000


def _allocation_bars(page) -> list:
    """The y values of every trace of the allocation chart (the first plotly figure on the page)."""
    plot = page.locator(".js-plotly-plot").first
    expect(plot).to_be_attached(timeout=TIMEOUT_MS)
    return json.loads(plot.evaluate("el => JSON.stringify((el.data || []).map(t => Array.from(t.y || [])))"))


def _achieved(page) -> float:
    text = page.locator(STATUS).inner_text()
    m = re.search(r"achieved sparsity\s*([\d.]+)%", text)
    assert m, f"no achieved sparsity in the status: {text!r}"
    return float(m.group(1)) / 100


def _wait_achieved(page, target: float, tol: float = 0.02) -> float:
    """Wait until the status reports an achieved sparsity within `tol` of `target`."""
    page.wait_for_function(
        """([sel, target, tol]) => {
            const m = /achieved sparsity\\s*([\\d.]+)%/.exec(document.querySelector(sel)?.innerText || "");
            return m && Math.abs(parseFloat(m[1]) / 100 - target) <= tol; }""",
        arg=[STATUS, target, tol], timeout=TIMEOUT_MS)
    return _achieved(page)


def test_browser_flow(browser_app_url_default_model, tiny_llama_dir, browser_artifacts):
    shots = iter(range(1, 100))

    def shot(page, name: str) -> None:
        page.screenshot(path=str(browser_artifacts / f"{next(shots):02d}-{name}.png"), full_page=True)

    with chromium_page(shot, TIMEOUT_MS, viewport={"width": 1400, "height": 1000}, accept_downloads=True) as page:
        page.goto(browser_app_url_default_model)
        expect(page.get_by_role("button", name="Calibrate")).to_be_visible()
        shot(page, "opened")

        # pick the model: type the folder into the chooser (custom values allowed), then Load
        chooser = page.get_by_label("Model", exact=True)
        chooser.click()
        chooser.fill(str(tiny_llama_dir))
        chooser.press("Enter")
        page.get_by_role("button", name="Load", exact=True).click()
        expect(page.locator(STATUS)).to_contain_text("Loaded", timeout=TIMEOUT_MS)
        expect(page.locator(STATUS)).to_contain_text("llama")
        shot(page, "loaded")

        # calibrate quickly: few short windows
        page.get_by_label("windows", exact=True).fill("4")
        page.get_by_label("seqlen", exact=True).first.fill("32")
        page.get_by_role("button", name="Calibrate").click()
        expect(page.locator(STATUS)).to_contain_text("Calibrated", timeout=60_000)
        assert abs(_achieved(page) - 0.5) < 0.02
        expect(page.locator(".js-plotly-plot").first).to_be_visible()
        before = _allocation_bars(page)
        assert before and any(before), "the allocation chart has no bars after calibrating"
        shot(page, "calibrated")

        # move the sparsity: type into the slider's number box; leaving it fires `release`
        number = page.get_by_label("number input for Target sparsity")
        number.fill("0.3")
        number.press("Tab")
        _wait_achieved(page, 0.3)
        page.wait_for_function(
            "(before) => { const el = document.querySelector('.js-plotly-plot');"
            " return el && el.data && JSON.stringify(el.data.map(t => Array.from(t.y || []))) !== before; }",
            arg=json.dumps(before), timeout=TIMEOUT_MS)
        after = _allocation_bars(page)
        assert after != before
        assert max(max(t) for t in after if t) < max(max(t) for t in before if t)
        shot(page, "slider-0.3")

        # and with the keyboard on the range input (pointerup fires release on a real drag;
        # here we nudge with arrows, then blur the number box to release)
        rng = page.get_by_label("range slider for Target sparsity")
        rng.focus()
        for _ in range(10):
            rng.press("ArrowRight")
        expect(number).to_have_value(re.compile(r"^0\.4"))
        rng.dispatch_event("pointerup")
        _wait_achieved(page, 0.4)
        shot(page, "slider-0.4")

        # export the masks and download the file
        page.get_by_role("tab", name="Export").click()
        page.get_by_role("button", name="Mask file (.safetensors)").click()
        link = page.locator("a[download]").first  # the only file shown so far: the masks
        expect(link).to_be_visible(timeout=TIMEOUT_MS)
        shot(page, "exported")
        with page.expect_download(timeout=TIMEOUT_MS) as info:
            link.click()
        download = info.value
        assert download.suggested_filename.endswith(".safetensors"), download.suggested_filename
        saved = browser_artifacts / download.suggested_filename
        download.save_as(saved)
        assert saved.stat().st_size > 0
        print(f"downloaded {saved} ({saved.stat().st_size} bytes)")
