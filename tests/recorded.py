"""What a run recorded with the default ``every="auto"``."""

from __future__ import annotations

import numpy as np

from collapsewatch.cadence import CALIBRATION_STEPS


def assert_recorded(run, steps: int) -> None:
    """``run`` trained ``steps`` steps from 0 at ``every="auto"``: it recorded each of the
    first ``CALIBRATION_STEPS``, then steps at most ``every`` apart (2 while the interval is
    timed, every one while it is undecided), up to within ``every`` of the end."""
    recorded = run.metrics["step"].tolist()
    every = max(run.metadata["every"] or 1, 2)  # undecided: maybe still alternating
    assert recorded[:CALIBRATION_STEPS] == list(range(min(steps, CALIBRATION_STEPS)))
    gaps = np.diff(recorded)
    assert ((gaps >= 1) & (gaps <= every)).all(), recorded
    assert steps - every <= recorded[-1] < steps
