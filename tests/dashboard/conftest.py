"""Fixtures for the dashboard tests: a log directory and a live server on a free port."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.browser import serve_in_thread


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    path = tmp_path / "runs"
    path.mkdir()
    return path


@pytest.fixture
def serve_dashboard() -> Iterator[Callable[..., str]]:
    """``serve_dashboard(logdir, interval_ms=1000)`` starts the app on 127.0.0.1 and returns
    its URL; every server started is stopped after the test.

    Not faster by default: Dash drops a callback's answer when the next poll fires first,
    so on a loaded machine a figure slower to build than the poll would never show."""
    from collapsewatch.dashboard import create_app

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log in test output
    with ExitStack() as stack:

        def start(root: Path, interval_ms: int = 1000, max_points: int = 2000) -> str:
            app = create_app(root, interval_ms=interval_ms, max_points=max_points)
            return stack.enter_context(serve_in_thread(app))

        yield start
