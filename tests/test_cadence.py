"""The difficulty interval: chosen from device timings to fit the overhead budget."""

from __future__ import annotations

import math

import pytest
import torch

import collapsewatch as cw
from collapsewatch import cadence
from collapsewatch.cadence import CALIBRATION_STEPS, DifficultyCadence
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors
from collapsewatch.losses import functional


class ScriptedClock:
    """A device clock whose marks are given times (seconds)."""

    def __init__(self, times):
        self.times = iter(times)

    def mark(self):
        return next(self.times)

    def seconds(self, start, end):
        return end - start


def calibrated(monkeypatch, step_seconds, counts_seconds, overhead):
    # Eight loss calls `step_seconds` apart (difficulty counted on each), then the one
    # measurement: statistics without the counts (1 ms), with them (1 ms + counts).
    calls = [i * step_seconds for i in range(CALIBRATION_STEPS)]
    t = calls[-1] + 0.5
    measure = [t, t + 0.001, t + 0.002 + counts_seconds]
    cad = DifficultyCadence("auto", overhead, torch.device("cpu"), distributed=False)
    monkeypatch.setattr(cad, "_clock", ScriptedClock(calls + measure))
    due = []
    for step in range(CALIBRATION_STEPS):
        cad.loss_called()
        due.append(cad.due(step))
    assert due == [True] * CALIBRATION_STEPS and cad.interval is None
    assert cad.wants_measurement
    cad.measure(lambda: None, lambda: None)
    cad.loss_called()
    return cad


@pytest.mark.parametrize(
    ("step_seconds", "counts_seconds", "overhead"),
    [(0.005, 0.003, 0.03), (0.100, 0.003, 0.03), (0.005, 0.003, 0.5), (0.004, 0.0, 0.03)],
)
def test_interval_keeps_the_counts_within_the_budget(
    monkeypatch, step_seconds, counts_seconds, overhead
):
    cad = calibrated(monkeypatch, step_seconds, counts_seconds, overhead)
    step = step_seconds - counts_seconds  # the calibration steps carried the counts
    want = max(1, math.ceil(round(counts_seconds / (overhead * step), 9)))
    assert cad.interval == want
    assert counts_seconds / (cad.interval * step) <= overhead + 1e-12
    assert cad.measured == pytest.approx(
        {"difficulty_seconds": counts_seconds, "step_seconds": step}
    )
    steps = range(100, 100 + 5 * cad.interval)
    counted = [s for s in steps if cad.due(s)]
    assert counted == list(range(100, 100 + 5 * cad.interval, cad.interval))


def test_fixed_and_distributed_intervals():
    fixed = DifficultyCadence(4, 0.03, torch.device("cpu"), distributed=False)
    assert [s for s in range(12) if fixed.due(s)] == [0, 4, 8]
    shared = DifficultyCadence("auto", 0.03, torch.device("cpu"), distributed=True)
    assert shared.interval == cadence.DISTRIBUTED_INTERVAL and not shared.wants_measurement
    for bad in (0, -1, 1.5, "sometimes", True):
        with pytest.raises(ValueError, match="difficulty_every"):
            DifficultyCadence(bad, 0.03, torch.device("cpu"), distributed=False)
    with pytest.raises(ValueError, match="overhead"):
        cw.watch(DigitsEmbedder(), cw.losses.BatchHardTripletLoss(), overhead=0)


def test_watch_counts_difficulty_on_the_chosen_steps(tmp_path):
    images, labels = load_digits_tensors()
    net, loss_fn = DigitsEmbedder(), cw.losses.BatchHardTripletLoss()
    with cw.watch(net, loss_fn, logdir=tmp_path, difficulty_every=3) as w:
        for i in range(10):
            loss_fn(net(images[i * 64 : (i + 1) * 64]), labels[i * 64 : (i + 1) * 64])
    assert loss_fn.difficulty is True and loss_fn.statistics is False  # left as found
    run = cw.load_run(w.path)
    counted = run.metrics.dropna(subset=["frac_hard"])["step"].tolist()
    assert counted == [0, 3, 6, 9] and run.metadata["difficulty_every"] == 3
    assert run.metrics["mean_pairwise_distance"].notna().all()  # the detector's, every step
    assert run.metrics["loss"].notna().all()


def test_statistics_without_difficulty_keep_what_every_step_needs():
    images, labels = load_digits_tensors()
    z, y = DigitsEmbedder()(images[:200]).detach(), labels[:200]
    full = functional.triplet_statistics(z, y, 0.2).as_dict()
    spread = functional.triplet_statistics(z, y, 0.2, with_difficulty=False).as_dict()
    for name in ("num_valid_triplets", "num_valid_anchors", "num_loss_terms", "num_pairs"):
        assert spread[name].item() == full[name].item(), name
    assert spread["mean_pairwise_distance"].item() == pytest.approx(
        full["mean_pairwise_distance"].item(), rel=1e-6
    )
    for name in ("num_easy", "num_hard", "sum_hardest_positive", "frac_positive_loss"):
        assert math.isnan(spread[name].item()), name
