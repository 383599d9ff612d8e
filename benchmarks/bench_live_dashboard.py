"""The dashboard polling a 1,000,000-row run that is still growing, and a 1,000-run sweep.

Part 1, a growing run: a writer process (this script with ``--write``) creates a run with the
store's ``RunWriter``, writes ``--rows`` rows, then appends ``--rate`` rows a second (one
commit every 0.1 s). Meanwhile the dashboard app (``create_app``) is polled here every
``--interval`` seconds through Flask's test client as a page polls it: every callback the
interval fires, posted in the page's order with the values the page holds (the answers of
the callbacks before), so the panels see the selection the run list made and the state the
last panel update left. Each poll is timed from the first request to the last answer.

Part 2, a sweep: ``--runs`` finished runs (500 recorded steps, a quarter collapsed, each with
a small config), polled the same way: the first poll, then polls with nothing changed.

Run: ``.venv/bin/python benchmarks/bench_live_dashboard.py --rows 1000000 --runs 1000``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.dashboard.runs

from collapsewatch.dashboard import create_app
from collapsewatch.dashboard.layout import ID

from collapsewatch.store import RunWriter
from tests.dashboard.runs import DIM, MARGIN, metrics_frame, write_run

CHUNK = 100_000  # rows per commit while writing the first rows
TICK = 0.1  # seconds between the growing writer's commits


class Page:
    """A browser page reduced to its polling: the component values it holds and the
    callbacks the interval fires, posted with those values, each answer applied."""

    def __init__(self, app: Any) -> None:
        self.client = app.server.test_client()
        self.callback_map = app.callback_map
        self.values: dict[tuple[str, str], Any] = {}
        for component in [app.layout, *app.layout._traverse()]:
            if getattr(component, "id", None):
                for prop in component._prop_names:
                    self.values[(component.id, prop)] = getattr(component, prop, None)
        interval = {"id": ID.INTERVAL, "property": "n_intervals"}
        self.polled = [k for k, spec in app.callback_map.items() if interval in spec["inputs"]]

    def poll(self) -> tuple[float, int, dict[str, Any]]:
        """One tick: (seconds, bytes answered, {component: props answered})."""
        self.values[(ID.INTERVAL, "n_intervals")] = (
            self.values.get((ID.INTERVAL, "n_intervals")) or 0
        ) + 1
        answered: dict[str, Any] = {}
        size = 0
        start = time.perf_counter()
        for output in self.polled:
            spec = self.callback_map[output]
            body = {
                "output": output,
                "outputs": [
                    {"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
                    for part in output.strip(".").split("...")
                ],
                "inputs": [
                    {**i, "value": self.values.get((i["id"], i["property"]))}
                    for i in spec["inputs"]
                ],
                "state": [
                    {**s, "value": self.values.get((s["id"], s["property"]))} for s in spec["state"]
                ],
                "changedPropIds": [f"{ID.INTERVAL}.n_intervals"],
            }
            response = self.client.post("/_dash-update-component", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{output}: HTTP {response.status_code}")
            size += len(response.data)
            for component, props in response.get_json().get("response", {}).items():
                answered.setdefault(component, {}).update(props)
                for prop, value in props.items():
                    self.values[(component, prop)] = value
        return time.perf_counter() - start, size, answered


def write(path: Path, rows: int, rate: float) -> None:
    """The writer process: ``rows`` rows, "ready" on stdout, then ``rate`` rows a second."""
    writer = RunWriter(path, {"margin": MARGIN, "embedding_dim": DIM})
    for start in range(0, rows, CHUNK):
        writer.append_metrics(metrics_frame(range(start, min(rows, start + CHUNK)), seed=start))
        writer.commit()
    print("ready", flush=True)
    step, per_tick, due = rows, max(1, round(rate * TICK)), time.monotonic()
    while True:
        due += TICK
        time.sleep(max(0.0, due - time.monotonic()))
        writer.append_metrics(metrics_frame(range(step, step + per_tick), seed=step))
        writer.commit()
        step += per_tick


def _summary(times: list[float], sizes: list[int]) -> str:
    return (
        f"median {1000 * statistics.median(times):.0f} ms, max {1000 * max(times):.0f} ms, "
        f"median {statistics.median(sizes) / 1024:.1f} KiB answered"
    )


def growing_run(args: argparse.Namespace, folder: Path) -> None:
    path = folder / "long.cwrun"
    writer = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--write",
            str(path),
            "--rows",
            str(args.rows),
            "--rate",
            str(args.rate),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        page = Page(create_app(folder, interval_ms=int(1000 * args.interval)))
        seconds, size, _ = page.poll()
        print(
            f"{args.rows:,} rows growing by {args.rate:g} rows/s, polled every {args.interval:g} s"
        )
        print(f"  page load (every row read once): {seconds:.1f} s, {size / 1024:.0f} KiB")
        times, sizes, rebuilt, rows = [], [], 0, []
        for _ in range(args.polls):
            time.sleep(args.interval)
            seconds, size, answered = page.poll()
            panels = answered.get(ID.PANELS, {})
            rebuilt += "figure" in panels
            if "extendData" in panels:
                rows.append(len(panels["extendData"][0]["x"][0]))
            times.append(seconds)
            sizes.append(size)
        print(f"  {args.polls} polls: {_summary(times, sizes)}")
        print(
            f"  panels rebuilt in {rebuilt} of {args.polls} polls; extended in the others "
            f"(median {statistics.median(rows) if rows else 0:.0f} new rows each)"
        )
    finally:
        writer.kill()
        writer.wait()


def sweep(args: argparse.Namespace, folder: Path) -> None:
    for i in range(args.runs):
        config = {"lr": [0.01, 0.1, 0.5][i % 3], "loss": {"margin": 0.2, "mining": "hard"}}
        collapse_at = 250 if i % 4 == 0 else None
        write_run(
            folder,
            f"trial{i:04d}",
            steps=500,
            collapse_at=collapse_at,
            seed=i,
            metadata={"config": config},
        )
    page = Page(create_app(folder, interval_ms=int(1000 * args.interval)))
    seconds, size, _ = page.poll()
    print(f"{args.runs:,} finished runs × 500 steps, polled every {args.interval:g} s")
    print(f"  first poll (every run file read once): {seconds:.1f} s, {size / 1024:.0f} KiB")
    times, sizes = [], []
    for _ in range(args.polls):
        time.sleep(args.interval)
        seconds, size, _ = page.poll()
        times.append(seconds)
        sizes.append(size)
    print(f"  {args.polls} polls, nothing changed: {_summary(times, sizes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows before it grows")
    parser.add_argument("--rate", type=float, default=500.0, help="rows appended a second")
    parser.add_argument("--interval", type=float, default=2.0, help="poll interval, seconds")
    parser.add_argument("--polls", type=int, default=10, help="polls timed per part")
    parser.add_argument("--runs", type=int, default=1000, help="runs in the sweep (0: skip)")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write is not None:
        write(args.write, args.rows, args.rate)
        return
    if args.rows:
        with tempfile.TemporaryDirectory() as folder:
            growing_run(args, Path(folder))
    if args.runs:
        with tempfile.TemporaryDirectory() as folder:
            sweep(args, Path(folder))


if __name__ == "__main__":
    main()
