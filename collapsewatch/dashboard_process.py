"""The dashboard child process of ``watch(dashboard=...)``: both of its sides.

The training process (``watch(dashboard=...)``) starts ``python -m collapsewatch dashboard
LOGDIR --port P --exit-with PID`` with :func:`start_dashboard`, prints its URL from a thread
once the page answers and stops it with :func:`stop_dashboards` when training ends. The
child (``collapsewatch dashboard --exit-with PID``) calls :func:`exit_with`, so that it also
ends when the training process is killed. The dashboard is never served from the training
process itself, and nothing here imports torch or Dash.

Threads: :func:`start_dashboard` and :func:`stop_dashboards` run in the training thread (and
at exit); one announcer thread per dashboard only polls the page and prints, and sets
``DashboardProcess.announced``, the one value it hands back.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from collapsewatch.command import command_name

DASHBOARD_PORTS_TRIED = 20  # a busy port moves the dashboard up to this many ports on
DASHBOARD_START_TIMEOUT = 180.0  # seconds to wait for the page before saying it is late
PARENT_POLL_SECONDS = 1.0  # how often the child checks that the training process lives


@dataclass
class DashboardProcess:
    """A dashboard child process and the thread that announces it once it answers."""

    process: subprocess.Popen[bytes]
    url: str
    logdir: Path
    announced: threading.Event = field(default_factory=threading.Event)
    announcer: threading.Thread | None = None


RUNNING: dict[tuple[str, int], DashboardProcess] = {}
"""The dashboards this process started, by (resolved log directory, requested port)."""


def reopen_command(logdir: Path) -> str:
    """The command that serves ``logdir``'s dashboard again, as printed to the user."""
    return f"{command_name()} dashboard {shlex.quote(str(logdir))}"


def free_port(first: int) -> int | None:
    """The first port from ``first`` that 127.0.0.1 can bind, or None within the range."""
    for port in range(first, min(first + DASHBOARD_PORTS_TRIED, 65536)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


def start_dashboard(logdir: Path, port: int) -> str | None:
    """Serve ``logdir`` from a child process (never from the training process itself).

    A busy ``port`` moves to the next free one (and says so); the URL is printed by a
    thread once the page answers, so training never waits for it. Returns the URL, or None
    when no dashboard could be started: that is reported and training goes on.
    """
    key = (str(logdir.resolve()), port)
    running = RUNNING.get(key)
    if running is not None and running.process.poll() is None:
        return running.url
    reopen = reopen_command(logdir)
    free = free_port(port)
    if free is None:
        last = port + DASHBOARD_PORTS_TRIED - 1
        print(
            f"collapsewatch: ports {port}–{last} are all busy, so no dashboard was started; "
            f"training goes on. Open one later with: {reopen} --port PORT",
            flush=True,
        )
        return None
    if free != port:
        print(f"collapsewatch: port {port} is busy; the dashboard uses port {free}", flush=True)
    command = [sys.executable, "-m", "collapsewatch", "dashboard", str(logdir)]
    command += ["--port", str(free), "--exit-with", str(os.getpid())]
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except OSError as error:
        print(f"collapsewatch: cannot start the dashboard ({error}); open it with: {reopen}")
        return None
    url = f"http://127.0.0.1:{free}"
    dashboard = DashboardProcess(process, url, logdir)
    dashboard.announcer = threading.Thread(
        target=_announce, args=(dashboard,), name="collapsewatch-dashboard", daemon=True
    )
    RUNNING[key] = dashboard
    dashboard.announcer.start()
    return url


def _announce(dashboard: DashboardProcess) -> None:
    """Print the dashboard's URL once its page answers, or why it never did."""
    deadline = time.monotonic() + DASHBOARD_START_TIMEOUT
    while time.monotonic() < deadline:
        code = dashboard.process.poll()
        if code is not None:
            print(
                f"collapsewatch: the dashboard stopped before it answered (exit code {code});"
                f" open it with: {reopen_command(dashboard.logdir)}",
                flush=True,
            )
            return
        try:
            with urllib.request.urlopen(dashboard.url + "/", timeout=2) as page:
                if page.status == 200:
                    print(f"collapsewatch dashboard: {dashboard.url}", flush=True)
                    dashboard.announced.set()
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    print(
        f"collapsewatch: the dashboard at {dashboard.url} has not answered after"
        f" {DASHBOARD_START_TIMEOUT:.0f} s; it may still be starting",
        flush=True,
    )


def stop_dashboards() -> None:
    """Stop the dashboards this process started; say how to reopen each run directory."""
    for dashboard in RUNNING.values():
        if dashboard.process.poll() is None:
            if dashboard.announcer is not None:  # an answering page gets its URL line first
                dashboard.announcer.join(timeout=3)
            dashboard.process.terminate()
            print(
                f"collapsewatch: the dashboard stopped with training; reopen it with:"
                f" {reopen_command(dashboard.logdir)}",
                flush=True,
            )
    RUNNING.clear()


def exit_with(pid: int) -> None:
    """The child's side: stop this process as soon as process ``pid`` is gone (however it
    ended), checked from a daemon thread every ``PARENT_POLL_SECONDS``."""

    def watch_parent() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass  # it exists, owned by someone else
            time.sleep(PARENT_POLL_SECONDS)

    threading.Thread(target=watch_parent, name="exit-with-parent", daemon=True).start()
