"""What the browser tests share: Debian chromium driven by Playwright.

Importing this module skips the importing test module (pytest's module-level skip) where there
is no chromium on PATH, no playwright package or no gradio, so a test module starts with
`from browser_support import ...`. The app they drive is served by conftest's `serve_app`, and
their screenshots go to conftest's `browser_artifacts` folder.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (Debian: apt-get install chromium)", allow_module_level=True)
try:
    from playwright.sync_api import expect, sync_playwright  # noqa: F401 (expect: for the test modules)
except ImportError:
    pytest.skip("the playwright python package is not installed (pip install playwright)",
                allow_module_level=True)
pytest.importorskip("gradio")

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]
STATUS = "[data-testid=markdown].status"  # the status Markdown (its block wrapper has .status too)


@contextmanager
def chromium_page(shot, timeout_ms: int, **page_options):
    """A page of a headless chromium (the system's), closed afterwards, whose waits time out after
    `timeout_ms`; when the block fails, `shot(page, "failure")` screenshots the page first."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(**page_options)
            page.set_default_timeout(timeout_ms)
            try:
                yield page
            except Exception:
                try:
                    shot(page, "failure")
                except Exception:
                    pass
                raise
        finally:
            browser.close()
