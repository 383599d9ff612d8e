"""The run store: round trips, bad files, concurrent readers and kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapsewatch.store import (
    Event,
    RunFileError,
    RunReader,
    RunWriter,
    check_run_name,
    json_safe,
    list_runs,
    load_run,
    run_path,
)

CHILD = Path(__file__).with_name("training_child.py")


def make_run(tmp_path, name="run", steps=5):
    writer = RunWriter(run_path(tmp_path, name), {"margin": 0.2, "config": {"lr": 0.5}})
    frame = pd.DataFrame(
        {"step": range(steps), "time": np.linspace(10, 20, steps), "loss": np.arange(steps) / 10}
    )
    writer.append_metrics(frame)
    writer.commit()
    return writer


def test_round_trip(tmp_path):
    writer = make_run(tmp_path)
    writer.append_metrics(
        pd.DataFrame({"step": [5], "time": [21.0], "loss": [float("nan")], "frac_hard": [0.25]})
    )
    event = Event(5, "collapsed", "collapsed", "stuck", "try scaled", {"ratio": 1.0, "x": None})
    writer.append_events([event])
    embeddings = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    writer.add_snapshot(5, embeddings, np.arange(7, dtype=np.int64))
    writer.close()

    run = load_run(run_path(tmp_path, "run"))
    assert run.name == "run"
    assert run.metadata["margin"] == 0.2 and run.metadata["config"] == {"lr": 0.5}
    assert run.metadata["status"] == "finished"
    assert list(run.metrics["step"]) == [0, 1, 2, 3, 4, 5]
    assert np.isnan(run.metrics["loss"].iloc[-1])
    assert np.isnan(run.metrics["frac_hard"].iloc[0])  # column added later: NaN before
    assert run.metrics["frac_hard"].iloc[-1] == 0.25
    stored = run.events.iloc[0]
    assert (stored.step, stored.kind, stored.evidence) == (
        5,
        "collapsed",
        {"ratio": 1.0, "x": None},
    )
    snapshot = run.snapshot(5)
    assert snapshot.embeddings.dtype == np.float32
    np.testing.assert_array_equal(snapshot.embeddings, embeddings)
    np.testing.assert_array_equal(snapshot.labels, np.arange(7))
    assert run.snapshot_steps == (5,)
    with pytest.raises(KeyError):
        run.snapshot(4)


def test_reader_polls_new_rows_and_summarises(tmp_path):
    writer = make_run(tmp_path, steps=3)
    with RunReader(run_path(tmp_path, "run")) as reader:
        assert list(reader.metrics()["step"]) == [0, 1, 2]
        writer.append_metrics(pd.DataFrame({"step": [3, 4], "time": [5.0, 6.0], "loss": [1, 2]}))
        assert list(reader.metrics(since_step=2)["step"]) == []  # not committed yet
        writer.commit()
        new = reader.metrics(since_step=2, columns=["loss"])
        assert list(new.columns) == ["step", "loss"] and list(new["step"]) == [3, 4]
        assert list(reader.metrics(until_step=1)["step"]) == [0, 1]
        assert list(reader.metrics(since_step=0, limit=3)["step"]) == [1, 2, 3]
        assert list(reader.metrics(since_step=3, until_step=9, limit=3)["step"]) == [4]
        summary = reader.summary()
        assert (summary.recorded_steps, summary.last_step, summary.last_loss) == (5, 4, 2.0)
        assert reader.summary(summary) == summary  # nothing new to count
        writer.append_metrics(pd.DataFrame({"step": [9, 12], "time": [7.0, 8.0], "loss": [3, 4]}))
        writer.commit()
        grown = reader.summary(summary)  # counts the rows after step 4 only
        assert grown == reader.summary() and (grown.recorded_steps, grown.last_step) == (7, 12)
        assert summary.state == "healthy" and summary.status == "running"
        with pytest.raises(KeyError, match="unknown metric columns"):
            reader.metrics(columns=["nope"])
    writer.close()


def test_not_a_run(tmp_path):
    (tmp_path / "random.cwrun").write_bytes(os.urandom(4096))
    with pytest.raises(RunFileError, match="not a collapsewatch run"):
        load_run(tmp_path / "random.cwrun")
    other = tmp_path / "other.cwrun"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(RunFileError, match="SQLite database but not a collapsewatch run"):
        load_run(other)
    with pytest.raises(RunFileError, match="no such run file"):
        load_run(tmp_path / "missing.cwrun")
    # A run file cut short (a copy gone wrong) is reported, not a traceback.
    make_run(tmp_path, "good").close()
    data = run_path(tmp_path, "good").read_bytes()
    (tmp_path / "cut.cwrun").write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFileError):
        load_run(tmp_path / "cut.cwrun")
    assert [p.name for p in list_runs(tmp_path)] == [
        "cut.cwrun",
        "good.cwrun",
        "other.cwrun",
        "random.cwrun",
    ]


def test_newer_schema_is_refused(tmp_path):
    make_run(tmp_path).close()
    db = sqlite3.connect(run_path(tmp_path, "run"))
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RunFileError, match="newer collapsewatch"):
        load_run(run_path(tmp_path, "run"))


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 201, "sp ace"])
def test_run_names_cannot_escape_the_log_directory(name):
    with pytest.raises(ValueError, match="run name"):
        check_run_name(name)


def test_a_finished_run_is_one_file_that_readers_leave_alone(tmp_path):
    make_run(tmp_path).close()
    load_run(run_path(tmp_path, "run"))
    with RunReader(run_path(tmp_path, "run")) as reader:
        reader.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.cwrun"]


def test_integer_columns_come_back_as_integers(tmp_path):
    writer = make_run(tmp_path, steps=2)
    writer.append_metrics(
        pd.DataFrame({"step": [2, 3], "time": [1.0, 2.0], "batch_size": [64, 32]})
    )
    writer.close()
    metrics = load_run(run_path(tmp_path, "run")).metrics
    assert metrics["step"].dtype == "int64" and metrics["loss"].dtype == "float64"
    assert metrics["batch_size"].dtype == "Int64"  # missing before step 2
    assert metrics["batch_size"].tolist()[2:] == [64, 32]


def test_metrics_are_append_only(tmp_path):
    writer = make_run(tmp_path, steps=3)
    with pytest.raises(sqlite3.IntegrityError):
        writer.append_metrics(pd.DataFrame({"step": [1], "time": [0.0], "loss": [9.0]}))
    writer.close()
    assert list(load_run(run_path(tmp_path, "run")).metrics["loss"]) == [0.0, 0.1, 0.2]


def test_existing_run_is_never_overwritten(tmp_path):
    make_run(tmp_path).close()
    with pytest.raises(FileExistsError):
        RunWriter(run_path(tmp_path, "run"), {})


def test_snapshots_hold_numbers_only(tmp_path):
    writer = make_run(tmp_path)
    with pytest.raises(ValueError, match="numeric"):
        writer.add_snapshot(0, np.array([[object()]]), None)
    writer.close()


def test_list_runs_of_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_runs(tmp_path / "nope")


def _start_child(logdir, run, steps, sleep, commit_every):
    return subprocess.Popen(
        [sys.executable, str(CHILD), str(logdir), run, str(steps), str(sleep), str(commit_every)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _wait_for_step(child, step):
    for line in child.stdout:
        if line.strip() == f"step {step}":
            return
    raise AssertionError(f"child ended before step {step}")


@pytest.mark.slow
def test_concurrent_reader_while_training_writes(tmp_path):
    child = _start_child(tmp_path, "live", steps=120, sleep=0.01, commit_every=5)
    try:
        _wait_for_step(child, 0)
        seen, reads = [], 0
        while child.poll() is None or reads == 0:
            if run_path(tmp_path, "live").exists():
                try:
                    run = load_run(run_path(tmp_path, "live"))
                except RunFileError:
                    pytest.fail("a reader must never see a half-written run")
                steps = list(run.metrics["step"])
                assert steps == list(range(len(steps)))  # always a clean prefix
                seen.append(len(steps))
                reads += 1
            time.sleep(0.05)
    finally:
        child.wait(60)
    assert seen == sorted(seen) and len(set(seen)) > 2  # it grew while we watched
    final = load_run(run_path(tmp_path, "live"))
    assert len(final.metrics) == 120 and final.metadata["status"] == "finished"


@pytest.mark.slow
def test_kill_minus_9_loses_at_most_the_last_commit_interval(tmp_path):
    child = _start_child(tmp_path, "killed", steps=10_000, sleep=0.02, commit_every=10)
    try:
        _wait_for_step(child, 60)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(60)
    run = load_run(run_path(tmp_path, "killed"))  # opens cleanly
    steps = list(run.metrics["step"])
    assert steps == list(range(len(steps)))
    # Step 60 was printed, so steps up to 50 were flushed at step 59 at the latest; allow
    # one more commit interval for the writer thread to reach its commit.
    assert len(steps) >= 50
    assert run.metadata["status"] == "running"  # never closed
    with RunReader(run_path(tmp_path, "killed")) as reader:
        assert reader.summary().recorded_steps == len(steps)
    db = sqlite3.connect(f"{run_path(tmp_path, 'killed').as_uri()}?mode=ro", uri=True)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_json_safe_turns_every_non_finite_float_into_null_at_any_depth() -> None:
    value = {
        "nan": float("nan"),
        "inf": float("inf"),
        1: (np.float32(0.5), [np.float64("-inf"), np.int64(3)]),
        "nested": {"ok": 2.5, "text": "x", "none": None},
    }
    safe = json_safe(value)
    assert safe == {
        "nan": None,
        "inf": None,
        "1": [0.5, [None, 3]],
        "nested": {"ok": 2.5, "text": "x", "none": None},
    }
    assert type(safe["1"][1][1]) is int and type(safe["1"][0]) is float
    json.dumps(safe, allow_nan=False)  # strict JSON
