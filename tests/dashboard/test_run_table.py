"""The run table of a sweep: its rows, its cache, and how its ticks meet the run list."""

from __future__ import annotations

import json
import math
from pathlib import Path

from collapsewatch.dashboard.callbacks import (
    run_list_update,
    run_table_update,
    table_selection_update,
)
from collapsewatch.dashboard.data import RunCache
from collapsewatch.dashboard.layout import (
    MAX_FAILED_BANNERS,
    RUN_TABLE_COLUMNS,
    TABLE_MIN_RUNS,
    flatten_config,
    run_table,
)

from tests.dashboard.runs import metrics_frame, write_broken, write_run


def test_flatten_config_joins_nested_keys_and_keeps_cells_json_safe() -> None:
    config = {
        "lr": 0.1,
        "epochs": 3,
        "optimizer": {"name": "sgd", "momentum": {"beta": 0.9, "nesterov": True}},
        "clip": math.nan,
        "scale": -math.inf,
        "tags": ["a", 1],
        "note": None,
    }
    assert flatten_config(config) == {
        "lr": 0.1,
        "epochs": 3,
        "optimizer.name": "sgd",
        "optimizer.momentum.beta": 0.9,
        "optimizer.momentum.nesterov": "true",
        "clip": None,
        "scale": None,
        "tags": '["a",1]',
        "note": None,
    }
    assert flatten_config({}) == {}


def _rows_by_run(rows: list[dict]) -> dict[str, dict]:
    return {row["run"]: row for row in rows}


def test_run_table_rows_hold_state_onset_finals_and_the_union_of_config_keys(
    logdir: Path,
) -> None:
    write_run(logdir, "fine", steps=60, seed=3, metadata={"config": {"lr": 0.1, "opt": {"m": 0.9}}})
    write_run(
        logdir, "coll", steps=60, collapse_at=30, metadata={"config": {"lr": 0.5, "mining": "hard"}}
    )
    write_run(logdir, "back", steps=60, collapse_at=20, recover_at=40)
    write_run(logdir, "blown", steps=60, diverge_at=40, metadata={"config": {"lr": math.inf}})
    write_broken(logdir, "broken")
    columns, rows = run_table(RunCache(logdir).run_list().entries)
    json.dumps(rows, allow_nan=False)  # what the browser gets: plain JSON, no NaN
    fixed = [c[0] for c in RUN_TABLE_COLUMNS]
    assert [c["id"] for c in columns] == [
        *fixed,
        "config.lr",
        "config.mining",
        "config.opt.m",
    ]
    assert [c["name"] for c in columns[len(fixed) :]] == ["lr", "mining", "opt.m"]
    kinds = {c["id"]: c["type"] for c in columns}
    assert kinds["config.lr"] == kinds["config.opt.m"] == kinds["onset_step"] == "numeric"
    assert kinds["config.mining"] == kinds["state"] == "text"
    by_run = _rows_by_run(rows)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)  # the listing's order
    last = metrics_frame(range(60), seed=3).iloc[-1]
    assert by_run["fine"] == {
        "id": "fine.cwrun",
        "state": "✓ healthy",
        "run": "fine",
        "onset_step": None,
        "last_step": 59,
        "final_loss_margin_ratio": float(f"{last['loss_margin_ratio']:.4g}"),
        "final_mean_pairwise_distance": float(f"{last['mean_pairwise_distance']:.4g}"),
        "config.lr": 0.1,
        "config.mining": None,
        "config.opt.m": 0.9,
    }
    coll = by_run["coll"]
    assert coll["state"] == "✖ collapsed" and coll["onset_step"] == 30
    assert coll["final_loss_margin_ratio"] == 1.0
    assert coll["final_mean_pairwise_distance"] == 0.002
    assert (coll["config.mining"], coll["config.opt.m"]) == ("hard", None)
    # Healthy again after a collapse: "recovered", and the onset of the collapse it had.
    assert by_run["back"]["state"] == "↺ recovered" and by_run["back"]["onset_step"] == 20
    # Diverged: NaN loss and infinite distances read as empty cells, as does an inf config.
    blown = by_run["blown"]
    assert blown["state"] == "↯ diverged" and blown["onset_step"] == 40
    assert blown["final_loss_margin_ratio"] is None
    assert blown["final_mean_pairwise_distance"] is None
    assert blown["config.lr"] is None
    broken = by_run["broken"]
    assert broken["state"] == "⚠ error" and broken["last_step"] is None
    assert broken["onset_step"] is None and broken["config.lr"] is None


