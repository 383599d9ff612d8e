"""The run table of a sweep: its rows, its cache, and how its ticks meet the run list."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from collapsewatch.dashboard import create_app
from collapsewatch.dashboard.callbacks import (
    run_list_update,
    run_table_update,
    table_selection_update,
)
from collapsewatch.dashboard.data import RunCache
from collapsewatch.dashboard.layout import (
    ID,
    MAX_FAILED_BANNERS,
    RUN_TABLE_COLUMNS,
    TABLE_MIN_RUNS,
    flatten_config,
    run_table,
)

from collapsewatch.store import RunReader, RunWriter
from tests.dashboard.runs import metrics_frame, settle, write_broken, write_run


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
    assert again["a.cwrun"] is not first["a.cwrun"]  # just written: its stamp is not trusted
    settle(logdir)
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
    settle(logdir)
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


# -- polls of an unchanged sweep ----------------------------------------------------------


def _count_opened_run_files(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    opened: list[Path] = []
    original = RunReader.__init__

    def spy(self: RunReader, path: str | Path) -> None:
        opened.append(Path(path))
        original(self, path)

    monkeypatch.setattr(RunReader, "__init__", spy)
    return opened


def test_a_listing_with_nothing_changed_is_the_same_listing_and_opens_no_file(
    logdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        write_run(logdir, f"r{i}", steps=10)
    settle(logdir)
    cache = RunCache(logdir, list_ttl=0)
    first = cache.run_list()
    opened = _count_opened_run_files(monkeypatch)
    assert cache.run_list() is first and opened == []
    # A run that grows, a new run and a run that goes away each make a new version.
    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2})
    writer.append_metrics(metrics_frame(range(5)))
    writer.commit()
    grown = cache.run_list()
    assert grown.version != first.version and opened == [logdir / "live.cwrun"]
    writer.append_metrics(metrics_frame(range(5, 9)))
    writer.commit()
    again = cache.run_list()
    assert again.version != grown.version and again.get("live.cwrun").summary.last_step == 8
    assert again.get("live.cwrun").summary.recorded_steps == 9  # 5 counted, then the 4 new
    assert opened == [logdir / "live.cwrun"] * 2
    writer.close()
    settle(logdir)
    closed = cache.run_list()
    (logdir / "r0.cwrun").unlink()
    removed = cache.run_list()
    assert removed.version != closed.version and removed.get("r0.cwrun") is None
    assert cache.run_list() is removed


def test_an_unchanged_sweep_poll_sends_the_status_only(logdir: Path) -> None:
    for i in range(TABLE_MIN_RUNS):
        write_run(logdir, f"r{i:02d}", steps=10, collapse_at=5 if i < 2 else None)
    settle(logdir)
    cache = RunCache(logdir, list_ttl=0)
    first = run_list_update(cache, None, False)
    assert first.fingerprint is not None and len(first.value) == 4
    same = run_list_update(cache, first.value, True, shown=first.fingerprint)
    assert same.fingerprint == first.fingerprint and same.status.startswith("updated")
    assert [same.options, same.value, same.ready, same.banners, same.errors] == [None] * 5
    assert same.count is None and same.hint is None
    # Another selection, or a run file that changed, sends the update again.
    fewer = run_list_update(cache, first.value[:1], True, shown=first.fingerprint)
    assert fewer.hint == f"1 of {TABLE_MIN_RUNS} runs plotted: tick them in the run table."
    write_run(logdir, "late", steps=10, collapse_at=5)
    grown = run_list_update(cache, first.value, True, shown=first.fingerprint)
    assert grown.count == f"({TABLE_MIN_RUNS + 1})" and grown.fingerprint != first.fingerprint
    settle(logdir)
    table = run_table_update(cache, None)
    assert table is not None and run_table_update(cache, table.fingerprint) is None


def test_an_unchanged_sweep_poll_over_http_carries_no_rows(logdir: Path) -> None:
    for i in range(TABLE_MIN_RUNS):
        write_run(logdir, f"r{i:02d}", steps=10, collapse_at=5 if i < 2 else None)
    settle(logdir)
    app = create_app(logdir)
    client = app.server.test_client()
    page = {ID.RUN_LIST: None, ID.SELECTION_READY: False, ID.LIST_FINGERPRINT: None}
    table_print = None
    sent = []
    for n in range(3):
        list_body = _callback_body(
            app,
            ID.RUN_LIST + ".options",
            {
                (ID.INTERVAL, "n_intervals"): n,
                (ID.RUN_LIST, "value"): page[ID.RUN_LIST],
                (ID.SELECTION_READY, "data"): page[ID.SELECTION_READY],
                (ID.LIST_FINGERPRINT, "data"): page[ID.LIST_FINGERPRINT],
            },
        )
        response = client.post("/_dash-update-component", json=list_body).get_json()["response"]
        for component, props in response.items():
            if "value" in props:
                page[ID.RUN_LIST] = props["value"]
            page.update({component: props["data"]} if "data" in props else {})
        table_body = _callback_body(
            app,
            ID.RUN_TABLE + ".columns",
            {(ID.INTERVAL, "n_intervals"): n, (ID.TABLE_FINGERPRINT, "data"): table_print},
        )
        table = client.post("/_dash-update-component", json=table_body).get_json()["response"]
        table_print = table.get(ID.TABLE_FINGERPRINT, {}).get("data", table_print)
        sent.append((set(response), set(table)))
    first, *later = sent
    assert ID.BANNERS in first[0] and ID.RUN_TABLE in first[1]
    # Dash leaves every output that is no_update out of its answer.
    assert later == [({ID.STATUS, ID.LIST_FINGERPRINT}, set())] * 2


def _callback_body(app: Any, output_part: str, values: dict) -> dict:
    """The request the page sends for the callback with that output, given its values."""
    output = next(k for k in app.callback_map if output_part in k)
    spec = app.callback_map[output]
    return {
        "output": output,
        "outputs": [
            {"id": part.rsplit(".", 1)[0], "property": part.rsplit(".", 1)[1]}
            for part in output.strip(".").split("...")
        ],
        "inputs": [{**i, "value": values[(i["id"], i["property"])]} for i in spec["inputs"]],
        "state": [{**s, "value": values[(s["id"], s["property"])]} for s in spec["state"]],
        "changedPropIds": [f"{ID.INTERVAL}.n_intervals"],
    }


def _patched(rows: list, patch: Any) -> list:
    """``rows`` as the page holds them after applying a ``dash.Patch`` of item assignments."""
    rows = list(rows)
    for operation in patch.to_plotly_json()["operations"]:
        assert operation["operation"] == "Assign" and len(operation["location"]) == 1
        rows[operation["location"][0]] = operation["params"]["value"]
    return rows


def test_a_growing_run_in_a_sweep_sends_its_row_alone(logdir: Path) -> None:
    for i in range(TABLE_MIN_RUNS):
        write_run(logdir, f"r{i:02d}", steps=10, metadata={"config": {"lr": i / 10}})
    settle(logdir)
    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2, "config": {"lr": 0.5}})
    writer.append_metrics(metrics_frame(range(5)))
    writer.commit()
    cache = RunCache(logdir, list_ttl=0)
    shown = run_table_update(cache, None)
    assert shown is not None and isinstance(shown.rows, list)
    rows, fingerprint = shown.rows, shown.fingerprint
    for start in (5, 9, 20):
        writer.append_metrics(metrics_frame(range(start, start + 4), collapse_at=21))
        writer.commit()
        update = run_table_update(cache, fingerprint)
        assert update is not None and update.columns is None and update.hidden is None
        assert len(update.rows.to_plotly_json()["operations"]) == 1  # the live run's row
        rows, fingerprint = _patched(rows, update.rows), update.fingerprint
        # What the page now shows is the table a fresh read makes.
        assert rows == run_table_update(RunCache(logdir), None).rows
    assert next(r for r in rows if r["id"] == "live.cwrun")["last_step"] == 23
    # A run more, or a page that missed a listing: the whole table.
    write_run(logdir, "late", steps=10)
    assert isinstance(run_table_update(cache, fingerprint).rows, list)
    assert isinstance(run_table_update(cache, shown.fingerprint).rows, list)
    writer.close()
