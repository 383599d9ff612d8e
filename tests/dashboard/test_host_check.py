"""DNS rebinding: the dashboard answers local Host names only, unless told to allow more."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from collapsewatch.dashboard import create_app

from collapsewatch.store import RunWriter, run_path
from tests.browser import serve_in_thread

CALLBACK = "/_dash-update-component"


@pytest.fixture
def one_run(logdir: Path) -> Path:
    writer = RunWriter(run_path(logdir, "secret-run"), {"margin": 0.2})
    writer.append_metrics(pd.DataFrame({"step": [0, 1], "time": [1.0, 2.0], "loss": [0.1, 0.2]}))
    writer.close()
    return logdir


def _raw(url: str, path: str, host: str, method: str = "GET", headers=None, body=None):
    """One HTTP request with exactly this Host header, from a raw client."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.putrequest(method, path, skip_host=True)
    connection.putheader("Host", host)
    for name, value in (headers or {}).items():
        connection.putheader(name, value)
    data = json.dumps(body).encode() if body is not None else b""
    if body is not None:
        connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(data)))
    connection.endheaders(data)
    response = connection.getresponse()
    try:
        return response.status, response.read().decode()
    finally:
        connection.close()


def _callback_body(app) -> dict:
    """The run-list callback's request, as the page sends it on its first poll."""
    output = next(k for k in app.callback_map if "cw-run-list.options" in k)
    return {
        "output": output,
        "outputs": [
            {"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
            for part in output.strip(".").split("...")
        ],
        "inputs": [
            {"id": "cw-interval", "property": "n_intervals", "value": 1},
            {"id": "cw-run-list", "property": "value", "value": None},
        ],
        "state": [
            {"id": "cw-selection-ready", "property": "data", "value": False},
            {"id": "cw-list-fingerprint", "property": "data", "value": None},
        ],
        "changedPropIds": ["cw-interval.n_intervals"],
    }


def test_a_foreign_host_gets_403_from_a_real_server(one_run: Path) -> None:
    app = create_app(one_run)
    with ExitStack() as stack:
        url = stack.enter_context(serve_in_thread(app))
        port = urlsplit(url).port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            status, body = _raw(url, "/_dash-layout", host)
            assert status == 200, host
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.evil:{port}", ""):
            status, body = _raw(url, "/_dash-layout", host)
            assert status == 403, host
            assert "secret-run" not in body and "local names only" in body
        # The callback that returns the run list is refused too.
        status, body = _raw(
            url, CALLBACK, f"attacker.example:{port}", "POST", body=_callback_body(app)
        )
        assert status == 403 and "secret-run" not in body


def test_a_callback_post_from_a_foreign_origin_gets_403(one_run: Path) -> None:
    app = create_app(one_run)
    client = app.server.test_client()
    body = _callback_body(app)
    local = {"Host": "127.0.0.1:8050"}
    refused = client.post(CALLBACK, json=body, headers={**local, "Origin": "http://evil.example"})
    assert refused.status_code == 403 and b"Origin" in refused.data
    assert client.post(CALLBACK, json=body, headers={**local, "Origin": "null"}).status_code == 403
    same = client.post(CALLBACK, json=body, headers={**local, "Origin": "http://127.0.0.1:8050"})
    assert same.status_code == 200 and b"secret-run" in same.data
    assert client.post(CALLBACK, json=body, headers=local).status_code == 200  # curl: no Origin


def test_allowed_hosts_lets_a_named_proxy_through(one_run: Path) -> None:
    client = create_app(one_run, allowed_hosts=["Dash.Example.org"]).server.test_client()
    assert client.get("/", headers={"Host": "dash.example.org"}).status_code == 200
    assert client.get("/", headers={"Host": "dash.example.org:443"}).status_code == 200
    assert client.get("/", headers={"Host": "other.example.org"}).status_code == 403
    anyone = create_app(one_run, allowed_hosts=["*"]).server.test_client()
    assert anyone.get("/", headers={"Host": "other.example.org"}).status_code == 200


def test_the_cli_flag_reaches_the_app(one_run: Path) -> None:
    from collapsewatch.cli import build_parser

    args = build_parser().parse_args(
        ["dashboard", str(one_run), "--allow-host", "a.example", "--allow-host", "b.example"]
    )
    assert args.allow_host == ["a.example", "b.example"]
    assert build_parser().parse_args(["dashboard", str(one_run)]).allow_host == []
    help_text = subprocess.run(
        [sys.executable, "-m", "collapsewatch", "dashboard", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--allow-host NAME" in help_text
