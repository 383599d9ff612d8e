"""The recording and difficulty intervals: chosen from device timings to fit the budget."""

from __future__ import annotations

import math

import pytest
import torch

import collapsewatch as cw
from collapsewatch import cadence
from collapsewatch.cadence import CALIBRATION_STEPS, RECORDING_PAIRS, Cadence
from collapsewatch.demo import DigitsEmbedder, DigitsRun, load_digits_tensors, start_run, train
from collapsewatch.losses import functional


class ScriptedClock:
    """A device clock whose marks are given times (seconds)."""

    def __init__(self, times):
        self.times = iter(times)

    def mark(self):
        return next(self.times)

    def seconds(self, start, end):
        return end - start


def expected(cost, budget, most=cadence.MAX_INTERVAL):
    return min(max(1, math.ceil(round(cost / budget, 9))), most)


def calibrated(monkeypatch, step_seconds, counts_seconds, overhead, every=4):
    # Eight loss calls `step_seconds` apart (difficulty counted on each), then the one
    # measurement: statistics without the counts (1 ms), with them (1 ms + counts).
    calls = [i * step_seconds for i in range(CALIBRATION_STEPS)]
    t = calls[-1] + 0.5
    measure = [t, t + 0.001, t + 0.002 + counts_seconds]
    cad = Cadence(every, "auto", overhead, torch.device("cpu"))
    monkeypatch.setattr(cad, "_clock", ScriptedClock(calls + measure))
    due = []
    for step in range(CALIBRATION_STEPS):
        cad.loss_called(step)
        due.append(cad.counts_difficulty(step))
    assert due == [True] * CALIBRATION_STEPS and cad.interval is None
    assert cad.wants_measurement
    cad.measure(lambda: None, lambda: None)
    cad.loss_called(CALIBRATION_STEPS)
    return cad


@pytest.mark.parametrize(
    ("step_seconds", "counts_seconds", "overhead"),
    [(0.005, 0.003, 0.03), (0.100, 0.003, 0.03), (0.005, 0.003, 0.5), (0.004, 0.0, 0.03)],
)
def test_difficulty_interval_keeps_the_counts_within_half_the_budget(
    monkeypatch, step_seconds, counts_seconds, overhead
):
    cad = calibrated(monkeypatch, step_seconds, counts_seconds, overhead)
    step = step_seconds - counts_seconds  # the calibration steps carried the counts
    assert cad.interval == expected(counts_seconds, overhead / 2 * step)
    assert counts_seconds / (cad.interval * step) <= overhead / 2 + 1e-12
    assert cad.measured == pytest.approx(
        {"difficulty_seconds": counts_seconds, "step_seconds": step}
    )
    steps = range(10_000, 10_000 + 5 * cad.interval)
    counted = [s for s in steps if cad.counts_difficulty(s)]
    assert counted == list(range(10_000, 10_000 + 5 * cad.interval, cad.interval))


