"""Two methods compared in a real browser: Debian chromium driven by Playwright against the app.

Calibrate Wanda and magnitude on a tiny model through the page, check that the allocation chart
overlays two traces, that the sparsity slider moves both, and that the Compare masks tab draws
the agreement map and the overlap heatmap. Screenshots go to $BROWSER_ARTIFACTS (default
tests/artifacts/browser/, git-ignored).

Run with: pytest -m browser tests/test_browser_compare.py
"""
from __future__ import annotations

import json
import os
import re

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

pytestmark = pytest.mark.browser

from browser_support import STATUS, chromium_page, expect  # noqa: E402 (skips without chromium)

TIMEOUT_MS = 60_000

# the traces of a plot (by its elem_id): name and y values
TRACES = """(id) => { const el = document.querySelector('#' + id + ' .js-plotly-plot');
    return el && el.data ? JSON.stringify(el.data.map(t => ({name: t.name || '', type: t.type,
        y: Array.from(t.y || [])}))) : null; }"""


def _traces(page, elem_id: str) -> list[dict]:
    text = page.evaluate(TRACES, elem_id)
    return json.loads(text) if text else []


def _calibrate(page, method: str) -> None:
    chooser = page.get_by_label("Method", exact=True)
    chooser.click()
    page.get_by_role("option", name=re.compile(rf"\({re.escape(method)}\)")).click()
    # the method's change event rebuilds the parameter widgets: let it land before filling and
    # clicking (on a busy machine a click made before it was lost)
    expect(page.locator(".method-info").first).to_contain_text(re.compile(re.escape(method), re.I),
                                                               timeout=TIMEOUT_MS)
    page.get_by_label("windows", exact=True).fill("4")
    page.get_by_label("seqlen", exact=True).first.fill("32")
    page.get_by_role("button", name="Calibrate").click()
    expect(page.locator(STATUS)).to_contain_text(f"Calibrated **{method}**".replace("**", ""), timeout=TIMEOUT_MS)


def test_two_methods_overlaid_slider_moves_both_and_masks_compared(browser_app_url, tiny_llama_dir, browser_artifacts):
    def shot(page, name: str) -> None:
        page.screenshot(path=str(browser_artifacts / f"compare-{name}.png"), full_page=True)

    with chromium_page(shot, TIMEOUT_MS, viewport={"width": 1400, "height": 1000}) as page:
        page.goto(browser_app_url)
        page.get_by_role("button", name="Load", exact=True).click()
        expect(page.locator(STATUS)).to_contain_text("Loaded")

        _calibrate(page, "wanda")
        _calibrate(page, "magnitude")
        page.wait_for_function(f"() => {{ const t = ({TRACES})('alloc-plot'); return t && JSON.parse(t).length == 2; }}")
        before = _traces(page, "alloc-plot")
        assert [t["name"].split(":")[0] for t in before] == ["wanda", "magnitude"]
        assert all(t["name"].endswith("total 50.0%") or "total 49" in t["name"] for t in before), before
        expect(page.locator("#shown-runs")).to_contain_text("wanda")
        expect(page.locator("#shown-runs")).to_contain_text("magnitude")
        shot(page, "1-two-runs")

        number = page.get_by_label("number input for Target sparsity")
        number.fill("0.3")
        number.press("Tab")  # leaving the box releases the slider: every shown run is re-cut
        page.wait_for_function(
            f"() => {{ const t = ({TRACES})('alloc-plot'); if (!t) return false; const d = JSON.parse(t);"
            " return d.length == 2 && d.every(x => /total (29|30)\\.\\d%/.test(x.name)); }")
        after = _traces(page, "alloc-plot")
        assert all(max(a["y"]) < max(b["y"]) for a, b in zip(after, before))  # both moved down
        expect(page.locator(STATUS)).to_contain_text("Shown with it: wanda")
        shot(page, "2-slider-moves-both")

        page.get_by_role("tab", name="Compare masks").click()
        page.get_by_role("button", name="Compare", exact=True).click()
        page.wait_for_function(
            "() => { const el = document.querySelector('#agree-plot .js-plotly-plot');"
            " return el && el.data && el.data.length == 2 && el.data[0].type == 'heatmap'; }")
        page.wait_for_function(
            "() => { const el = document.querySelector('#jaccard-plot .js-plotly-plot');"
            " return el && el.data && el.data.length == 1; }")
        expect(page.locator("#compare-summary")).to_contain_text("Whole model: Jaccard")
        title = page.evaluate("() => document.querySelector('#agree-plot .js-plotly-plot').layout.title.text")
        assert "A = wanda, B = magnitude" in title and "Jaccard" in title, title
        page.mouse.move(0, 0)
        shot(page, "3-masks-compared")
