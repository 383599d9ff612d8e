"""One run-state vocabulary: every medium knows every state, and "diverged" fails a run."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapsewatch import cli, trackers
from collapsewatch.detect import CollapseDetector, analyze
from collapsewatch.states import DETECTOR_STATES, FAILED_STATES, RunState, display_state
from collapsewatch.store import RunReader, RunWriter, load_run, run_path
from dashboard import data, figures, layout, report

CSS = Path(data.__file__).with_name("assets") / "style.css"


def test_display_state_derives_recovered_once():
    assert display_state("healthy", ever_collapsed=True) is RunState.RECOVERED
    assert display_state("healthy", ever_collapsed=False) is RunState.HEALTHY
    assert display_state("diverged", ever_collapsed=True) is RunState.DIVERGED
    assert display_state("collapsed", ever_collapsed=True) is RunState.COLLAPSED
    with pytest.raises(ValueError):
        display_state("exploded", ever_collapsed=False)


def test_states_read_as_their_values():
    assert f"{RunState.DIVERGED}" == str(RunState.DIVERGED) == "diverged"
    assert {RunState.WARNING: 1}.get("warning") == 1  # tables answer plain strings
    assert {"collapsed", "diverged"} == FAILED_STATES


@pytest.mark.parametrize("state", list(RunState))
def test_every_medium_shows_every_state(state):
    assert state in cli.STATE_STYLE
    assert state in figures.STATE_COLOURS
    assert state in layout.STATE_SYMBOLS
    assert state.value in data.UI_STATES
    css = CSS.read_text()
    assert re.search(rf"\.cw-badge-{state.value} \{{", css), state


@pytest.mark.parametrize("state", DETECTOR_STATES)
def test_trackers_code_every_detector_state(state):
    integration = pytest.importorskip("collapsewatch.integrations.sentence_transformers")
    assert state in integration.STATE_CODES
    if state in FAILED_STATES:
        assert trackers._WANDB_LEVELS[state] == "ERROR"


def diverged_run(tmp_path):
    """A run whose loss turns NaN at step 30 and stays NaN: written through the detector."""
    n = 40
    rows = pd.DataFrame(
        {
            "step": np.arange(n),
            "time": 100.0 + np.arange(n),
            "loss": [0.5] * 30 + [np.nan] * 10,
            "margin": 0.2,
            "loss_margin_ratio": [2.5] * 30 + [np.nan] * 10,
            "mean_pairwise_distance": 1.0,
            "embedding_norm_mean": 1.0,
            "nonfinite_loss_count": [0] * 30 + [1] * 10,
        }
    )
    detector = CollapseDetector()
    events = detector.replay(rows)
    writer = RunWriter(run_path(tmp_path, "blew-up"), {"margin": 0.2})
    writer.append_metrics(rows)
    writer.append_events(events)
    writer.close()
    return run_path(tmp_path, "blew-up"), detector


def test_a_diverged_run_is_diverged_in_the_store_and_fails_analyze(tmp_path, capsys):
    path, detector = diverged_run(tmp_path)
    assert detector.state is RunState.DIVERGED
    with RunReader(path) as reader:
        summary = reader.summary()
    assert summary.state == "diverged" and not summary.ever_collapsed
    assert cli.main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "diverged at step 30" in out and "clip" in out
    assert cli.main(["analyze", str(path), "--fail-on-collapse"]) == 1
    capsys.readouterr()
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    assert '"state": "diverged"' in capsys.readouterr().out


def test_the_report_of_a_diverged_run_says_so(tmp_path):
    path, _ = diverged_run(tmp_path)
    run = load_run(path)
    page = report.write_report(run, analyze(run), tmp_path / "r.html").read_text()
    assert "Diverged at step 30 and still diverged at the last step." in page
    assert figures.STATE_COLOURS[RunState.DIVERGED] in page