@pytest.mark.parametrize(
    ("step_seconds", "record_seconds", "host", "writer", "overhead", "most"),
    [
        (0.005, 0.001, 0.0002, 0.0001, 0.03, 10_000),  # a small CPU model: k > 1
        (0.050, 0.0001, 0.00001, 0.00002, 0.03, 10_000),  # a large step: every step
        (0.005, 0.001, 0.0002, 0.0001, 0.03, 10),  # capped by the detector's window
        (0.005, 0.0, 0.0, 0.0, 0.03, 10_000),  # free: every step
    ],
)
def test_recording_interval_fits_the_budget(
    monkeypatch, step_seconds, record_seconds, host, writer, overhead, most
):
    """Phase 3: recorded and skipped steps alternate; r is their median gap difference plus
    the timed commit per row, t the skipped steps' median gap."""
    calls = [i * step_seconds for i in range(CALIBRATION_STEPS)]
    t = calls[-1] + step_seconds
    measure = [t, t + 0.001, t + 0.002 + 0.003]
    alternating, clock = [], t + 0.01
    for i in range(2 * RECORDING_PAIRS + 1):
        alternating.append(clock)
        # One outlier per kind, which the medians must ignore.
        noise = 0.5 if i in (2, 3) else 0.0
        clock += step_seconds + (record_seconds if i % 2 == 0 else 0.0) + noise
    cad = Cadence("auto", "auto", overhead, torch.device("cpu"), max_every=most)
    monkeypatch.setattr(cad, "_clock", ScriptedClock(calls + measure + alternating))
    step, recorded, counted = 0, [], []
    for step in range(CALIBRATION_STEPS):
        cad.loss_called(step)
        assert cad.records(step) and cad.counts_difficulty(step)
    cad.measure(lambda: None, lambda: None)  # on the last step of phase 1
    assert cad.wants_flush  # the untimed first commit
    cad.committed("host", 1.0, 8)
    cad.committed("writer", 1.0, 8)
    assert not cad.wants_flush
    for step in range(CALIBRATION_STEPS, CALIBRATION_STEPS + 2 * RECORDING_PAIRS + 1):
        assert cad.records(step) == (
            step == CALIBRATION_STEPS
            or cad.every is not None
            or ((step - CALIBRATION_STEPS) % 2 == 0)
        )
        cad.loss_called(step)
        if cad.records(step):
            recorded.append(step)
            counted += [step] if cad.counts_difficulty(step) else []
    assert cad.every is None and cad.wants_flush  # waiting for the timed commit
    rows = len(recorded)
    cad.committed("host", host * rows, rows)
    cad.committed("writer", writer * rows, rows)
    assert counted == [step]  # none while recording is timed, then every step until decided
    step += 1
    cad.loss_called(step)
    want = expected(record_seconds + host + writer, overhead / 2 * step_seconds, most)
    assert cad.every == want
    assert cad.measured["step_seconds"] == pytest.approx(step_seconds)
    assert cad.measured["record_seconds"] == pytest.approx(record_seconds, abs=1e-12)
    assert cad.interval == expected(0.003, overhead / 2 * step_seconds)
    # The interval counts from the step after the decision; difficulty only on those.
    later = range(step + 1, step + 1 + 4 * want)
    assert [s for s in later if cad.records(s)] == list(range(step + 1, later.stop, want))
    if want < most:
        assert (record_seconds + host + writer) / want <= overhead / 2 * step_seconds + 1e-12


def test_recording_waits_for_the_device():
    """On CUDA the marks are events: nothing is decided before the device reached them."""

    class LateClock(ScriptedClock):
        def seconds(self, start, end):
            return None

    cad = Cadence("auto", 5, 0.03, torch.device("cpu"))
    cad._clock = LateClock(iter(range(100)))
    for step in range(60):
        cad.loss_called(step)
        if cad.wants_flush:
            cad.committed("host", 0.0, 1)
            cad.committed("writer", 0.0, 1)
    assert cad.every is None and cad.records(60)  # undecided: every step is recorded


def test_fixed_and_distributed_intervals():
    fixed = Cadence(1, 4, 0.03, torch.device("cpu"))
    assert [s for s in range(12) if fixed.counts_difficulty(s)] == [0, 4, 8]
    assert all(fixed.records(s) for s in range(12)) and not fixed.wants_flush
    sparse = Cadence(3, 1, 0.03, torch.device("cpu"))
    assert [s for s in range(10) if sparse.records(s)] == [0, 3, 6, 9]
    shared = Cadence("auto", "auto", 0.03, torch.device("cpu"), distributed=True)
    assert shared.interval == cadence.DISTRIBUTED_INTERVAL and not shared.wants_measurement
    assert shared.every == 1
    for bad in (0, -1, 1.5, "sometimes", True):
        with pytest.raises(ValueError, match="difficulty_every"):
            Cadence(1, bad, 0.03, torch.device("cpu"))
        with pytest.raises(ValueError, match="every must"):
            cw.watch(DigitsEmbedder(), cw.losses.BatchHardTripletLoss(), every=bad)
    with pytest.raises(ValueError, match="overhead"):
        cw.watch(DigitsEmbedder(), cw.losses.BatchHardTripletLoss(), overhead=0)


