"""The dashboard's polling callbacks on a sweep's log directory of many runs.

Writes ``--runs`` finished runs (``--steps`` recorded steps each, a quarter collapsed, each
with a small config) and times, as the server runs them:

* the first run listing (every run file opened once),
* a poll when nothing changed: the run list callback, and the run table callback given the
  fingerprint of the table the browser already has (nothing sent),
* the run table sent in full (a new browser tab), and its size,
* a poll after one run changed (one file re-read).

Run: ``.venv/bin/python benchmarks/bench_many_runs.py --runs 200``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.dashboard.runs

from collapsewatch.dashboard.callbacks import run_list_update, run_table_update
from collapsewatch.dashboard.data import RunCache

from tests.dashboard.runs import write_run


def _median_ms(function: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        logdir = Path(folder)
        for i in range(args.runs):
            config = {"lr": [0.01, 0.1, 0.5][i % 3], "loss": {"margin": 0.2, "mining": "hard"}}
            collapse_at = args.steps // 2 if i % 4 == 0 else None
            write_run(
                logdir,
                f"trial{i:03d}",
                steps=args.steps,
                collapse_at=collapse_at,
                seed=i,
                metadata={"config": config},
            )
        # list_ttl=0: every call lists the directory again, the worst case of a poll.
        cache = RunCache(logdir, list_ttl=0)
        start = time.perf_counter()
        cache.run_list()
        first = 1000 * (time.perf_counter() - start)
        full = run_table_update(cache, None)
        assert full is not None
        payload = len(json.dumps([full.columns, full.rows]))
        run_list = _median_ms(lambda: run_list_update(cache, [], True), args.repeats)
        table_unchanged = _median_ms(
            lambda: run_table_update(cache, full.fingerprint), args.repeats
        )
        table_full = _median_ms(lambda: run_table_update(cache, None), args.repeats)

        def one_run_changed() -> None:
            (logdir / "trial007.cwrun").unlink()
            write_run(logdir, "trial007", steps=args.steps, seed=7)
            start = time.perf_counter()
            run_table_update(cache, full.fingerprint)
            changed.append(time.perf_counter() - start)

        changed: list[float] = []
        for _ in range(5):
            one_run_changed()
        print(f"{args.runs} runs × {args.steps} steps")
        print(f"first listing (every file read):          {first:8.1f} ms")
        print(f"run list callback, nothing changed:       {run_list:8.1f} ms")
        print(f"run table callback, nothing changed:      {table_unchanged:8.1f} ms (nothing sent)")
        print(
            f"run table callback, sent in full:         {table_full:8.1f} ms"
            f" ({payload / 1024:.0f} KiB)"
        )
        print(
            f"run table callback, one run file changed: {1000 * statistics.median(changed):8.1f} ms"
        )


if __name__ == "__main__":
    main()
