"""The dashboard's data layer: run ids, cached incremental reads, decimation, projections."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from collapsewatch.dashboard import data
from collapsewatch.dashboard.data import (
    InvalidRunIdError,
    RunCache,
    Span,
    current_alert,
    resolve_run_id,
    run_id_of,
    state_spans,
)
from collapsewatch.dashboard.decimate import (
    Extremes,
    decimate_frame,
    decimate_indices,
    exact_rows,
)

from collapsewatch.store import RunFileError, RunReader, RunWriter
from tests.dashboard.runs import (
    collapsed_event,
    metrics_frame,
    recovered_event,
    settle,
    warning_event,
    write_broken,
    write_run,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- run ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "run_id",
    [
        "a.cwrun",
        "sweep/lr-0.1.cwrun",
        "a/b/c_1.cwrun",
        "multirun/lr=0.1,margin=0.2/run.cwrun",  # Hydra's override folders
        "with space.cwrun",
        "my runs/day 1/run.cwrun",
        "expériences/ラン/run.cwrun",
    ],
)
def test_resolve_run_id_accepts_runs_inside_the_logdir(logdir: Path, run_id: str) -> None:
    assert resolve_run_id(logdir, run_id) == (logdir / run_id).resolve()


@pytest.mark.parametrize(
    "run_id",
    [
        "../../etc/passwd",
        "../../etc/passwd.cwrun",
        "../outside.cwrun",
        "sub/../../outside.cwrun",
        "/etc/passwd.cwrun",
        "//etc/x.cwrun",
        "a.sqlite",
        "a.cwrun/..",
        ".hidden.cwrun",
        "sub/.git/x.cwrun",
        "a\\..\\b.cwrun",
        "a\x00.cwrun",
        "tab\tname.cwrun",
        "sub/new\nline/x.cwrun",
        "",
        ".cwrun",
        "x" * 2000 + ".cwrun",
        None,
        42,
        ["a.cwrun"],
        {"id": "a.cwrun"},
    ],
)
def test_resolve_run_id_rejects_traversal_and_junk(logdir: Path, run_id: object) -> None:
    with pytest.raises(InvalidRunIdError):
        resolve_run_id(logdir, run_id)


def test_resolve_run_id_rejects_a_symlink_out_of_the_logdir(logdir: Path, tmp_path: Path) -> None:
    outside = write_run(tmp_path, "outside")
    (logdir / "link.cwrun").symlink_to(outside)
    with pytest.raises(InvalidRunIdError, match="outside"):
        resolve_run_id(logdir, "link.cwrun")
    # ...and the run list shows it as an error instead of reading it.
    entry = RunCache(logdir).run_list().get("link.cwrun")
    assert entry is not None and entry.summary is None and "outside" in entry.error


def test_run_id_of_round_trips(logdir: Path) -> None:
    path = write_run(logdir / "sweep", "r1")
    run_id = run_id_of(logdir, path)
    assert run_id == "sweep/r1.cwrun"
    assert resolve_run_id(logdir, run_id) == path.resolve()


# -- run list --------------------------------------------------------------------------


def test_run_list_states_and_broken_files(logdir: Path) -> None:
    write_run(logdir, "healthy")
    write_run(logdir, "collapsed", steps=80, collapse_at=40)
    write_run(logdir, "recovered", steps=80, collapse_at=20, recover_at=50)
    write_run(logdir, "warned", events=[warning_event(10)])
    write_broken(logdir, "garbage", "garbage")
    write_broken(logdir, "empty", "empty")
    write_broken(logdir, "foreign", "foreign")
    listing = RunCache(logdir).run_list()
    states = {e.run_id: e.ui_state for e in listing.entries}
    assert states == {
        "collapsed.cwrun": "collapsed",
        "empty.cwrun": "error",
        "foreign.cwrun": "error",
        "garbage.cwrun": "error",
        "healthy.cwrun": "healthy",
        "recovered.cwrun": "recovered",
        "warned.cwrun": "warning",
    }
    assert [e.run_id for e in listing.entries] == sorted(states)
    for name in ("garbage", "empty", "foreign"):
        entry = listing.get(f"{name}.cwrun")
        assert entry.error and entry.summary is None
    collapsed = listing.get("collapsed.cwrun")
    assert collapsed.alert.onset_step == 40 and collapsed.alert.state == "collapsed"
    assert collapsed.alert.evidence["peak_mean_pairwise_distance"] == 0.55
    assert listing.get("healthy.cwrun").alert is None
    assert listing.get("recovered.cwrun").alert is None
    assert collapsed.summary.last_step == 79


def test_run_list_is_cached_for_its_ttl_then_sees_new_runs(logdir: Path) -> None:
    clock = FakeClock()
    cache = RunCache(logdir, list_ttl=1.0, clock=clock)
    write_run(logdir, "first")
    assert [e.run_id for e in cache.run_list().entries] == ["first.cwrun"]
    write_run(logdir / "later", "second")
    clock.now += 0.5
    assert len(cache.run_list().entries) == 1  # still cached
    clock.now += 0.6
    assert [e.run_id for e in cache.run_list().entries] == ["first.cwrun", "later/second.cwrun"]


def test_run_list_of_a_missing_logdir_reports_an_error(tmp_path: Path) -> None:
    listing = RunCache(tmp_path / "gone").run_list()
    assert listing.entries == () and "gone" in listing.error


def test_current_alert_is_the_onset_of_the_current_state() -> None:
    def frame(events):
        return pd.DataFrame(
            {
                "step": [e.step for e in events],
                "kind": [e.kind for e in events],
                "state": [e.state for e in events],
                "message": [e.message for e in events],
                "suggestion": [e.suggestion for e in events],
                "evidence": [dict(e.evidence) for e in events],
            }
        )

    events = [warning_event(5), collapsed_event(30), recovered_event(50), collapsed_event(60)]
    later = dataclasses.replace(collapsed_event(75), kind="nonfinite")  # still collapsed
    alert = current_alert(frame([*events, later]))
    assert alert.onset_step == 60 and alert.kind == "collapsed"
    assert current_alert(frame(events[:3])) is None
    assert current_alert(frame(events[:1])).state == "warning"
    assert current_alert(frame([])) is None


# -- one run: incremental reads --------------------------------------------------------


def _spy_since_steps(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    original = RunReader.metrics

    def spy(self, since_step=None, columns=None, until_step=None, limit=None):
        calls.append(since_step)
        return original(self, since_step, columns, until_step, limit)

    monkeypatch.setattr(RunReader, "metrics", spy)
    return calls


def test_view_fetches_only_rows_after_the_last_step_seen(
    logdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy_since_steps(monkeypatch)
    clock = FakeClock()
    cache = RunCache(logdir, min_refresh=0.25, clock=clock)
    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2})
    writer.append_metrics(metrics_frame(range(10)))
    writer.commit()
    view = cache.view("live.cwrun")
    assert view.last_step == 9 and len(view.metrics) == 10
    assert calls == [None]

    writer.append_metrics(metrics_frame(range(10, 25)))
    writer.append_events([collapsed_event(20)])
    writer.commit()
    assert cache.view("live.cwrun").last_step == 9  # throttled: within min_refresh
    clock.now += 1
    view = cache.view("live.cwrun")
    assert calls == [None, 9]
    assert view.metrics["step"].tolist() == list(range(25))
    assert view.events["kind"].tolist() == ["collapsed"]
    assert view.rows_after(20)["step"].tolist() == [21, 22, 23, 24]
    assert view.rows_after(None) is view.metrics

    clock.now += 1
    cache.view("live.cwrun")
    assert calls == [None, 9, 24]
    writer.close()


def test_view_of_an_unchanged_run_opens_no_file(
    logdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    cache = RunCache(logdir, min_refresh=0.25, clock=clock)
    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2})
    writer.append_metrics(metrics_frame(range(10)))
    writer.commit()
    opened: list[Path] = []
    original = RunReader.__init__
    monkeypatch.setattr(
        RunReader, "__init__", lambda self, path: (opened.append(path), original(self, path))[1]
    )
    assert cache.view("live.cwrun").last_step == 9 and len(opened) == 1
    clock.now += 1
    cache.view("live.cwrun")  # written just now: its stamp may not show the next commit yet
    assert len(opened) == 2
    writer.close()
    settle(logdir)
    for _ in range(3):
        clock.now += 1
        assert cache.view("live.cwrun").last_step == 9
    assert len(opened) == 3  # read once after it settled, then never opened again
    frozen = {p: os.stat(p).st_mtime for p in logdir.iterdir()}
    writer = RunWriter(logdir / "next.cwrun", {"margin": 0.2})  # another file: no effect
    writer.close()
    clock.now += 1
    cache.view("live.cwrun")
    assert len(opened) == 3 and frozen == {p: os.stat(p).st_mtime for p in frozen}


def test_view_reads_a_long_run_in_chunks_that_add_up_to_it(
    logdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_run(logdir, "long", steps=np.arange(50) * 3)
    monkeypatch.setattr(data, "READ_CHUNK", 7)
    calls = _spy_since_steps(monkeypatch)
    view = RunCache(logdir).view("long.cwrun")
    # Each query reads at most 7 rows, from the last step the one before read.
    assert calls == [None, *range(18, 150, 21)]
    with RunReader(logdir / "long.cwrun") as reader:
        pd.testing.assert_frame_equal(view.metrics.drop(columns="reference_rank"), reader.metrics())


def test_view_rereads_a_replaced_run_file(logdir: Path) -> None:
    clock = FakeClock()
    cache = RunCache(logdir, min_refresh=0, clock=clock)
    path = write_run(logdir, "r", steps=30)
    assert cache.view("r.cwrun").last_step == 29
    os.remove(path)
    write_run(logdir, "r", steps=5, metadata={"created": 1.0})
    view = cache.view("r.cwrun")
    assert view.metrics["step"].tolist() == list(range(5))


def test_view_derives_the_ratio_when_the_column_is_missing(logdir: Path) -> None:
    write_run(logdir, "old", steps=5, columns=["loss"])
    view = RunCache(logdir).view("old.cwrun")
    assert np.allclose(view.metrics["loss_margin_ratio"], view.metrics["loss"] / 0.2)


def test_view_errors(logdir: Path) -> None:
    cache = RunCache(logdir)
    write_broken(logdir, "bad")
    with pytest.raises(RunFileError):
        cache.view("bad.cwrun")
    with pytest.raises(RunFileError):
        cache.view("missing.cwrun")
    with pytest.raises(InvalidRunIdError):
        cache.view("../../etc/passwd")


def test_state_spans() -> None:
    def events(*pairs):
        return pd.DataFrame({"step": [p[0] for p in pairs], "state": [p[1] for p in pairs]})

    seq = events(
        (5, "warning"), (10, "collapsed"), (20, "healthy"), (30, "collapsed"), (31, "collapsed")
    )
    assert state_spans(seq) == [Span(10, 20), Span(30, None)]
    assert state_spans(seq, ("warning", "collapsed")) == [Span(5, 20), Span(30, None)]
    assert state_spans(events()) == []
    # A rescue ends the span at its step and never opens one; a later collapse does.
    rescued = seq.assign(kind=["warning", "collapsed", "rescued", "collapsed", "x"])
    rescued["state"] = ["warning", "collapsed", "collapsed", "collapsed", "collapsed"]
    assert state_spans(rescued) == [Span(10, 20), Span(30, None)]
    assert Span(30, None).stop(99) == 99 and Span(30, 40).stop(99) == 40


# -- decimation ------------------------------------------------------------------------


def test_decimation_keeps_short_series_whole() -> None:
    steps = np.arange(100)
    assert decimate_indices(steps, np.random.rand(100), 100).tolist() == list(range(100))


def test_decimation_of_100k_rows_is_bounded_and_keeps_extremes() -> None:
    rng = np.random.default_rng(0)
    n, max_points = 100_000, 2000
    steps = np.arange(n) * 3  # sparse steps: bucketing is by step, not by row
    values = np.cumsum(rng.normal(0, 1, n))
    values[12_345] = 1e6  # a one-step spike
    values[77_777] = -1e6
    other = rng.normal(0, 1, n)
    other[::7] = np.nan
    both = np.column_stack([values, other])
    keep = decimate_indices(steps, both, max_points)
    assert len(keep) <= max_points + 2
    assert {0, n - 1, 12_345, 77_777, int(np.nanargmax(other)), int(np.nanargmin(other))} <= set(
        keep.tolist()
    )
    assert np.all(np.diff(keep) > 0)  # sorted, unique


def _decimation_by_loop(steps: np.ndarray, values: np.ndarray, max_points: int) -> list[int]:
    """The decimation rule spelled out: the measured rows (a finite value in some column)
    if they fit the budget; else, per bucket of the narrowest power-of-two width that fits
    the steps in max_points // (2k) buckets from the first measured step, and per column,
    the first row of the smallest and of the largest finite value; and the first and last
    measured rows."""
    n, k = values.shape
    measured = [r for r in range(n) if any(math.isfinite(v) for v in values[r])]
    if len(measured) <= max_points:
        return measured
    buckets = max(1, max_points // (2 * k))
    origin = int(steps[measured[0]])
    width = 1
    while (int(steps[measured[-1]]) - origin) // width >= buckets:
        width *= 2
    members: dict[int, list[int]] = {}
    for row in measured:
        members.setdefault((int(steps[row]) - origin) // width, []).append(row)
    keep = {measured[0], measured[-1]}
    for rows in members.values():
        for column in range(k):
            finite = [r for r in rows if math.isfinite(values[r, column])]
            if finite:
                keep.add(min(finite, key=lambda r: (values[r, column], r)))
                keep.add(min(finite, key=lambda r: (-values[r, column], r)))
    return sorted(keep)


def _random_series(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    steps = 7 + np.cumsum(rng.integers(1, 5, n))  # uneven logging: unequal rows per bucket
    values = np.round(rng.normal(0, 1, (n, 3)), 1)  # rounded: many ties inside a bucket
    values[rng.random((n, 3)) < 0.2] = np.nan
    values[:3] = np.nan  # the first rows measure nothing
    values[5, 0], values[7, 1], values[9, 2] = np.inf, -np.inf, -0.0
    values[1000:3000, 1] = np.nan  # buckets where one column has nothing to keep
    values[4000:4100] = np.nan  # rows where no column has anything
    return steps, values


def test_decimation_matches_the_rule_spelled_out_as_a_loop() -> None:
    steps, values = _random_series(3, 20_000)
    for max_points in (60, 600, 6000, 40_000):
        keep = decimate_indices(steps, values, max_points)
        assert keep.tolist() == _decimation_by_loop(steps, values, max_points)


def test_extremes_folded_as_rows_arrive_equal_one_fold_over_all_rows() -> None:
    steps, values = _random_series(4, 20_000)
    rng = np.random.default_rng(5)
    for max_points in (60, 600, 6000):
        whole = Extremes.start(max_points, 3).extend(steps, values, 0)
        # Polls of any size, from one row to thousands, some with nothing measured.
        cuts = np.unique(np.r_[0, rng.integers(0, len(steps), 60), 4000, 4050, len(steps)])
        folded = Extremes.start(max_points, 3)
        for lo, hi in itertools.pairwise(cuts):
            folded = folded.extend(steps[lo:hi], values[lo:hi], int(lo))
        assert folded.kept().tolist() == whole.kept().tolist()
        assert folded.kept().tolist() == _decimation_by_loop(steps, values, max_points)
        assert (folded.count, folded.first, folded.last) == (whole.count, whole.first, whole.last)


def test_exact_rows_survive_decimation() -> None:
    n = 50_000
    steps = np.arange(n)
    exact = np.zeros(n, dtype=bool)
    exact[30_000:30_050] = True
    keep = decimate_indices(steps, np.sin(steps / 500), 500, exact)
    assert set(range(30_000, 30_050)) <= set(keep.tolist())


def test_exact_rows_keep_short_spans_whole_and_long_span_ends() -> None:
    frame = pd.DataFrame({"step": np.arange(10_000), "v": np.arange(10_000.0)})
    short = exact_rows(frame, ["v"], [Span(100, 150)], [], 9_999, budget=1000)
    assert short.tolist() == list(range(100, 151))
    long = exact_rows(frame, ["v"], [Span(1000, None)], [5000], 9_999, budget=1000)
    # Both ends of the span, and the event step with its neighbours.
    assert long.tolist() == [*range(1000, 1500), 4999, 5000, 5001, *range(9500, 10_000)]
    # A column measured every 100th row: the event's neighbours are measured rows.
    rank = frame.assign(v=np.where(frame["step"] % 100 == 0, 1.0, np.nan))
    assert exact_rows(rank, ["v"], [], [5050, 0, 9990], None, 1000).tolist() == [
        0,
        100,
        5000,
        5100,
        5200,
        9900,
    ]


def test_decimate_frame_for_a_100k_step_collapsed_run() -> None:
    frame = metrics_frame(range(100_000), collapse_at=60_000)
    frame.loc[123, "loss_margin_ratio"] = 7.5  # a spike before the collapse
    rows = decimate_frame(
        frame, ["loss_margin_ratio"], 2000, [Span(60_000, None)], [60_000], 99_999
    )
    assert len(rows) <= 2000 * 2
    steps = set(rows["step"].tolist())
    assert {0, 123, 59_999, 60_000, 60_001, 99_999} <= steps
    assert rows["loss_margin_ratio"].max() == frame["loss_margin_ratio"].max()
    assert rows["loss_margin_ratio"].min() == frame["loss_margin_ratio"].min()
    # The effective rank is NaN between rank steps: only its real rows are plotted.
    rank = decimate_frame(frame, ["effective_rank"], 2000)
    assert rank["effective_rank"].notna().all()
    assert decimate_frame(frame, ["no_such_column"], 2000).empty


# -- projections -----------------------------------------------------------------------


def test_pca_projection_shares_axes_so_collapse_is_visible(logdir: Path) -> None:
    write_run(logdir, "c", steps=100, collapse_at=50, snapshots=[0, 30, 60, 90])
    cache = RunCache(logdir)
    early = cache.projection("c.cwrun", 0)
    late = cache.projection("c.cwrun", 90)
    assert early.extent == late.extent  # fixed axes across the slider
    assert early.xy.shape == (60, 2) and early.labels.tolist()[:3] == [0, 1, 2]
    spread_early = np.ptp(early.xy, axis=0).max()
    spread_late = np.ptp(late.xy, axis=0).max()
    assert spread_late < spread_early / 100  # the points fall onto one spot
    assert late.radius < early.radius / 100
    assert early.reference_radius == early.radius
    assert cache.projection("c.cwrun", 90) is late  # cached
    with pytest.raises(KeyError):
        cache.projection("c.cwrun", 7)
    with pytest.raises(ValueError, match="method"):
        cache.projection("c.cwrun", 0, "umap")


def test_tsne_projection(logdir: Path) -> None:
    write_run(logdir, "c", steps=10, snapshots=[0])
    projection = RunCache(logdir).projection("c.cwrun", 0, "tsne")
    assert projection.xy.shape == (60, 2) and projection.extent is None
    assert np.isfinite(projection.xy).all()
    assert projection.axis_titles == ("t-SNE 1", "t-SNE 2")


def test_the_cache_is_safe_under_concurrent_callbacks(logdir: Path) -> None:
    """Flask serves callbacks from several threads while training appends to the run."""
    from concurrent.futures import ThreadPoolExecutor

    writer = RunWriter(logdir / "live.cwrun", {"margin": 0.2})
    writer.append_metrics(metrics_frame(range(10)))
    writer.commit()
    write_run(logdir, "other", steps=20)
    cache = RunCache(logdir, list_ttl=0, min_refresh=0)

    def poll(i: int) -> tuple[list[int], int]:
        view = cache.view("live.cwrun" if i % 2 else "other.cwrun")
        cache.run_list()
        return view.metrics["step"].tolist(), len(view.metrics)

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(poll, i) for i in range(200)]
        for start in range(10, 200, 10):
            writer.append_metrics(metrics_frame(range(start, start + 10)))
            writer.commit()
        results = [f.result() for f in futures]
    writer.close()
    for steps, n in results:
        assert steps == list(range(n))  # never a duplicated, missing or reordered row
    assert cache.view("live.cwrun").metrics["step"].tolist() == list(range(200))


def test_runs_in_hydra_spaced_and_unicode_folders_are_read_not_error_cards(logdir: Path) -> None:
    folders = ["multirun/lr=0.1,margin=0.2", "my runs/day 1", "expériences/ラン"]
    for i, folder in enumerate(folders):
        write_run(logdir / folder, "run", steps=10 + i)
    cache = RunCache(logdir)
    entries = cache.run_list().entries
    assert sorted(e.run_id for e in entries) == sorted(f"{f}/run.cwrun" for f in folders)
    assert [e.error for e in entries] == [None] * 3
    for entry in entries:
        view = cache.view(entry.run_id)
        assert len(view.metrics) == entry.summary.recorded_steps >= 10
