"""The reference runs from the detector issue, trained for real, then analysed by the CLI.

scikit-learn digits, MLP 64→256→256→32 with L2-normalised output, batch 256, SGD with
momentum 0.9, margin 0.2 (``collapsewatch.demo``):

* batch-hard at lr 0.5 collapses: loss/margin ≈ 1.000 while the distances vanish;
* the scaled variant at lr 0.05 trains to zero loss, mean pairwise distance ≈ 1.3;
* batch-all at lr 0.5 hovers at loss/margin 0.6–0.96 with spread embeddings: not collapse;
* batch-hard at lr 0.5, switched to the scaled variant at step 150: collapses, recovers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import collapsewatch as cw
from collapsewatch.cli import main
from collapsewatch.demo import DigitsRun, load_digits_tensors, start_run
from collapsewatch.detect import thin

STEPS = 300
SCENARIOS = {
    "batch-hard": (DigitsRun("batch-hard", lr=0.5), None),
    "scaled": (DigitsRun("scaled", scaled=True, lr=0.05), None),
    "batch-all": (DigitsRun("batch-all", mining="batch_all", lr=0.5), None),
    "transient": (DigitsRun("transient", lr=0.5), 150),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("scenarios")
    data = load_digits_tensors()
    paths = {}
    for name, (spec, switch_at) in SCENARIOS.items():
        trainer = start_run(
            spec, logdir=logdir, run=name, data=data, rank_every=25, on_collapse="ignore", every=1
        )
        with trainer.watcher:
            for step in range(STEPS):
                if step == switch_at:
                    trainer.loss_fn.scaled = True  # the fix, applied mid-run
                trainer.step()
        paths[name] = trainer.watcher.path
    return paths


def analyze_json(path, capsys, *extra):
    code = main(["analyze", str(path), "--json", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_batch_hard_collapses_onto_the_margin(runs, capsys):
    code, verdict = analyze_json(runs["batch-hard"], capsys)
    assert code == 0
    assert verdict["collapsed"] and verdict["state"] == "collapsed"
    assert 20 <= verdict["onset_step"] <= 60 and verdict["recovered_step"] is None
    metrics = cw.load_run(runs["batch-hard"]).metrics
    tail = metrics[metrics["step"] >= 100]
    assert tail["loss_margin_ratio"].between(0.995, 1.005).all()
    assert metrics["mean_pairwise_distance"].iloc[0] > 0.4
    assert tail["mean_pairwise_distance"].max() < 0.005
    collapsed = next(e for e in verdict["events"] if e["kind"] == "collapsed")
    assert "scaled variant" in collapsed["suggestion"]
    assert collapsed["evidence"]["mean_pairwise_distance"] < 0.01


def test_scaled_variant_stays_healthy(runs, capsys):
    _, verdict = analyze_json(runs["scaled"], capsys)
    assert not verdict["collapsed"] and verdict["state"] == "healthy"
    assert verdict["events"] == [] and verdict["onset_step"] is None
    metrics = cw.load_run(runs["scaled"]).metrics
    assert metrics["loss"].iloc[-20:].max() < 0.01
    assert 1.1 < metrics["mean_pairwise_distance"].iloc[-1] < 1.4


def test_batch_all_near_the_margin_is_not_collapse(runs, capsys):
    _, verdict = analyze_json(runs["batch-all"], capsys)
    assert not verdict["collapsed"] and verdict["state"] == "healthy"
    tail = cw.load_run(runs["batch-all"]).metrics.iloc[100:]
    assert tail["loss_margin_ratio"].median() > 0.5
    assert tail["mean_pairwise_distance"].min() > 0.8


def test_transient_collapse_recovers(runs, capsys):
    _, verdict = analyze_json(runs["transient"], capsys)
    assert verdict["collapsed"] and verdict["state"] == "healthy"
    assert verdict["onset_step"] < 150 < verdict["recovered_step"] < 250
    assert verdict["collapse_spans"] == [[verdict["onset_step"], verdict["recovered_step"]]]
    assert main(["analyze", str(runs["transient"]), "--fail-on-collapse"]) == 0


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_post_hoc_verdicts_reproduce_the_live_ones(runs, name):
    run = cw.load_run(runs[name])
    live = [(e.step, e.kind, e.state, e.message, e.evidence) for e in run.events.itertuples()]
    for replay in (cw.analyze(runs[name]), cw.analyze(run), cw.analyze(run.metrics)):
        replayed = [(e.step, e.kind, e.state, e.message, dict(e.evidence)) for e in replay.events]
        assert live == replayed


def test_a_run_replays_with_the_thresholds_it_was_recorded_with(tmp_path):
    trainer = start_run(
        DigitsRun("strict", lr=0.5),
        logdir=tmp_path,
        on_collapse="ignore",
        detector=cw.DetectorConfig(window=60),
    )
    with trainer.watcher:
        for _ in range(100):
            trainer.step()
    live = cw.load_run(trainer.watcher.path).events
    collapsed = live[live["kind"] == "collapsed"]["step"].tolist()
    assert cw.analyze(trainer.watcher.path).onset_step == collapsed[0]
    assert collapsed[0] - live["step"].iloc[0] >= 60  # the 60-step window, not the default
    assert cw.analyze(cw.load_run(trainer.watcher.path).metrics).onset_step < collapsed[0]


def test_fail_on_collapse_exit_status(runs, capsys):
    assert main(["analyze", str(runs["batch-hard"]), "--fail-on-collapse"]) == 1
    assert main(["analyze", str(runs["scaled"]), "--fail-on-collapse"]) == 0
    capsys.readouterr()


def test_compare_and_runs(runs, capsys):
    assert main(["compare", *map(str, runs.values()), "--json"]) == 0
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n: r["state"] for n, r in rows.items()} == {
        "batch-hard": "collapsed",
        "scaled": "healthy",
        "batch-all": "healthy",
        "transient": "recovered",
    }
    assert rows["scaled"]["mean_pairwise_distance"] > 1
    assert main(["runs", str(runs["scaled"].parent), "--json"]) == 0
    listed = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["batch-hard"]["state"] == "collapsed"
    assert listed["scaled"]["recorded_steps"] == STEPS
    assert main(["compare", *map(str, runs.values())]) == 0
    table = capsys.readouterr().out
    assert "collapsed" in table and "recovered" in table


def test_human_readable_analysis(runs, capsys):
    assert main(["analyze", str(runs["batch-hard"])]) == 0
    out = capsys.readouterr().out
    assert "collapsed at step" in out and "advice:" in out


def test_bad_paths_exit_2_with_one_line(tmp_path):
    junk = tmp_path / "junk.cwrun"
    junk.write_text("not a database, just text " * 100)
    for argv in (
        ["analyze", str(tmp_path / "missing.cwrun")],
        ["analyze", str(junk)],
        ["compare", str(junk)],
        ["runs", str(tmp_path / "nowhere")],
        ["report", str(junk), "-o", str(tmp_path / "r.html")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "collapsewatch", *argv], capture_output=True, text=True
        )
        assert result.returncode == 2, argv
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, argv
        assert "Traceback" not in result.stderr


def test_console_script_is_installed(runs):
    result = subprocess.run(
        # The script installed beside this interpreter, whatever PATH says.
        [
            Path(sysconfig.get_path("scripts")) / "collapsewatch",
            "analyze",
            str(runs["scaled"]),
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout)["state"] == "healthy"


@pytest.mark.parametrize("every", [4, 10])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_verdict_is_the_same_at_any_recording_interval(runs, name, every):
    """Windows and confirmations are counted in training steps: the rows a run recorded at
    every=k would hold (every k-th of the every=1 run) give the same final state, the same
    sequence of event kinds, and each event within k steps of the every=1 one."""
    run = cw.load_run(runs[name])
    full = cw.analyze(run.metrics)
    sparse = cw.analyze(thin(run.metrics, every))
    assert sparse.state == full.state
    assert [e.kind for e in sparse.events] == [e.kind for e in full.events]
    for dense_event, sparse_event in zip(full.events, sparse.events, strict=True):
        assert abs(sparse_event.step - dense_event.step) <= every, (dense_event, sparse_event)


@pytest.mark.parametrize("every", [4, "auto"])
def test_a_run_recorded_sparsely_gets_the_verdict_of_the_dense_one(runs, tmp_path, every):
    """The same collapsing run trained again, recorded at every=4 and at "auto" (k from
    this machine's timings): same state, onset within one interval."""
    spec, _ = SCENARIOS["batch-hard"]
    trainer = start_run(
        spec, logdir=tmp_path, run="again", data=load_digits_tensors(), rank_every=25,
        on_collapse="ignore", every=every,
    )  # fmt: skip
    with trainer.watcher:
        for _ in range(STEPS):
            trainer.step()
    sparse = cw.analyze(trainer.watcher.path)
    dense = cw.analyze(runs["batch-hard"])
    interval = cw.load_run(trainer.watcher.path).metadata["every"]
    assert sparse.state == dense.state == "collapsed"
    assert abs(sparse.onset_step - dense.onset_step) <= interval