def test_watch_chooses_and_stores_the_recording_interval(tmp_path):
    """Default every="auto" on a real loop: the interval is stored, steps are recorded at
    it after calibration, and the detector's columns are there on every recorded step."""
    images, labels = load_digits_tensors()
    net, loss_fn = DigitsEmbedder(), cw.losses.BatchHardTripletLoss()
    with cw.watch(net, loss_fn, logdir=tmp_path) as w:
        for i in range(120):
            rows = slice((i % 20) * 64, (i % 20 + 1) * 64)
            loss_fn(net(images[rows]), labels[rows]).backward()
    run = cw.load_run(w.path)
    every = run.metadata["every"]
    assert every == w.cadence.every and 1 <= every <= cw.DetectorConfig().window // 2
    timing = run.metadata["cadence_timing"]
    assert {"step_seconds", "record_seconds", "commit_host_seconds"} <= set(timing)
    steps = run.metrics["step"].tolist()
    assert steps[:CALIBRATION_STEPS] == list(range(CALIBRATION_STEPS))
    alternating = range(CALIBRATION_STEPS, CALIBRATION_STEPS + 2 * RECORDING_PAIRS)
    assert [s for s in steps if s in alternating] == list(alternating)[::2]
    gaps = {b - a for a, b in zip(steps[-5:-1], steps[-4:], strict=True)}
    assert gaps == {every}
    assert run.metrics["mean_pairwise_distance"].notna().all()


def test_watch_counts_difficulty_on_the_chosen_steps(tmp_path):
    images, labels = load_digits_tensors()
    net, loss_fn = DigitsEmbedder(), cw.losses.BatchHardTripletLoss()
    with cw.watch(net, loss_fn, logdir=tmp_path, every=1, difficulty_every=3) as w:
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
    counts = ("num_valid_triplets", "num_valid_anchors", "num_loss_terms", "num_pairs")
    for name in (*counts, "num_between_class_pairs"):
        assert spread[name].item() == full[name].item(), name
    for name in ("mean_pairwise_distance", "mean_between_class_distance"):
        assert spread[name].item() == pytest.approx(full[name].item(), rel=1e-6), name
    for name in ("num_easy", "num_hard", "sum_hardest_positive", "frac_positive_loss"):
        assert math.isnan(spread[name].item()), name


@pytest.mark.parametrize("every", [4, 10])
def test_a_sparser_recording_flags_the_same_collapse_within_one_interval(tmp_path, every):
    """The digits collapse (batch-hard, lr 0.5) recorded every step and every k-th step of
    the same training (same seed and batches: watching never changes the gradients): the
    onset moves by less than k steps, and the losses of the steps both recorded agree."""
    data = load_digits_tensors()
    verdicts, metrics = {}, {}
    for k in (1, every):
        trainer = start_run(
            DigitsRun("batch-hard", lr=0.5),
            logdir=tmp_path,
            run=f"k{k}",
            data=data,
            every=k,
            on_collapse="ignore",
        )
        run = cw.load_run(train(trainer, 80))
        verdicts[k], metrics[k] = cw.analyze(run.metrics), run.metrics.set_index("step")
    assert verdicts[1].collapsed and verdicts[every].collapsed
    assert 0 <= verdicts[every].onset_step - verdicts[1].onset_step < every
    both = metrics[every].index
    assert list(both) == list(range(0, 80, every))
    assert metrics[every]["loss"].to_numpy() == pytest.approx(
        metrics[1].loc[both, "loss"].to_numpy(), rel=1e-5
    )
