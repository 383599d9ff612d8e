"""The detector's rules on hand-made metric streams."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from collapsewatch.detect import (
    CollapseDetector,
    DetectorConfig,
    analyze,
    thin,
    verdict_from_events,
)


def stream(ratios, distances, *, margin=0.2, start=0, **extra):
    rows = []
    for i, (ratio, distance) in enumerate(zip(ratios, distances, strict=True)):
        row = {
            "step": start + i,
            "time": 100.0 + i,
            "loss_margin_ratio": ratio,
            "margin": margin,
            "mean_pairwise_distance": distance,
        }
        row.update({k: v[i] if isinstance(v, list) else v for k, v in extra.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def kinds(verdict):
    return [(e.step, e.kind) for e in verdict.events]


def test_plateau_with_contraction_collapses_after_the_window():
    # Spread 0.5, then stuck at the margin with every point together from step 10.
    metrics = stream([2.0] * 10 + [1.001] * 40, [0.5] * 10 + [0.002] * 40)
    verdict = analyze(metrics, DetectorConfig(window=20))
    assert kinds(verdict) == [(10, "warning"), (30, "collapsed")]
    assert verdict.collapsed and verdict.onset_step == 30 and verdict.state == "collapsed"
    assert verdict.collapsed_at_end and verdict.recovered_step is None
    evidence = verdict.events[1].evidence
    assert evidence["since_step"] == 10 and evidence["peak_mean_pairwise_distance"] == 0.5


def test_the_spread_between_classes_is_judged_where_the_labels_are_known():
    # Tight classes at the margin: the mean over all pairs falls to 0.05 of its peak (most
    # of a batch's pairs are same-class ones, now at 0), the mean between classes stays.
    ratios, all_pairs = [2.0] * 10 + [1.0] * 40, [1.0] * 10 + [0.05] * 40
    spread_apart = stream(ratios, all_pairs, mean_between_class_distance=1.2)
    assert analyze(spread_apart).events == ()
    assert kinds(analyze(spread_apart.drop(columns="mean_between_class_distance"))) == [
        (10, "warning"),
        (30, "collapsed"),
    ]
    # Between classes gone too: a collapse, its evidence naming both spreads.
    between = [1.2] * 10 + [0.06] * 40
    collapsed = analyze(stream(ratios, all_pairs, mean_between_class_distance=between))
    assert kinds(collapsed) == [(10, "warning"), (30, "collapsed")]
    evidence = collapsed.events[1].evidence
    assert evidence["mean_between_class_distance"] == 0.06
    assert evidence["peak_mean_between_class_distance"] == 1.2
    assert evidence["mean_pairwise_distance"] == 0.05
    assert "mean distance between classes fell to 0.06" in collapsed.events[1].message


def test_a_ratio_near_one_alone_is_not_collapse():
    # Batch-all can average to ≈ margin while the embeddings are well spread.
    verdict = analyze(stream([0.99, 1.0, 1.01] * 30, [1.2] * 90))
    assert not verdict.collapsed and verdict.events == ()


def test_embeddings_that_start_small_and_grow_have_not_collapsed():
    # Unnormalised embeddings at initialisation: tiny distances, loss = margin, growing.
    distances = [1e-4 * 1.2**i for i in range(60)]
    ratios = [1.0 if d < 0.01 else 0.5 for d in distances]
    assert analyze(stream(ratios, distances)).events == ()


def test_a_short_dip_is_a_warning_that_clears():
    ratios = [2.0] * 10 + [1.0] * 5 + [1.5] * 40
    distances = [0.5] * 10 + [0.001] * 5 + [0.4] * 40
    verdict = analyze(stream(ratios, distances), DetectorConfig(window=20, recovery_window=10))
    assert kinds(verdict) == [(10, "warning"), (25, "cleared")]
    assert not verdict.collapsed and verdict.state == "healthy"


def test_recovery_needs_the_embeddings_to_spread_again():
    # The loss leaves the plateau at step 40 but the points stay together until step 60.
    ratios = [2.0] * 10 + [1.0] * 30 + [0.1] * 60
    distances = [0.5] * 10 + [0.001] * 50 + [0.6] * 40
    verdict = analyze(stream(ratios, distances), DetectorConfig(window=20, recovery_window=10))
    assert kinds(verdict) == [(10, "warning"), (30, "collapsed"), (70, "recovered")]
    assert verdict.recovered_step == 70 and verdict.collapse_spans == ((30, 70),)
    assert verdict.state == "healthy" and not verdict.collapsed_at_end


def test_a_loss_leaving_the_plateau_does_not_swap_the_bound_of_a_collapse():
    # Margin 0.2, peak spread 1.1: collapsed at 0.006, then the loss drifts to 0.95 × margin
    # while the spread creeps to 0.03-0.04 (above 0.1 × margin, still 3 % of its peak):
    # points that close together have not recovered, on the plateau or off it.
    ratios = [1.5] * 10 + [1.0] * 40 + [0.95] * 60
    distances = [1.1] * 10 + [0.006] * 40 + [0.03 + 0.0002 * i for i in range(60)]
    verdict = analyze(stream(ratios, distances), DetectorConfig(window=20, recovery_window=10))
    assert kinds(verdict) == [(10, "warning"), (30, "collapsed")]
    # Spread out again (above 0.1 × the peak): recovered after the recovery window.
    ratios += [0.5] * 30
    distances += [0.4] * 30
    verdict = analyze(stream(ratios, distances), DetectorConfig(window=20, recovery_window=10))
    assert kinds(verdict)[-1] == (120, "recovered")


def test_contraction_off_the_plateau_is_a_warning():
    # The scaled loss can fall below the margin while every point stays together.
    metrics = stream([2.0] * 10 + [0.3] * 40, [0.5] * 10 + [0.004] * 40)
    verdict = analyze(metrics, DetectorConfig(window=20))
    assert kinds(verdict) == [(30, "warning")] and not verdict.collapsed


def test_steps_without_valid_triplets_do_not_break_a_collapse():
    # A DataLoader's small last batch may hold no valid triplet: loss 0, no evidence.
    ratios = [2.0] * 10 + [1.0] * 40
    distances = [0.5] * 10 + [0.001] * 40
    valid = [1000] * 50
    for i in range(15, 50, 8):
        ratios[i], valid[i] = 0.0, 0
    metrics = stream(ratios, distances, num_valid_triplets=valid)
    assert kinds(analyze(metrics, DetectorConfig(window=20))) == [
        (10, "warning"),
        (30, "collapsed"),
    ]


def test_windows_are_in_steps_whatever_the_recording_cadence():
    metrics = stream([2.0] * 2 + [1.0] * 10, [0.5] * 2 + [0.001] * 10)
    metrics["step"] = metrics["step"] * 5  # recorded every 5 steps
    verdict = analyze(metrics, DetectorConfig(window=20))
    assert kinds(verdict) == [(10, "warning"), (30, "collapsed")]


def test_dimensional_collapse_warning_and_its_clearing():
    n = 80
    ranks = [math.nan] * n
    for i, rank in zip(range(0, n, 10), [12, 11, 1.2, 1.1, 1.1, 1.05, 9, 10], strict=True):
        ranks[i] = rank
    metrics = stream([0.5] * n, [1.0] * n, effective_rank=ranks, embedding_dim=32.0)
    detector = CollapseDetector(DetectorConfig(window=20))
    events = [e for row in metrics.to_dict("records") for e in detector.update(row)]
    assert [(e.step, e.kind, e.state) for e in events] == [
        (40, "dimensional_collapse", "warning"),  # low since step 20, for 20 steps
        (60, "dimensional_collapse_cleared", "healthy"),
    ]


@pytest.mark.parametrize("column", ["nonfinite_count", "nonfinite_loss_count"])
def test_non_finite_values_are_divergence_until_finite_for_the_recovery_window(column):
    n = 90
    counts = [0] * 50 + [7] * 5 + [0] * 35
    metrics = stream([0.5] * n, [1.0] * n, embedding_norm_mean=1.0, **{column: counts})
    detector = CollapseDetector(DetectorConfig(window=20, recovery_window=20))
    events = [e for row in metrics.to_dict("records") for e in detector.update(row)]
    assert [(e.step, e.kind, e.state) for e in events] == [
        (50, "diverged", "diverged"),
        (75, "diverged_cleared", "healthy"),  # finite since step 55, for 20 steps
    ]
    assert events[0].evidence[column] == 7 and "clip" in events[0].suggestion
    verdict = analyze(metrics.iloc[:60])
    assert verdict.state == "diverged" and verdict.diverged_step == 50
    assert verdict.failed_at_end and not verdict.collapsed


def test_norms_exploding_by_orders_of_magnitude_are_divergence():
    # Norms grow from ~0 to a working scale of 2 within the first window (not divergence),
    # then blow up by ×1.5 a step: flagged at the first step above 10⁶ × 2.
    norms = [1e-4 * 10**i for i in range(5)] + [2.0] * 20
    norms += [2.0 * 1.5**i for i in range(1, 60)]
    metrics = stream([0.5] * len(norms), [1.0] * len(norms), embedding_norm_mean=norms)
    verdict = analyze(metrics, DetectorConfig(window=20, divergence_orders=6))
    first = next(i for i, v in enumerate(norms) if v > 2e6)
    assert kinds(verdict) == [(first, "diverged")]
    assert verdict.events[0].evidence["start_embedding_norm_mean"] == 2.0
    assert "orders of magnitude" in verdict.events[0].message


def test_a_healthy_growth_of_norms_is_not_divergence():
    norms = [0.5 * 1.05**i for i in range(200)]  # ×17 000 over the run
    metrics = stream([0.5] * 200, [1.0] * 200, embedding_norm_mean=norms)
    assert analyze(metrics).events == ()


def test_missing_values_are_unknown_not_evidence():
    metrics = stream([math.nan] * 30, [math.nan] * 30, effective_rank=math.nan)
    assert analyze(metrics).events == ()


def test_live_and_replayed_detectors_agree_step_by_step():
    metrics = stream([2.0] * 10 + [1.0] * 40 + [0.1] * 50, [0.5] * 10 + [0.001] * 40 + [0.7] * 50)
    live = CollapseDetector()
    live_events = [e for row in metrics.to_dict("records") for e in live.update(row)]
    assert tuple(live_events) == analyze(metrics).events


def test_steps_must_increase_and_config_is_checked():
    detector = CollapseDetector()
    detector.update({"step": 3})
    with pytest.raises(ValueError, match="steps must increase"):
        detector.update({"step": 3})
    with pytest.raises(ValueError, match="window"):
        DetectorConfig(window=-1)
    with pytest.raises(ValueError, match="plateau_tolerance"):
        DetectorConfig(plateau_tolerance=float("nan"))


def rank_stream(ranks, classes, *, batch_size=256, every=10, dim=32.0):
    """Rank steps every ``every`` steps (NaN between), on a healthy plateau-free stream."""
    n = every * len(ranks)
    measured = [math.nan] * n
    for i, rank in enumerate(ranks):
        measured[i * every] = rank
    extra = {} if classes is None else {"num_classes": float(classes)}
    return stream(
        [0.5] * n,
        [1.0] * n,
        effective_rank=measured,
        embedding_dim=dim,
        batch_size=batch_size,
        **extra,
    )


def rank_events(metrics):
    return [(e.step, e.kind, e.state) for e in analyze(metrics, DetectorConfig(window=20)).events]


@pytest.mark.parametrize("classes", [2, 3, 5, 10, 20, 40])
def test_classes_using_about_c_minus_one_dimensions_are_never_flagged(classes):
    # A simplex of C class means spans C − 1 dimensions: neural collapse, not a failure.
    ranks = [classes - 1, 0.8 * (classes - 1), max(1.0, 0.7 * (classes - 1))] * 4
    assert rank_events(rank_stream(ranks, classes)) == []


@pytest.mark.parametrize("classes", [5, 10, 20])
def test_five_or_more_classes_in_two_dimensions_for_a_window_are_flagged(classes):
    ranks = [classes - 1] * 2 + [2.0] * 4 + [classes - 1] * 3
    metrics = rank_stream(ranks, classes)
    assert rank_events(metrics) == [
        (40, "dimensional_collapse", "warning"),  # low since step 20, for 20 steps
        (60, "dimensional_collapse_cleared", "healthy"),
    ]
    event = analyze(metrics, DetectorConfig(window=20)).events[0]
    assert event.evidence["num_classes"] == classes
    assert event.evidence["reference_rank"] == classes - 1
    assert f"the {classes} classes in the batch need about {classes - 1}" in event.message
    # One low measurement is not a full window.
    assert rank_events(rank_stream([classes - 1, 2.0, classes - 1] * 3, classes)) == []


def test_two_classes_on_a_line_are_not_dimensional_collapse():
    # The false alarm: batch-hard on two classes, rank ≈ 1.8 of 32 (kNN 0.97).
    assert rank_events(rank_stream([1.8] * 10, 2)) == []
    assert rank_events(rank_stream([1.0] * 10, 2)) == []  # a line is all two classes need
    # Without labels the fallback (a share of D) still judges it: 1.0 < 0.05 × 32.
    assert [kind for _, kind, _ in rank_events(rank_stream([1.0] * 10, None))] == [
        "dimensional_collapse"
    ]


def test_the_reference_is_capped_by_the_batch_and_the_dimension():
    # min(C − 1, D, N − 1): 4 rows span at most 3 dimensions, 4 dimensions at most 4.
    assert rank_events(rank_stream([2.0] * 10, 10, batch_size=4)) == []
    assert rank_events(rank_stream([2.0] * 10, 10, batch_size=256)) != []
    assert rank_events(rank_stream([2.4] * 10, 50, dim=4.0)) == []
    assert rank_events(rank_stream([2.0] * 10, 50, dim=4.0)) != []


def test_a_run_that_never_separates_is_collapsed_once_it_has_sat_a_window():
    # siamese-triplet's default net: distances ~3e-4 × the margin from the first step,
    # the loss within 3e-4 of the margin, for 120 steps.
    verdict = analyze(stream([1.0003] * 120, [3e-4] * 120, margin=1.0), DetectorConfig(window=20))
    # Step 0 sets the reference; unseparated from step 1, counted from step 21 (a window),
    # collapsed a window later.
    assert kinds(verdict) == [(21, "warning"), (41, "collapsed")]
    assert "never separated" in verdict.events[1].message


def test_a_run_that_starts_unseparated_but_keeps_growing_is_not_flagged():
    # Doubling every 10 steps (slower than the window) from 3e-4 of the margin until it
    # has a spread: each doubling restarts the count.
    distances = [3e-4 * 2 ** (i / 10) for i in range(150)]
    ratios = [1.0 if d < 0.1 else 0.6 for d in distances]
    assert analyze(stream(ratios, distances, margin=1.0)).events == ()


def noisy(center, width, n, seed):
    rng = np.random.default_rng(seed)
    return (center + width * (rng.random(n) - 0.5)).tolist()


def test_a_spread_far_below_its_peak_on_the_plateau_is_collapse_whatever_the_margin():
    # 100 classes, unnormalised, margin 1: the spread falls from 32.7 to 0.6 (< 2 % of its
    # peak, but above 0.1 × margin) by step 175 while the loss sits at 0.97-1.02 × margin.
    spread = [32.7 * 0.98**i if 32.7 * 0.98**i > 0.6 else 0.6 for i in range(300)]
    ratios = [1.5] * 40 + noisy(0.995, 0.05, 260, seed=0)
    verdict = analyze(stream(ratios, spread, margin=1.0))
    below = next(i for i, d in enumerate(spread) if d < 0.1 * 32.7)  # step 113
    assert verdict.state == "collapsed"
    assert below <= verdict.onset_step <= below + 20 + 10  # a window, and a little noise


def test_the_plateau_band_follows_the_noise_of_small_batches():
    # P×K = 4×8 rows: loss/margin wobbles 1.01-1.04 on a collapsed model, outside a fixed
    # ±0.02 band on most rows; contracted from step 20.
    distances = [0.5] * 20 + [0.001] * 180
    for seed in range(6):
        ratios = [1.8] * 20 + noisy(1.025, 0.029, 180, seed=seed)
        verdict = analyze(stream(ratios, distances))
        # Contracted at 20: confirmed a window later, give or take the noise's first steps.
        assert verdict.state == "collapsed" and verdict.onset_step <= 20 + 2 * 20
        fixed = analyze(stream(ratios, distances), DetectorConfig(plateau_tolerance_max=0.02))
        assert fixed.onset_step is None or fixed.onset_step > verdict.onset_step


def test_a_loss_still_falling_onto_the_plateau_is_not_noise_at_any_interval():
    # Batch-hard at lr 0.5 from the first steps (as recorded on 1024-row batches): the
    # spread is gone by step 2 while loss/margin falls 2.5 → 1.01 as 1 + 1.5·0.7^t. Read as
    # noise, the first five falling values widened the band to 0.1 when every step was
    # recorded, but not in every 4th or 10th row: the onsets differed by two intervals.
    steps = 120
    ratios = [1.0 + 1.5 * 0.7**t + 0.005 * math.sin(t) for t in range(steps)]
    distances = [0.6, 0.2] + [0.01] * (steps - 2)
    dense = analyze(stream(ratios, distances))
    assert dense.state == "collapsed"
    # On the plateau (within 0.02) from step 12: confirmed a window later, not before.
    assert 12 + 20 <= dense.onset_step <= 12 + 20 + 2
    for every in (4, 10):
        sparse = analyze(stream(ratios, distances).iloc[::every])
        assert sparse.state == "collapsed"
        assert abs(sparse.onset_step - dense.onset_step) <= every, every


def test_a_noisy_healthy_loss_off_the_margin_is_never_on_the_plateau():
    # Batch-all hovering at 0.6-0.96 × margin: the band widens with the noise, but no
    # further than plateau_tolerance_max, and the spread is healthy anyway.
    ratios = noisy(0.78, 0.36, 300, seed=2)
    distances = noisy(1.0, 0.2, 300, seed=3)
    assert analyze(stream(ratios, distances)).events == ()


def test_a_slow_healthy_run_near_the_margin_is_not_flagged():
    # Loss at 0.9 ± 0.01 of the margin while the spread settles to 30 % of its peak.
    ratios = noisy(0.9, 0.02, 300, seed=4)
    distances = [1.0 - 0.7 * min(i / 200, 1) for i in range(300)]
    assert analyze(stream(ratios, distances)).events == ()


def test_directions_that_collapse_while_the_norms_grow_are_collapse():
    # A loss that normalises inside: the raw norms (and distances) grow while every row
    # turns to one direction (std of the L2-normalised rows 0.18 → 0.001, D = 32).
    steps = 200
    distances = [0.5 * 1.03**i for i in range(steps)]
    direction = [0.18 if i < 50 else max(0.18 * 0.9 ** (i - 50), 0.001) for i in range(steps)]
    ratios = [1.4] * 50 + [1.0] * 150
    rows = stream(ratios, distances, std_of_l2_normalized=direction, embedding_dim=32.0)
    # A Euclidean loss on raw embeddings does not see directions: rows along a line away
    # from the origin point one way and are still apart.
    assert analyze(rows).events == ()
    detector = CollapseDetector(distance="cosine")  # what the loss compares: directions
    verdict = verdict_from_events(detector.replay(rows), detector.state, detector.last_step)
    below = next(i for i, v in enumerate(direction) if v < 0.1 / math.sqrt(32))
    assert verdict.state == "collapsed"
    assert below <= verdict.onset_step <= below + 20
    assert "directions collapsed" in verdict.events[-1].message


def test_a_plateau_left_on_one_row_in_three_reads_the_same_at_any_interval():
    # Batch noise takes loss/margin out of the band on every third row of a collapse that
    # starts at step 50: an unbroken streak would restart on each such row of a dense
    # recording but not of a sparse one. A majority over the window reads both alike.
    ratios = [1.5] * 50 + [1.3 if i % 3 == 2 else 1.0 for i in range(250)]
    distances = [0.5] * 50 + [0.001] * 250
    rows = stream(ratios, distances)
    dense = analyze(rows)
    assert dense.state == "collapsed" and 50 + 20 <= dense.onset_step <= 50 + 20 + 3
    for every in (4, 10):
        sparse = analyze(rows.iloc[::every])
        assert sparse.state == "collapsed"
        # Within an interval, plus the rows until the first on-plateau one: here the 4-step
        # recording's first collapsed row (52) is one of the off rows.
        assert abs(sparse.onset_step - dense.onset_step) <= every + 2


def test_a_collapse_that_flickers_does_not_flap_between_collapsed_and_recovered():
    # After a confirmed collapse, every other row is contracted: no clear majority without
    # contraction, so the run stays collapsed with one collapse event and no recovery.
    distances = [0.5] * 20 + [0.001] * 60 + [0.001 if i % 2 else 0.5 for i in range(120)]
    verdict = analyze(stream([1.0] * 200, distances))
    kinds = [e.kind for e in verdict.events]
    assert verdict.state == "collapsed" and kinds.count("collapsed") == 1
    assert "recovered" not in kinds


@pytest.mark.parametrize("every", [4, 10])
def test_the_noise_is_measured_over_a_window_of_steps_at_any_interval(every):
    # A late collapse of 32-row batches: 300 steps with every triplet easy (loss 0), then
    # loss/margin wobbling 1.03 ± 0.04 from step 300 while the spread is gone. Kept as a
    # count of rows, the noise history of a sparse recording reached back into the flat
    # loss-0 stretch (21 rows = 84 or 210 steps) and read no noise: a narrow band and a
    # later collapse than the dense recording, whose 21 rows are the last 20 steps (up to
    # 100 steps later at every=10). Within two intervals: one for the sampling, one for the
    # row that first falls in the band while the noise is not yet measurable (a dense
    # recording has `every` times as many chances of one).
    for seed in range(8):
        ratios = [0.0] * 300 + noisy(1.03, 0.08, 200, seed=seed)
        distances = [1.2] * 300 + [0.03] * 200
        rows = stream(ratios, distances)
        dense = analyze(rows)
        sparse = analyze(rows.iloc[::every])
        assert dense.state == sparse.state == "collapsed"
        assert abs(sparse.onset_step - dense.onset_step) <= 2 * every, (seed, dense, sparse)


@pytest.mark.parametrize("tau", [12.0, 20.0])
def test_the_noise_of_every_step_keeps_a_curving_loss_interval_free(tau):
    # A loss settling onto the plateau along a curve (1 + 0.8 e^(−t/τ), noise 0.004) with
    # the points together from step 3. Changes between rows 4 steps apart carry 4 steps of
    # the curve; read as noise they widen the band and the collapse is confirmed up to 21
    # steps earlier than from every row. The loss's change between consecutive steps,
    # accumulated over every step, is the same at any interval.
    for seed in range(6):
        rng = np.random.default_rng(seed)
        t = np.arange(200)
        ratios = 1.0 + 0.8 * np.exp(-t / tau) + rng.normal(0, 0.004, 200)
        metrics = stream(list(ratios), [0.5] * 3 + [0.01] * 197)
        metrics["loss_margin_ratio_step_change"] = np.r_[np.nan, np.abs(np.diff(ratios))]
        dense = analyze(metrics).onset_step
        assert dense is not None
        assert abs(analyze(thin(metrics, 4)).onset_step - dense) <= 4, seed


def test_thin_needs_a_positive_interval():
    with pytest.raises(ValueError, match="every must be a positive number of steps, got 0"):
        thin(stream([1.0] * 3, [0.1] * 3), 0)
