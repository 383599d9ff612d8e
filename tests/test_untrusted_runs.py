"""Crafted run files: reading one never runs its SQL, never spins, never tracebacks.

Each file is a real run written by RunWriter and then edited with sqlite3, the way
someone could hand one over.
"""

from __future__ import annotations

import math
import sqlite3
import warnings

import numpy as np
import pandas as pd
import pytest

import collapsewatch.store as store
from collapsewatch.store import (
    Event,
    RunFileError,
    RunFileWarning,
    RunReader,
    RunWriter,
    load_run,
    run_path,
)
from dashboard.data import RunCache

SPIN = "(WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c)"
LEAK = "(SELECT group_concat(key || '=' || value) FROM meta)"


def _run(tmp_path, name="run", steps=6):
    path = run_path(tmp_path, name)
    writer = RunWriter(path, {"margin": 0.2})
    writer.append_metrics(
        pd.DataFrame(
            {"step": range(steps), "time": np.arange(steps) + 100.0, "loss": np.arange(steps) / 10}
        )
    )
    writer.append_events([Event(3, "collapsed", "collapsed", "m", "s", {"ratio": 0.01})])
    writer.add_snapshot(2, np.eye(3, dtype=np.float32), np.arange(3))
    writer.close()
    return path


def _edit(path, *statements):
    db = sqlite3.connect(path)
    for statement in statements:
        db.execute(statement)
    db.commit()
    db.close()


@pytest.mark.parametrize("column", [SPIN, LEAK, "loss; DROP TABLE meta", "Loss Two"])
def test_ill_named_columns_are_skipped_not_run(tmp_path, column):
    path = _run(tmp_path)
    quoted = column.replace('"', '""')
    _edit(path, f'ALTER TABLE metrics ADD COLUMN "{quoted}" REAL')
    with pytest.warns(RunFileWarning, match="invalid names skipped") as caught:
        run = load_run(path)
    assert len([w for w in caught if issubclass(w.category, RunFileWarning)]) == 1
    assert list(run.metrics.columns) == ["step", "time", "loss"]
    assert run.metrics["loss"].tolist() == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert run.metadata["margin"] == 0.2  # the file was not changed by reading it


def test_a_view_in_place_of_a_table_is_refused(tmp_path):
    path = _run(tmp_path)
    _edit(path, "ALTER TABLE metrics RENAME TO real_metrics")
    _edit(path, f"CREATE VIEW metrics AS SELECT step, time, {SPIN} AS loss FROM real_metrics")
    with pytest.raises(RunFileError, match="'metrics' table is a view"):
        RunReader(path)
    # The dashboard shows it as one error card and still lists the good run beside it.
    _run(tmp_path, "good")
    listing = RunCache(tmp_path).run_list()
    states = {entry.run_id: entry.ui_state for entry in listing.entries}
    assert states == {"run.cwrun": "error", "good.cwrun": "collapsed"}


def test_a_query_past_the_time_limit_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "QUERY_TIME_LIMIT", 0.5)
    with RunReader(_run(tmp_path)) as reader, pytest.raises(RunFileError, match="longer than"):
        reader._query(f"SELECT {SPIN}")


def test_malformed_values_read_as_nan_or_none_with_one_warning(tmp_path):
    path = _run(tmp_path)
    _edit(
        path,
        "UPDATE meta SET value = '{not json' WHERE key = 'margin'",
        "UPDATE metrics SET loss = 'abc' WHERE step = 2",
        "UPDATE metrics SET time = x'00ff' WHERE step = 4",
        "UPDATE events SET evidence = 'nope'",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = load_run(path)
        with RunReader(path) as reader:
            summary = reader.summary()
    messages = sorted(str(w.message) for w in caught if w.category is RunFileWarning)
    assert len(messages) == 4 + 1  # margin, loss, time, evidence; summary's margin again
    assert run.metadata["margin"] is None
    loss = run.metrics["loss"].tolist()
    assert math.isnan(loss[2]) and loss[3] == pytest.approx(0.3)
    assert math.isnan(run.metrics["time"].iloc[4]) and run.metrics["time"].iloc[5] == 105.0
    assert run.events["evidence"].tolist() == [{}]
    assert summary.margin is None and summary.last_loss == pytest.approx(0.5)


def test_a_row_whose_step_is_not_an_integer_is_skipped(tmp_path):
    path = _run(tmp_path)
    # A crafted table whose step is not the rowid can hold text there.
    _edit(
        path,
        "ALTER TABLE metrics RENAME TO old",
        "CREATE TABLE metrics (step, time REAL, loss REAL)",
        "INSERT INTO metrics SELECT * FROM old",
        "INSERT INTO metrics VALUES ('x', 1.0, 1.0)",
        "DROP TABLE old",
    )
    with pytest.warns(RunFileWarning, match="'step' holds non-numbers"):
        frame = load_run(path).metrics
    assert frame["step"].tolist() == list(range(6)) and frame["step"].dtype == "int64"


@pytest.mark.parametrize(
    ("column", "value"),
    [("shape", "'[999, 999]'"), ("shape", "'not json'"), ("dtype", "'|O'"), ("dtype", "'bad'")],
)
def test_a_corrupt_snapshot_is_a_run_file_error(tmp_path, column, value):
    path = _run(tmp_path)
    _edit(path, f"UPDATE snapshots SET {column} = {value}")
    with RunReader(path) as reader, pytest.raises(RunFileError, match="snapshot of step 2 is"):
        reader.snapshot(2)


def test_a_file_without_the_step_column_is_refused(tmp_path):
    path = _run(tmp_path)
    _edit(path, "ALTER TABLE metrics RENAME COLUMN step TO stop")
    with pytest.raises(RunFileError, match="lacks the step and time columns"):
        RunReader(path)