def test_an_unchanged_run_file_is_not_read_again(logdir: Path) -> None:
    write_run(logdir, "a", steps=20)
    write_run(logdir, "b", steps=20)
    cache = RunCache(logdir, list_ttl=0)
    first = {e.run_id: e for e in cache.run_list().entries}
    again = {e.run_id: e for e in cache.run_list().entries}
    assert all(again[k] is first[k] for k in first)  # the same objects: nothing re-read
    (logdir / "b.cwrun").unlink()
    write_run(logdir, "b", steps=30, collapse_at=25)
    third = {e.run_id: e for e in cache.run_list().entries}
    assert third["a.cwrun"] is first["a.cwrun"]
    assert third["b.cwrun"].summary.last_step == 29 and third["b.cwrun"].onset_step == 25


def test_the_table_is_sent_when_it_changed_and_shown_for_a_sweep(logdir: Path) -> None:
    write_run(logdir, "one", steps=10)
    cache = RunCache(logdir, list_ttl=0)
    small = run_table_update(cache, None)
    assert small is not None and small.hidden is True  # few runs: the checklist is enough
    for i in range(TABLE_MIN_RUNS - 1):
        write_run(logdir, f"r{i:02d}", steps=10)
    sweep = run_table_update(cache, small.fingerprint)
    assert sweep is not None and sweep.hidden is False and len(sweep.rows) == TABLE_MIN_RUNS
    assert run_table_update(cache, sweep.fingerprint) is None  # nothing changed: no rows sent
    write_run(logdir, "late", steps=10, collapse_at=5)
    grown = run_table_update(cache, sweep.fingerprint)
    assert grown is not None and len(grown.rows) == TABLE_MIN_RUNS + 1


def test_ticks_in_the_table_become_the_selection_and_back() -> None:
    rows = [{"id": "a.cwrun"}, {"id": "b.cwrun"}, {"id": "c.cwrun"}]
    # Ticked in the table: the run list's value follows; ids the table does not hold drop.
    assert table_selection_update(True, ["c.cwrun", "a.cwrun", "x"], ["b.cwrun"], rows) == (
        ["a.cwrun", "c.cwrun"],
        None,
    )
    # Already the selection (the table echoing a re-tick): nothing to send.
    assert table_selection_update(True, ["c.cwrun", "a.cwrun"], ["a.cwrun", "c.cwrun"], rows) == (
        None,
        None,
    )
    # Selected elsewhere (the default selection, new rows): the table's ticks follow.
    assert table_selection_update(False, [], ["c.cwrun", "b.cwrun"], rows) == (None, [1, 2])
    assert table_selection_update(False, None, None, None) == (None, [])


def test_a_sweep_lists_its_runs_in_the_table_and_counts_banners_beyond_a_few(
    logdir: Path,
) -> None:
    failed = MAX_FAILED_BANNERS + 3
    for i in range(TABLE_MIN_RUNS):
        write_run(logdir, f"r{i:02d}", steps=20, collapse_at=10 if i < failed else None)
    update = run_list_update(RunCache(logdir), None, False)
    assert update.options == []  # no 12-row checklist beside the table
    assert (
        len(update.value) == 4
        and update.hint == f"4 of {TABLE_MIN_RUNS} runs plotted: tick them in the run table."
    )
    assert len(update.banners) == MAX_FAILED_BANNERS + 1
    assert [b.className for b in update.banners[:-1]] == [
        "cw-banner cw-banner-collapsed"
    ] * MAX_FAILED_BANNERS
    assert update.banners[-1].children.startswith(
        f"… and {failed - MAX_FAILED_BANNERS} more runs collapsed"
    )
