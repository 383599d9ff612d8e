"""Building and serving the Dash app."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import dash

from .callbacks import register_callbacks
from .data import RunCache
from .layout import build_layout

ASSETS = Path(__file__).with_name("assets")
LOOPBACK = "127.0.0.1"


def create_app(logdir: str | Path, *, interval_ms: int = 2000, max_points: int = 2000) -> dash.Dash:
    """The dashboard for every run under ``logdir`` (read-only), as a Dash app.

    Args:
        logdir: the log directory; runs that appear in it later are picked up.
        interval_ms: how often the page polls for new rows, in milliseconds.
        max_points: the point budget per plotted series (longer runs are decimated).

    Raises:
        FileNotFoundError: ``logdir`` is not a directory.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"log directory {str(root)!r} does not exist")
    if int(interval_ms) < 100:
        raise ValueError(f"interval_ms must be at least 100, got {interval_ms}")
    if int(max_points) < 10:
        raise ValueError(f"max_points must be at least 10, got {max_points}")
    app = dash.Dash(
        __name__,
        title="collapsewatch",
        update_title=None,  # no flickering "Updating..." tab title on every poll
        assets_folder=str(ASSETS),
        serve_locally=True,  # no CDN: works offline and leaks nothing
        # Explicit, so environment variables cannot switch these on: the MCP endpoint
        # would expose the callbacks to any local tool, and nothing here needs it.
        enable_mcp=False,
        suppress_callback_exceptions=False,
    )
    cache = RunCache(root, list_ttl=min(1.0, interval_ms / 2000))
    app.layout = build_layout(str(logdir), int(interval_ms))
    register_callbacks(app, cache, int(max_points))
    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    logdir: str | Path, *, host: str = LOOPBACK, port: int = 8050, interval_ms: int = 2000
) -> None:
    """Serve the dashboard for ``logdir`` until interrupted (blocking).

    Binds 127.0.0.1 unless told otherwise. The host is passed to Dash explicitly, so a
    ``HOST`` environment variable (common in containers) cannot widen it, and Dash debug
    mode — whose Werkzeug debugger runs code sent from the browser — is never on.
    """
    app = create_app(logdir, interval_ms=interval_ms)
    if not _is_loopback(host):
        print(
            f"collapsewatch dashboard: serving on {host}: anyone who can reach this address "
            "can read these runs (there is no authentication)",
            file=sys.stderr,
        )
    app.run(host=host, port=int(port), debug=False)
