"""watch(dashboard=...) starts its dashboard without ever costing the training run."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from collapsewatch import dashboard_process
from collapsewatch.command import command_name
from collapsewatch.dashboard_process import RUNNING, start_dashboard, stop_dashboards


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held by a listening socket, as another dashboard would hold it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture(autouse=True)
def stopped() -> Iterator[None]:
    yield
    stop_dashboards()


@pytest.mark.slow
def test_a_busy_port_moves_to_the_next_free_one_and_the_url_comes_once_it_answers(
    logdir: Path, busy_port: int, capfd: pytest.CaptureFixture[str]
) -> None:
    url = start_dashboard(logdir, busy_port)
    assert url is not None and url != f"http://127.0.0.1:{busy_port}"
    port = int(url.rsplit(":", 1)[1])
    assert port > busy_port
    out = capfd.readouterr().out
    assert f"port {busy_port} is busy; the dashboard uses port {port}" in out
    assert url not in out.replace(f"port {port}", "")  # not announced before it answers
    (dashboard,) = RUNNING.values()
    assert dashboard.announced.wait(120)
    with urllib.request.urlopen(url + "/", timeout=10) as page:
        assert page.status == 200
    assert f"collapsewatch dashboard: {url}\n" in capfd.readouterr().out
    stop_dashboards()
    assert dashboard.process.wait(timeout=20) is not None
    assert capfd.readouterr().out == (
        "collapsewatch: the dashboard stopped with training; reopen it with:"
        f" {command_name()} dashboard {logdir}\n"
    )


def test_no_free_port_starts_nothing_and_says_how_to_open_it_later(
    logdir: Path,
    busy_port: int,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dashboard_process, "DASHBOARD_PORTS_TRIED", 1)
    assert start_dashboard(logdir, busy_port) is None
    assert RUNNING == {}
    out = capfd.readouterr().out
    assert "no dashboard was started; training goes on" in out
    assert f"{command_name()} dashboard {logdir} --port PORT" in out


def test_a_dashboard_that_dies_at_start_is_reported_not_raised(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "a file, not a directory"
    missing.write_text("")
    url = start_dashboard(missing, 8050)  # the CLI refuses a file as its log directory
    (dashboard,) = RUNNING.values()
    dashboard.announcer.join(timeout=120)
    out = capfd.readouterr().out
    assert url is not None and "the dashboard stopped before it answered (exit code" in out
    assert f"{command_name()} dashboard " in out and not dashboard.announced.is_set()
