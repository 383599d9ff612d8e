"""create_app / serve: safe defaults, and the core package never importing Dash."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import dash
import pytest
from collapsewatch.dashboard import create_app, serve


def test_create_app_returns_a_dash_app_with_debug_off(logdir: Path) -> None:
    app = create_app(logdir)
    assert isinstance(app, dash.Dash)
    assert app.title == "collapsewatch"
    assert app.server.debug is False
    assert not app.config.get("suppress_callback_exceptions")


def test_create_app_validates_its_arguments(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        create_app(tmp_path / "missing")
    with pytest.raises(ValueError, match="interval_ms"):
        create_app(tmp_path, interval_ms=5)
    with pytest.raises(ValueError, match="max_points"):
        create_app(tmp_path, max_points=1)


def _capture_run(monkeypatch: pytest.MonkeyPatch) -> dict:
    seen: dict = {}

    def fake_run(self, *args, **kwargs):
        seen.update(kwargs, args=args)

    monkeypatch.setattr(dash.Dash, "run", fake_run)
    return seen


def test_serve_binds_loopback_explicitly_whatever_host_env_says(
    logdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("DASH_DEBUG", "true")
    seen = _capture_run(monkeypatch)
    serve(logdir, port=8123)
    assert seen == {"host": "127.0.0.1", "port": 8123, "debug": False, "args": ()}


def test_serve_warns_when_asked_to_bind_beyond_loopback(
    logdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    seen = _capture_run(monkeypatch)
    serve(logdir, host="0.0.0.0", port=8124, interval_ms=500)
    assert seen["host"] == "0.0.0.0" and seen["debug"] is False
    assert "no authentication" in capsys.readouterr().err
    serve(logdir, host="localhost")
    assert capsys.readouterr().err == ""


def test_importing_collapsewatch_does_not_import_dash() -> None:
    code = "import sys, collapsewatch; print('dash' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


def test_the_run_list_names_the_last_step_and_counts_the_recorded_ones(tmp_path: Path) -> None:
    from collapsewatch.dashboard.data import RunCache
    from collapsewatch.dashboard.layout import run_option

    from tests.dashboard.runs import write_run

    write_run(tmp_path, "sparse", steps=range(0, 600, 6))  # 100 rows, the last at step 594
    [entry] = RunCache(tmp_path).run_list().entries
    option = run_option(entry, "#000000", now=0.0)
    stats = option["label"].children[1].children[:3]
    last = stats[2]
    assert last.children[0].children == "last step" and last.children[1] == " 594"
    assert last.title == "100 recorded steps, the last at step 594"


def test_create_app_reads_through_the_cache_it_is_given(tmp_path: Path) -> None:
    from collapsewatch.dashboard.data import RunCache

    from tests.dashboard.runs import write_run

    write_run(tmp_path, "first", steps=range(10))
    # A run list that never expires: what the app shows is what this cache listed.
    shared = RunCache(tmp_path, list_ttl=math.inf)
    assert [e.run_id for e in shared.run_list().entries] == ["first.cwrun"]
    write_run(tmp_path, "second", steps=range(10))
    own, given = create_app(tmp_path), create_app(shared)
    assert _listed(own) == ["first.cwrun", "second.cwrun"]
    assert _listed(given) == ["first.cwrun"]
    with pytest.raises(FileNotFoundError, match="missing"):
        create_app(RunCache(tmp_path / "missing"))


def _listed(app: dash.Dash) -> list[str]:
    """The run ids the run-list callback offers, asked over HTTP as the page's first poll."""
    output = next(k for k in app.callback_map if "cw-run-list.options" in k)
    body = {
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
    response = app.server.test_client().post("/_dash-update-component", json=body)
    assert response.status_code == 200
    options = response.get_json()["response"]["cw-run-list"]["options"]
    return [option["value"] for option in options]
