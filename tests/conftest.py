"""Shared fixtures: a real headless Chromium through Playwright's Python API.

``browser`` (one per session) and ``page`` (a fresh 1400×1000 context per test) serve the
end-to-end dashboard tests and anything else that needs to render HTML. They use the system
Chromium (``/usr/bin/chromium``, or ``$COLLAPSEWATCH_CHROMIUM``); Playwright's own browser
downloads are never used. Without Chromium or Playwright the tests that use them skip,
unless ``COLLAPSEWATCH_REQUIRE_BROWSER=1`` (set in CI), which makes them fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import CHROMIUM, CHROMIUM_ARGS

VIEWPORT = {"width": 1400, "height": 1000}
DEFAULT_TIMEOUT_MS = 15_000


def browser_required() -> bool:
    """Whether a missing browser is a failure (CI) rather than a skip."""
    return os.environ.get("COLLAPSEWATCH_REQUIRE_BROWSER") == "1"


def _unavailable(reason: str) -> None:
    if browser_required():
        pytest.fail(f"{reason}, and COLLAPSEWATCH_REQUIRE_BROWSER=1", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless Chromium ``playwright.sync_api.Browser`` shared by the whole session."""
    if not Path(CHROMIUM).is_file():
        _unavailable(f"no Chromium at {CHROMIUM}")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    # The 5 s default is tight on a busy 2-core CI machine; waits still end as soon as met.
    expect.set_options(timeout=DEFAULT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        try:
            instance = playwright.chromium.launch(
                executable_path=CHROMIUM, args=list(CHROMIUM_ARGS)
            )
        except Exception as error:
            _unavailable(f"cannot launch Chromium at {CHROMIUM}: {error}")
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (its own context: no shared cookies or storage) with a 1400×1000 viewport."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(DEFAULT_TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()
