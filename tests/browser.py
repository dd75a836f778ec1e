"""Headless Chromium for page tests: Debian's /usr/bin/chromium driven by Playwright (no browser download).

`open_page(path_or_url)` loads a page, waits for the network to go idle and returns `(page, console_errors)`;
the page stays open until the surrounding `chromium()` context ends. Where Chromium is absent, tests skip
locally and fail under CI (`.ci/run` installs Debian's chromium when it is missing).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Flags for a closed network: without the background-networking ones Chromium keeps trying to reach Google.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]


def chromium_path() -> str | None:
    for name in (os.environ.get("SYNTH7T_CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (found := shutil.which(name)):
            return found
    return None


def require_chromium() -> str:
    """The Chromium binary; skip the test where there is none (a failure under CI=true)."""
    path = chromium_path()
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("headless Chromium + playwright are required in CI (.ci/run installs them)")
        pytest.skip("no Chromium/playwright on this machine")
    return path


class Browser:
    def __init__(self, browser):
        self._browser = browser

    def open_page(self, target: str | Path, *, width: int = 1280, height: int = 900, wait_ms: int = 0):
        """Load a file path or URL; returns (page, console_errors) with errors collected while loading."""
        page = self._browser.new_page(viewport={"width": width, "height": height})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        url = target if isinstance(target, str) and "://" in target else Path(target).resolve().as_uri()
        page.goto(url, wait_until="load")
        if wait_ms:
            page.wait_for_timeout(wait_ms)
        return page, errors


@contextmanager
def chromium() -> Iterator[Browser]:
    exe = require_chromium()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield Browser(_Persistent(ctx))
        finally:
            ctx.close()


class _Persistent:
    """A persistent context (own empty profile dir) that hands out pages like a Browser."""

    def __init__(self, ctx):
        self._ctx = ctx

    def new_page(self, viewport):
        page = self._ctx.new_page()
        page.set_viewport_size(viewport)
        return page


def artifact_dir() -> Path:
    """Where screenshots are kept: $SYNTH7T_TEST_ARTIFACTS or tests/artifacts (git-ignored)."""
    path = Path(os.environ.get("SYNTH7T_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


DOCS_SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "assets" / "screenshots"


def screenshot(target, name: str, **kwargs) -> Path:
    """Screenshot of a page or locator into :func:`artifact_dir`; with ``SYNTH7T_DOCS_SCREENSHOTS=1`` also into the
    documentation site's ``docs/assets/screenshots/`` (how the site's screenshots are made: run the page tests
    with it set, then commit the images)."""
    path = artifact_dir() / name
    target.screenshot(path=str(path), **kwargs)
    if os.environ.get("SYNTH7T_DOCS_SCREENSHOTS", "") not in ("", "0"):
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS_SCREENSHOTS / name)
    return path
