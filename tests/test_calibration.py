"""The calibration's truth rule (benchmarks/calibrate_regimes.py), by its definition."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import calibrate_regimes

from collapsewatch import DetectorConfig


def probes(flags: str) -> list[tuple[int, bool]]:
    """'.' clear, 'x' collapsed, one probe every PROBE_EVERY steps from 0."""
    return [(i * calibrate_regimes.PROBE_EVERY, flag == "x") for i, flag in enumerate(flags)]


def test_a_stretch_of_probes_stands_for_the_detectors_window():
    config = DetectorConfig()
    every = calibrate_regimes.PROBE_EVERY
    assert calibrate_regimes.CONFIRM_PROBES * every == config.window
    assert calibrate_regimes.RECOVERY_PROBES * every == config.recovery_window


@pytest.mark.parametrize(
    ("flags", "onsets", "collapsed_at_end"),
    [
        ("..xxx....", [], False),  # 15 steps below the line: shorter than the window
        ("..xxxx...", [10], True),  # 20 steps, then clear for 15: the collapse stays...
        ("..xxxx.x..", [10], True),  # ... and a clear probe that does not last breaks nothing
        ("..xxxx....", [10], False),  # 20 steps clear: recovered
        ("..xx.xxxx.", [25], True),  # a contrary probe restarts the stretch
        ("xxxx....xxxxx", [0, 40], True),  # collapsed, recovered, collapsed again
    ],
)
def test_the_truth_begins_and_ends_a_collapse_with_a_window_of_probes(
    flags, onsets, collapsed_at_end
):
    assert calibrate_regimes.truth_collapses(probes(flags)) == (onsets, collapsed_at_end)
