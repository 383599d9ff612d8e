"""Building and serving the Dash app."""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import dash
import flask

from .callbacks import register_callbacks
from .data import RunCache
from .layout import build_layout

ASSETS = Path(__file__).with_name("assets")
LOOPBACK = "127.0.0.1"
# Host names a page served from this machine is reached by. Anything else in a Host header
# is a DNS-rebinding page (or a proxy the user has to name with allowed_hosts).
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def create_app(
    logdir: str | Path | RunCache,
    *,
    interval_ms: int = 2000,
    max_points: int = 2000,
    allowed_hosts: Iterable[str] = (),
) -> dash.Dash:
    """The dashboard for every run under ``logdir`` (read-only), as a Dash app.

    Args:
        logdir: the log directory (runs that appear in it later are picked up), or a
            :class:`~collapsewatch.dashboard.data.RunCache` over one, which the app then
            reads through and may share (with a report, another app, a test); the app
            never opens a run any other way.
        interval_ms: how often the page polls for new rows, in milliseconds.
        max_points: the point budget per plotted series (longer runs are decimated).
        allowed_hosts: host names besides 127.0.0.1, localhost and ::1 that requests may
            name in their ``Host`` header (and callback POSTs in their ``Origin``), e.g. the
            name of a proxy in front of it; ``"*"`` allows any. Other requests get 403, so
            a web page cannot read the runs through DNS rebinding.

    Raises:
        FileNotFoundError: the log directory does not exist.
    """
    if int(interval_ms) < 100:
        raise ValueError(f"interval_ms must be at least 100, got {interval_ms}")
    if int(max_points) < 10:
        raise ValueError(f"max_points must be at least 10, got {max_points}")
    if isinstance(logdir, RunCache):
        cache = logdir
    else:
        # The run list is re-read at most once per two polls, and at least every second; a
        # run's rows likewise, so the callbacks of one poll (panels, embedding controls)
        # share one refresh even when a poll of a 1,000,000-row run takes half a second.
        ttl = min(1.0, interval_ms / 2000)
        cache = RunCache(logdir, list_ttl=ttl, min_refresh=ttl)
    if not cache.logdir.is_dir():
        raise FileNotFoundError(f"log directory {str(cache.logdir)!r} does not exist")
    app = dash.Dash(
        __name__,
        title="collapsewatch",
        # No flickering "Updating..." tab title on every poll; Dash documents None for
        # that, though its hint says str.
        update_title=None,  # type: ignore[arg-type]
        assets_folder=str(ASSETS),
        serve_locally=True,  # no CDN: works offline and leaks nothing
        # Explicit, so environment variables cannot switch these on: the MCP endpoint
        # would expose the callbacks to any local tool, and nothing here needs it.
        enable_mcp=False,
        suppress_callback_exceptions=False,
    )
    _refuse_foreign_hosts(app.server, allowed_hosts)
    # The header names the log directory as the user gave it ("runs/", not an absolute path).
    shown = str(cache.logdir if isinstance(logdir, RunCache) else logdir)
    app.layout = build_layout(shown, int(interval_ms))
    register_callbacks(app, cache, int(max_points))
    return app


def _refuse_foreign_hosts(server: flask.Flask, allowed_hosts: Iterable[str]) -> None:
    """403 for a request whose Host (or, on a POST, Origin) names a host not allowed."""
    if isinstance(allowed_hosts, str):
        allowed_hosts = [allowed_hosts]
    allowed = {*LOCAL_HOSTS, *(_hostname(h) or h.lower() for h in allowed_hosts)}
    if "*" in allowed:
        return

    @server.before_request
    def _check_host() -> flask.Response | None:
        request = flask.request
        host = _hostname(request.host)
        if host not in allowed:
            return _forbidden(f"Host {request.host[:100]!r} is not allowed")
        origin = request.headers.get("Origin")
        # Browsers send Origin with every POST; tools like curl send none (Host suffices).
        if (
            request.method not in SAFE_METHODS
            and origin is not None
            and _hostname(origin, url=True) not in allowed
        ):
            return _forbidden(f"Origin {origin[:100]!r} is not allowed")
        return None


def _hostname(text: str, *, url: bool = False) -> str | None:
    """The lowercase host of a Host header ("[::1]:8050" → "::1") or of an Origin URL."""
    try:
        return urlsplit(text if url else f"//{text}").hostname
    except ValueError:
        return None


def _forbidden(reason: str) -> flask.Response:
    return flask.Response(
        f"{reason}: the collapsewatch dashboard answers local names only; serve it with "
        "--allow-host NAME (create_app(..., allowed_hosts=[NAME])) to allow another.\n",
        status=403,
        mimetype="text/plain",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    logdir: str | Path,
    *,
    host: str = LOOPBACK,
    port: int = 8050,
    interval_ms: int = 2000,
    allowed_hosts: Iterable[str] = (),
) -> None:
    """Serve the dashboard for ``logdir`` until interrupted (blocking).

    Binds 127.0.0.1 unless told otherwise. The host is passed to Dash explicitly, so a
    ``HOST`` environment variable (common in containers) cannot widen it, and Dash debug
    mode — whose Werkzeug debugger runs code sent from the browser — is never on. Requests
    must name a local host, ``host`` itself (when it is one address) or one of
    ``allowed_hosts`` (see :func:`create_app`).
    """
    named = [] if host in ("0.0.0.0", "::", "") else [host]
    app = create_app(logdir, interval_ms=interval_ms, allowed_hosts=[*named, *allowed_hosts])
    if not _is_loopback(host):
        print(
            f"collapsewatch dashboard: serving on {host}: anyone who can reach this address "
            "can read these runs (there is no authentication)",
            file=sys.stderr,
        )
    app.run(host=host, port=int(port), debug=False)
