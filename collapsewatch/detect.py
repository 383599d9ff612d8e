"""The collapse detector: a streaming state machine over recorded steps.

One :class:`CollapseDetector` is fed one step's metrics at a time, in step order, and keeps
O(1) state per run. ``watch()`` runs it while training writes the run; :func:`analyze`
runs the very same class over a saved run, so post-hoc verdicts equal the live ones.

Rules (every threshold is a field of :class:`DetectorConfig`):

* The *spread* is the mean distance between classes (``mean_between_class_distance``)
  where the labels are known, else the mean pairwise distance: same-class pairs are pulled
  together on purpose, and their share of a batch is the sampler's (P×K), not the model's.
* The embeddings have *contracted* at a step when the spread is below
  ``contraction_margin_fraction`` × margin **and** below ``contraction_peak_fraction`` × the
  largest spread the run has had so far. The second test keeps a run whose
  embeddings start tiny and grow from being flagged: it has never had a spread to lose.
* A run that has *never separated* (its largest spread still below
  ``contraction_margin_fraction`` × margin, not doubling) counts as contracted once that
  has lasted ``window`` steps; so does a held-out probe's spread (``watch(probe=...)``,
  eval mode) that has contracted by the same test.
* On the plateau, and while a warning or collapse is under way, the margin-relative half
  of the contraction test is waived (a spread far below its own peak is enough); the
  directions (``std_of_l2_normalized`` far below its peak and 1/√D) count as contracted
  too.
* A step is on the *plateau* when |loss/margin − 1| (its own, or the median of the last
  ``window``/2 steps) is within ``plateau_tolerance``, widened with the ratio's measured
  noise (``plateau_noise_z``) up to ``plateau_tolerance_max``.
* healthy → warning at the first step that is both; warning → collapsed once every step
  has been both for ``window`` steps. A run that stays contracted for ``window`` steps
  off the plateau (the scaled loss can fall while the embeddings stay a point) is a
  warning too.
* collapsed → healthy ("recovered") and warning → healthy ("cleared") only once the
  embeddings have not been contracted for ``recovery_window`` steps: a loss leaving the
  plateau while the points stay together is not a recovery.
* Independently, dimensional collapse (the effective rank far below what the batch's
  classes need, min(C − 1, D, N − 1), for ``window`` steps; below ``rank_fraction`` × D
  when the labels are unknown) raises a warning of its own, once per onset.
* *Diverged*: a non-finite loss or embedding entry (counted on the device over unrecorded
  steps too), or embedding norms ``divergence_orders`` powers of ten above their scale at
  the start; cleared after ``recovery_window`` steps without any of it.

The run's state (:class:`~collapsewatch.states.RunState`) is "diverged" if that rule holds,
else "collapsed" if the plateau machine says so, else "warning" if it or the rank warning
is active, else "healthy".
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from collapsewatch.states import FAILED_STATES, RunState, display_state
from collapsewatch.store import Event, Run, json_safe, load_run

HEALTHY, WARNING, COLLAPSED = RunState.HEALTHY, RunState.WARNING, RunState.COLLAPSED
DIVERGED, EMPTY = RunState.DIVERGED, RunState.EMPTY


@dataclass(frozen=True)
class Remedy:
    """One thing to try after a collapse; ``unless`` names the run trait (see
    :func:`collapsewatch.adapters.loss_traits`, and "normalized" when the embeddings already
    have norm 1) that means the run already does it, so it is not suggested."""

    text: str
    unless: str | None = None


NORMALIZE = Remedy("L2-normalise the embeddings", "normalized")
LOWER_LR = Remedy("lower the learning rate")
SEVERAL_PER_CLASS = Remedy("use larger batches with several samples per class")

COLLAPSE_REMEDIES: dict[str, tuple[Remedy, ...]] = {
    "bundled": (
        Remedy("use the scaled variant (scaled=True)", "scaled"),
        LOWER_LR,
        Remedy("use batch-all instead of batch-hard", "batch_all"),
        NORMALIZE,
        SEVERAL_PER_CLASS,
    ),
    "pml_triplet": (
        Remedy(
            "mine semi-hard instead of the hardest triplets (TripletMarginMiner(margin, "
            "type_of_triplets='semihard') in place of BatchHardMiner)"
        ),
        LOWER_LR,
        Remedy(
            "L2-normalise the embeddings (LpDistance(normalize_embeddings=True), PML's default)",
            "normalized",
        ),
        Remedy("use larger batches with several samples per class (MPerClassSampler)"),
    ),
    "pml": (
        LOWER_LR,
        Remedy("use larger batches with several samples per class (MPerClassSampler)"),
        Remedy(
            "check the loss's temperature or margins (a miner that keeps only the hardest "
            "pairs makes collapse likelier)"
        ),
    ),
    "sentence_transformers": (
        Remedy(
            "use BatchSemiHardTripletLoss, BatchHardSoftMarginTripletLoss or "
            "MultipleNegativesRankingLoss"
        ),
        LOWER_LR,
        Remedy(
            "make batches hold several sentences per label "
            "(batch_sampler=BatchSamplers.GROUP_BY_LABEL)",
            "group_by_label",
        ),
    ),
    "siamese": (
        Remedy(
            "use a semi-hard or random negative selector (SemihardNegativeTripletSelector or "
            "RandomNegativeTripletSelector) instead of HardestNegativeTripletSelector"
        ),
        LOWER_LR,
        Remedy("sample batches with several examples per class"),
    ),
    "other": (
        LOWER_LR,
        Remedy("mine semi-hard instead of the hardest negatives"),
        NORMALIZE,
        SEVERAL_PER_CLASS,
    ),
}

NORM_ONE_TOLERANCE = 1e-3
"""Mean embedding norm within this of 1: the embeddings are already L2-normalised."""


def collapse_advice(loss_family: str | None, traits: Iterable[str] = ()) -> str:
    """What to try after a collapse, for a loss of ``adapters.loss_family`` kind, leaving out
    what the run already does (``traits``, e.g. {"scaled", "normalized"})."""
    remedies = COLLAPSE_REMEDIES.get(loss_family or "bundled", COLLAPSE_REMEDIES["other"])
    done = set(traits)
    items = [r.text for r in remedies if r.unless not in done]
    sentence = items[0] if len(items) == 1 else f"{', '.join(items[:-1])}, or {items[-1]}"
    return sentence[0].upper() + sentence[1:] + "."


RESCUED, RESCUE_FAILED = "rescued", "rescue_failed"
ACTION_EVENTS = frozenset({RESCUED, RESCUE_FAILED})
"""Events recorded by an action taken in the training loop (a ``Rescue``), not by the
detector: replaying a run (``analyze``) keeps them among the detector's, by step."""


SUGGESTIONS = {
    "dimensional_collapse": (
        "The embeddings span only a few directions. Try a lower learning rate, L2-normalised "
        "embeddings, a wider embedding layer, or larger batches."
    ),
    "diverged": (
        "Training diverged: lower the learning rate, clip gradients "
        "(torch.nn.utils.clip_grad_norm_), add a learning-rate warm-up, check the inputs for "
        "NaN, and compute the loss in float32 if you train in half precision."
    ),
}


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector. Defaults were tuned on the reference runs in
    ``tests/test_scenarios.py`` (scikit-learn digits) and checked by
    ``benchmarks/calibrate_detector.py`` on four more data sets; see docs/detector.md."""

    plateau_tolerance: float = 0.02
    # The band widens with the measured noise of loss/margin (z × its step-to-step standard
    # deviation over the last `window` training steps), up to this much.
    plateau_noise_z: float = 4.0
    plateau_tolerance_max: float = 0.1
    contraction_margin_fraction: float = 0.1
    contraction_peak_fraction: float = 0.1
    window: int = 20
    recovery_window: int = 20
    rank_class_fraction: float = 0.4
    rank_class_recovery_fraction: float = 0.6
    rank_fraction: float = 0.05  # without labels (num_classes unknown): a share of D
    rank_recovery_fraction: float = 0.1
    divergence_orders: float = 6.0  # embedding norms this many powers of 10 above their start

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"DetectorConfig.{name} must be a finite number ≥ 0, got {value!r}"
                )


def reference_rank(classes: Any, dim: Any, rows: Any) -> Any:
    """The effective rank a batch's classes need: min(C − 1, D, N − 1), for floats or arrays.

    C class means span at most C − 1 dimensions (a simplex when training works) and N rows
    at most N − 1 once centred. NaN where C is unknown; an unknown N does not cap it.
    """
    return np.minimum(np.asarray(classes) - 1, np.fmin(dim, np.asarray(rows) - 1))


def _value(row: Mapping[str, Any], name: str) -> float:
    value = row.get(name)
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _informative(row: Mapping[str, Any], distance: float) -> bool:
    """Whether a step says anything about contraction: a known spread, and a valid triplet
    where the labels are known (an unknown count, NaN, is no reason to skip)."""
    return math.isfinite(distance) and _value(row, "num_valid_triplets") != 0


def _streak(since: int | None, holds: bool, step: int) -> int | None:
    """First step of the current unbroken run of steps where a condition holds, or None."""
    if not holds:
        return None
    return step if since is None else since


def _lasted(since: int | None, step: int, steps: int) -> bool:
    """Whether the streak that began at ``since`` (None: broken now) spans ``steps`` by ``step``."""
    return since is not None and step - since >= steps


@dataclass
class _Episode:
    """When a noisy condition began to hold, judged over the trailing ``window`` steps: an
    episode starts at a row where it holds and lasts while it holds on at least half of the
    episode's rows within the trailing window (more than half, ``strict``), so one contrary
    row does not end it.

    Counted in recorded rows, an unbroken streak depends on the recording interval: a dense
    recording has more rows near a band's edge to break it than a sparse one of the same run.
    A share of a window of training steps reads the same at any interval.
    """

    window: int
    strict: bool = False
    rows: deque[tuple[int, bool]] = field(default_factory=deque)
    since: int | None = None

    def update(self, step: int, holds: bool) -> int | None:
        """Take one row; return the first step of the current episode, or None."""
        self.rows.append((step, holds))
        while self.rows[0][0] <= step - self.window:
            self.rows.popleft()
        if self.since is not None:
            votes = [h for s, h in self.rows if s >= self.since]
            share = 2 * sum(votes) - len(votes)  # held minus not held
            if share < 0 or (self.strict and share == 0):
                self.since = None
        if self.since is None and holds:
            self.since = step
        return self.since

    def end(self) -> None:
        """End the current episode: the next one starts at a later row that holds."""
        self.since = None


@dataclass
class CollapseDetector:
    """Streaming collapse detector. Feed rows in step order with :meth:`update`.

    A row is a mapping with at least ``step``, ``loss_margin_ratio``, ``margin`` and
    ``mean_pairwise_distance``; ``mean_between_class_distance``, ``embedding_variance``,
    ``effective_rank``, ``embedding_dim``, ``num_classes``, ``batch_size``,
    ``nonfinite_count`` and ``num_valid_triplets`` are used when present. NaN means
    unknown; a step with unknown values or no valid triplet is no evidence either way and
    leaves the plateau rule's streaks as they were.
    """

    config: DetectorConfig = field(default_factory=DetectorConfig)
    loss_family: str = "bundled"
    traits: frozenset[str] = frozenset()
    distance: str = "euclidean"  # what the spread is measured by (the run's metadata)
    advice: str = field(init=False, default="")
    normalized: bool = field(init=False, default=False)
    plateau_state: str = HEALTHY
    ever_collapsed: bool = False
    peak_distance: float = 0.0
    peak_distance_step: int | None = None
    peak_between_class_distance: float = 0.0
    peak_between_class_step: int | None = None
    peak_variance: float = 0.0
    peak_direction_spread: float = 0.0  # the largest std_of_l2_normalized so far
    # (step, loss/plateau, its step-to-step change) of the last `window` steps' rows: the
    # plateau's level and noise.
    recent_ratios: deque[tuple[int, float, float]] = field(default_factory=deque)
    # The held-out probe's spread (watch(probe=...)): its latest value, carried between
    # probe steps, and its peak.
    probe_distance: float = math.nan
    peak_probe_distance: float = 0.0
    # Episodes of contraction, of contraction on the plateau, and of no contraction.
    contracted: _Episode = field(init=False)
    suspect: _Episode = field(init=False)
    clear: _Episode = field(init=False)
    # Never separated: the largest spread so far when the run was last seen growing.
    unseparated_reference: float | None = None
    unseparated_since: int | None = None
    low_rank_since: int | None = None
    low_rank: bool = False
    diverged: bool = False
    diverged_since: int | None = None
    sane_since: int | None = None
    first_step: int | None = None
    start_norm: float = 0.0
    last_step: int | None = None

    def __post_init__(self) -> None:
        self.advice = collapse_advice(self.loss_family, self.traits)
        self.contracted = _Episode(self.config.window)
        self.suspect = _Episode(self.config.window)
        # Collapse is sticky: recovery needs a clear majority of rows without contraction.
        self.clear = _Episode(self.config.recovery_window, strict=True)

    def add_traits(self, traits: Iterable[str]) -> None:
        """Add to what the run already does; the advice leaves it out from now on."""
        self.traits = self.traits | frozenset(traits)
        normalized = {"normalized"} if self.normalized else set()
        self.advice = collapse_advice(self.loss_family, self.traits | normalized)

    @property
    def state(self) -> RunState:
        """The run's current state: empty (no step yet), diverged, collapsed, warning or
        healthy, in that order of precedence."""
        if self.last_step is None:
            return EMPTY
        if self.diverged:
            return DIVERGED
        if self.plateau_state == COLLAPSED:
            return COLLAPSED
        if self.plateau_state == WARNING or self.low_rank:
            return WARNING
        return HEALTHY

    def update(self, row: Mapping[str, Any]) -> list[Event]:
        """Take one step's metrics; return the events it triggers (usually none)."""
        step = int(row["step"])
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"steps must increase: got {step} after {self.last_step}")
        self.last_step = step
        # Advice leaves out L2-normalising while the embeddings already have norm 1.
        normalized = abs(_value(row, "embedding_norm_mean") - 1.0) <= NORM_ONE_TOLERANCE
        if normalized != self.normalized:
            self.normalized = normalized
            traits = self.traits | {"normalized"} if normalized else self.traits
            self.advice = collapse_advice(self.loss_family, traits)
        time = _value(row, "time")
        time = time if math.isfinite(time) else 0.0
        events = self._plateau(step, row)
        events += self._rank(step, row)
        events += self._divergence(step, row)
        # Each event reports the overall state once everything this step changed is in;
        # NaN evidence becomes None so an event reads back from the run file unchanged.
        return [
            Event(
                e.step,
                e.kind,
                self.state.value,
                e.message,
                e.suggestion,
                json_safe(e.evidence),
                time,
            )
            for e in events
        ]

    def replay(self, metrics: pd.DataFrame) -> list[Event]:
        """Feed a run's stored rows in step order (post hoc, or to resume a run)."""
        events: list[Event] = []
        for row in metrics.sort_values("step").to_dict("records"):
            events += self.update(row)
        return events

    def _plateau(self, step: int, row: Mapping[str, Any]) -> list[Event]:
        c = self.config
        ratio = _value(row, "loss_margin_ratio")
        margin = _value(row, "margin")
        all_pairs = _value(row, "mean_pairwise_distance")
        between = _value(row, "mean_between_class_distance")
        variance = _value(row, "embedding_variance")
        if all_pairs > self.peak_distance:
            self.peak_distance, self.peak_distance_step = all_pairs, step
        if between > self.peak_between_class_distance:
            self.peak_between_class_distance, self.peak_between_class_step = between, step
        if variance > self.peak_variance:
            self.peak_variance = variance
        # The spread between classes where the labels are known: the loss pulls a class's
        # rows together on purpose, and how many same-class pairs a batch holds is the
        # sampler's choice (P×K), not the model's; over all pairs, a batch of 8 rows per
        # class reads lower against its peak than the data does.
        if math.isfinite(between):
            distance, peak, peak_step = (
                between,
                self.peak_between_class_distance,
                self.peak_between_class_step,
            )
            spread_name = "mean distance between classes"
        else:
            distance, peak, peak_step = all_pairs, self.peak_distance, self.peak_distance_step
            spread_name = "mean pairwise distance"
        if not _informative(row, distance):
            # E.g. a small last batch with no valid triplet (loss 0): neither evidence of
            # collapse nor of health, so it must not break a streak either way.
            return []
        # Without a margin (margin-free losses) the spread is judged against its own peak;
        # without a plateau level or a loss value, a sustained contraction alone is collapse.
        plateau_known = math.isfinite(ratio)
        on_plateau = plateau_known and self._on_plateau(
            step, ratio, _value(row, "loss_margin_ratio_step_change")
        )
        contracted = self._contracted(distance, peak, margin)
        # On the plateau, a spread far below its own peak is enough: with many classes or
        # an unnormalised model it can stay above the margin-relative bound long after
        # the embeddings have lost all structure. So it is once a collapse is under way:
        # a loss leaving the plateau would otherwise swap the bound, and points still at a
        # few hundredths of their peak would count as spread out again (a recovery whose
        # step depended on where the plateau band's edge fell).
        if not contracted and (on_plateau or self.plateau_state != HEALTHY):
            contracted = distance < c.contraction_peak_fraction * peak
        # Directions: a loss that L2-normalises inside (cosine, a normalising distance)
        # can collapse every row onto one direction while the raw norms (and distances)
        # grow. Other losses do not see directions: rows along a line away from the origin
        # point one way and are still apart.
        direction = _value(row, "std_of_l2_normalized")
        dim = _value(row, "embedding_dim")
        self.peak_direction_spread = max(self.peak_direction_spread, direction)
        direction_contracted = (
            not contracted
            and self.compares_directions
            and math.isfinite(direction)
            and dim >= 1
            and direction < c.contraction_peak_fraction * self.peak_direction_spread
            and direction < c.contraction_margin_fraction / math.sqrt(dim)
        )
        contracted = contracted or direction_contracted
        # The probe sees the model in eval mode: dropout or augmentation can keep the
        # training batch apart while the model itself maps everything to one point.
        probe = _value(row, "probe_mean_pairwise_distance")
        if math.isfinite(probe):
            self.probe_distance = probe
            self.peak_probe_distance = max(self.peak_probe_distance, probe)
        probe_contracted = not contracted and self._contracted(
            self.probe_distance, self.peak_probe_distance, margin
        )
        # A run that has never separated counts only once that has lasted a window: a
        # model initialised near zero starts that way and must first have time to grow.
        self.unseparated_since = _streak(
            self.unseparated_since, self._never_separated(peak, margin), step
        )
        unseparated = not (contracted or probe_contracted) and _lasted(
            self.unseparated_since, step, c.window
        )
        contracted = contracted or probe_contracted or unseparated
        suspect = contracted and (on_plateau or not plateau_known)
        contracted_since = self.contracted.update(step, contracted)
        suspect_since = self.suspect.update(step, suspect)
        clear_since = self.clear.update(step, not contracted)
        evidence = {
            "loss_margin_ratio": ratio,
            "margin": margin,
            "mean_pairwise_distance": all_pairs,
            "peak_mean_pairwise_distance": self.peak_distance,
            "peak_step": peak_step,
            "embedding_variance": variance,
            "peak_embedding_variance": self.peak_variance,
        }
        if math.isfinite(between):
            evidence["mean_between_class_distance"] = between
            evidence["peak_mean_between_class_distance"] = peak
        if math.isfinite(self.probe_distance):
            evidence["probe_mean_pairwise_distance"] = self.probe_distance
            evidence["peak_probe_mean_pairwise_distance"] = self.peak_probe_distance
        state = self.plateau_state
        # A loss without a margin (in-batch negatives, soft margin) has its plateau only.
        level, level_name = (
            ("loss/margin", "the margin")
            if math.isfinite(margin)
            else ("loss/plateau", "its plateau")
        )
        if state != COLLAPSED and _lasted(suspect_since, step, c.window):
            self.plateau_state, self.ever_collapsed = COLLAPSED, True
            self.clear.end()
            spread = (
                f"the embeddings have never separated: the {spread_name} is "
                f"{distance:.3g} and was never above {peak:.3g} (under "
                f"{c.contraction_margin_fraction:g} × "
                f"{'the margin' if math.isfinite(margin) else '1, the cosine scale'}"
                if unseparated
                else f"the held-out probe's mean pairwise distance fell to "
                f"{self.probe_distance:.3g} (peak {self.peak_probe_distance:.3g}, the training "
                f"batch's {spread_name} {distance:.3g} with dropout/augmentation on"
                if probe_contracted
                else f"the directions collapsed: the std of the L2-normalised embeddings fell "
                f"to {direction:.3g} (peak {self.peak_direction_spread:.3g}, healthy "
                f"1/√D = {1 / math.sqrt(dim):.3g}; {spread_name} {distance:.3g}"
                if direction_contracted
                else f"the {spread_name} fell to {distance:.3g} (peak {peak:.3g} at step "
                f"{peak_step}"
            )
            if plateau_known:
                message = (
                    f"Collapse at step {step}: {level} has been {ratio:.3f} since step "
                    f"{suspect_since} while {spread}"
                    + (f", margin {margin:g})." if math.isfinite(margin) else ").")
                )
            else:
                unknown = "no loss value" if math.isfinite(margin) else "no margin"
                message = (
                    f"Collapse at step {step}: the embeddings have stayed contracted since "
                    f"step {suspect_since}: {spread}); the loss plateau is not checked "
                    f"({unknown} is known)."
                )
            evidence["since_step"] = suspect_since
            return [Event(step, "collapsed", COLLAPSED, message, self.advice, evidence)]
        if state == HEALTHY and (suspect or _lasted(contracted_since, step, c.window)):
            self.plateau_state = WARNING
            self.clear.end()
            if not plateau_known:
                where = "; the loss plateau is not checked"
            elif suspect:
                where = f" and the loss is at {level_name}"
            else:
                where = f" and the loss is off {level_name} ({ratio:.3f})"
            which, now, peak = (
                (
                    "the held-out probe's mean pairwise distance",
                    self.probe_distance,
                    self.peak_probe_distance,
                )
                if probe_contracted
                else (f"the {spread_name}", distance, peak)
            )
            message = (
                f"Possible collapse at step {step}: {which} {now:.3g} is far below its peak "
                f"{peak:.3g}{where}."
            )
            evidence["since_step"] = contracted_since
            return [Event(step, "warning", WARNING, message, self.advice, evidence)]
        if state != HEALTHY and _lasted(clear_since, step, c.recovery_window):
            self.plateau_state = HEALTHY
            self.suspect.end()
            self.contracted.end()
            evidence["since_step"] = clear_since
            if state == COLLAPSED:
                message = (
                    f"Recovered at step {step}: the embeddings have spread out again since "
                    f"step {clear_since} ({spread_name} {distance:.3g}"
                    + (f", {level} {ratio:.3f})." if plateau_known else ").")
                )
                return [Event(step, "recovered", HEALTHY, message, "", evidence)]
            message = f"Warning cleared at step {step}: no contraction since step {clear_since}."
            return [Event(step, "cleared", HEALTHY, message, "", evidence)]
        return []

    @property
    def compares_directions(self) -> bool:
        """Whether the loss compares directions only (cosine, or a distance that
        L2-normalises first): then their spread is the spread that matters."""
        return self.distance == "cosine" or "normalized" in self.traits

    def _on_plateau(self, step: int, ratio: float, step_change: float) -> bool:
        """Whether loss/plateau sits at 1: this step's value or the median of its recorded
        values over the last ``window``/2 steps (a collapsed batch-hard loss wobbles above
        the margin by the hardest pairs' noise) within a band: the configured tolerance,
        widened to z × the ratio's noise σ, at most ``plateau_tolerance_max``, once the rows
        cover ``window`` training steps. Small batches wobble more: their band is wider.

        σ is measured over the last ``window`` training steps. From
        ``loss_margin_ratio_step_change`` (the mean |Δ| between consecutive loss calls,
        every call counted, weighted by the calls each row covers): σ = mean |Δ| · √π / 2,
        the standard deviation of a step's noise when Δ, the difference of two, is normal;
        the same steps at any recording interval. Without it (older run files): 1.4826 × the
        median absolute deviation of the changes between recorded rows, about their median,
        / √2; those changes mix in the trend between rows, which grows with the interval."""
        c = self.config
        recent = self.recent_ratios
        recent.append((step, ratio, step_change))
        # The history is `window` training steps (the newest row at or before its start
        # included, so that it spans them), never fewer than three rows: kept as a count of
        # rows, a sparse recording would measure its noise over a longer stretch of the run
        # than a dense one (at every=10, 21 rows are 200 steps) and read a different band.
        while len(recent) > 3 and recent[1][0] <= step - c.window:
            recent.popleft()
        band = c.plateau_tolerance
        # Noise is measured only once the history covers `window` training steps:
        # counted in rows, the first few steps of a dense recording, where the loss is still
        # falling onto the plateau, would widen the band that a sparse one never gets.
        if len(recent) >= 3 and step - recent[0][0] >= c.window:
            rows = list(recent)
            # Each row's change covers the calls since the row before it.
            covered = [
                (s - rows[i - 1][0], change)
                for i, (s, _, change) in enumerate(rows)
                if i > 0 and s > step - c.window and math.isfinite(change)
            ]
            if covered:
                calls = sum(n for n, _ in covered)
                noise = sum(n * change for n, change in covered) / calls * math.sqrt(math.pi) / 2
            else:
                changes = np.diff([r for _, r, _ in rows])
                spread = np.median(np.abs(changes - np.median(changes)))
                noise = 1.4826 * float(spread) / math.sqrt(2)
            band = max(band, min(c.plateau_noise_z * noise, c.plateau_tolerance_max))
        level = float(np.median([r for s, r, _ in recent if s > step - c.window / 2]))
        # The step itself, or its recent level: a clean drop onto the plateau counts at once.
        return min(abs(ratio - 1.0), abs(level - 1.0)) <= band

    def _never_separated(self, peak: float, margin: float) -> bool:
        """The run has never had a spread to lose: its largest spread, ``peak``, is still
        below ``contraction_margin_fraction`` × the margin, and it is not growing
        (a doubling of that largest distance restarts the count, so a model initialised
        near zero that is spreading out is never flagged). Without a margin the scale is 1
        for the cosine distance and there is no such rule for the others."""
        # Without a margin, the cosine distance has its own scale: 1 between unrelated
        # directions (what in-batch-negatives losses start from when training works).
        scale = margin if math.isfinite(margin) else 1.0 if self.distance == "cosine" else 0.0
        if not scale > 0:
            return False
        if peak >= self.config.contraction_margin_fraction * scale:
            self.unseparated_reference = None
            return False
        if self.unseparated_reference is None or peak > 2 * self.unseparated_reference:
            self.unseparated_reference = peak
            return False  # growing: this step breaks the streak
        return True

    def _contracted(self, distance: float, peak: float, margin: float) -> bool:
        """Far below its peak and, where there is a margin, far below the margin too."""
        c = self.config
        return distance < c.contraction_peak_fraction * peak and not (
            math.isfinite(margin) and distance >= c.contraction_margin_fraction * margin
        )

    def _rank(self, step: int, row: Mapping[str, Any]) -> list[Event]:
        c = self.config
        rank, dim = _value(row, "effective_rank"), _value(row, "embedding_dim")
        if not (math.isfinite(rank) and math.isfinite(dim) and dim > 1):
            return []
        evidence = {"effective_rank": rank, "embedding_dim": dim}
        classes, rows = _value(row, "num_classes"), _value(row, "batch_size")
        if math.isfinite(classes):
            # The rank and C come from the same batch, so the reference follows a sampler
            # that changes the classes per batch.
            reference = float(reference_rank(classes, dim, rows))
            evidence.update(num_classes=classes, reference_rank=reference)
            # RankMe is 1 for a single direction, so compare the dimensions beyond the
            # first; a reference of 1 (two classes) or less is never judged low.
            low = rank - 1 < c.rank_class_fraction * (reference - 1)
            back = rank - 1 >= c.rank_class_recovery_fraction * (reference - 1)
            judged = f"the {classes:.0f} classes in the batch need about {reference:.0f}"
        else:
            low = rank < c.rank_fraction * dim
            back = rank >= c.rank_recovery_fraction * dim
            judged = "no labels, so judged against D"
        self.low_rank_since = _streak(self.low_rank_since, low, step)
        sustained = _lasted(self.low_rank_since, step, c.window)
        if not self.low_rank and sustained:
            self.low_rank = True
            message = (
                f"Dimensional collapse at step {step}: effective rank {rank:.2f} of "
                f"{dim:.0f} dimensions ({judged})."
            )
            return [
                Event(
                    step,
                    "dimensional_collapse",
                    WARNING,
                    message,
                    SUGGESTIONS["dimensional_collapse"],
                    evidence,
                )
            ]
        if self.low_rank and back:
            self.low_rank = False
            message = f"Effective rank back to {rank:.2f} of {dim:.0f} dimensions at step {step}."
            return [Event(step, "dimensional_collapse_cleared", HEALTHY, message, "", evidence)]
        return []

    def _divergence(self, step: int, row: Mapping[str, Any]) -> list[Event]:
        """Diverged: a non-finite loss or embedding entry (counted over unrecorded steps
        too), a non-finite spread, or embedding norms ``divergence_orders`` powers of ten
        above their scale at the start (the largest norm of the first ``window`` steps, so
        a model initialised near zero has grown to its working scale first). Cleared once
        none of that has held for ``recovery_window`` steps."""
        c = self.config
        norm = _value(row, "embedding_norm_mean")
        if self.first_step is None:
            self.first_step = step
        if step - self.first_step < c.window and math.isfinite(norm):
            self.start_norm = max(self.start_norm, norm)
        entries, losses = _value(row, "nonfinite_count"), _value(row, "nonfinite_loss_count")
        variance = _value(row, "embedding_variance")
        exploded = self.start_norm > 0 and norm > 10**c.divergence_orders * self.start_norm
        nonfinite = entries > 0 or losses > 0 or variance == math.inf or norm == math.inf
        bad = nonfinite or exploded
        self.sane_since = _streak(self.sane_since, not bad, step)
        evidence: dict[str, Any] = {
            "nonfinite_count": entries,
            "nonfinite_loss_count": losses,
            "embedding_norm_mean": norm,
            "start_embedding_norm_mean": self.start_norm,
            "embedding_variance": variance,
        }
        if not self.diverged and bad:
            self.diverged, self.diverged_since = True, step
            if nonfinite:
                what = []
                if losses > 0:
                    what.append(f"{losses:.0f} non-finite loss value(s)")
                if entries > 0:
                    what.append(f"{entries:.0f} NaN/inf embedding entries")
                cause = " and ".join(what) or "non-finite embedding statistics"
            else:
                cause = (
                    f"the mean embedding norm is {norm:.3g}, "
                    f"{math.log10(norm / self.start_norm):.1f} orders of magnitude above its "
                    f"start ({self.start_norm:.3g})"
                )
            message = f"Diverged at step {step}: {cause}."
            return [Event(step, "diverged", DIVERGED, message, SUGGESTIONS["diverged"], evidence)]
        if self.diverged and _lasted(self.sane_since, step, c.recovery_window):
            self.diverged = False
            evidence["since_step"] = self.sane_since
            message = (
                f"Divergence cleared at step {step}: losses and embeddings finite and at "
                f"their scale since step {self.sane_since}."
            )
            return [Event(step, "diverged_cleared", HEALTHY, message, "", evidence)]
        return []


@dataclass(frozen=True)
class Verdict:
    """The detector's conclusion about a whole run (what ``collapsewatch analyze`` prints).

    ``onset_step`` is the first step flagged collapsed; ``recovered_step`` the step the run
    recovered from its latest collapse, None if it never collapsed or is still collapsed;
    ``collapse_spans`` every (onset, recovery or None) pair. ``diverged_step`` is the first
    step flagged diverged (None if never).
    """

    collapsed: bool
    onset_step: int | None
    recovered_step: int | None
    state: str
    collapsed_at_end: bool
    last_step: int | None
    collapse_spans: tuple[tuple[int, int | None], ...]
    events: tuple[Event, ...]
    diverged_step: int | None = None

    @property
    def display_state(self) -> RunState:
        """The state a run list shows ("recovered" for a healthy run that once collapsed)."""
        return display_state(self.state, self.collapsed)

    @property
    def failed_at_end(self) -> bool:
        """Whether the run is collapsed or diverged at its last step."""
        return self.state in FAILED_STATES

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "collapsed": self.collapsed,
            "onset_step": self.onset_step,
            "recovered_step": self.recovered_step,
            "state": str(self.state),
            "collapsed_at_end": self.collapsed_at_end,
            "last_step": self.last_step,
            "collapse_spans": [list(span) for span in self.collapse_spans],
            "diverged_step": self.diverged_step,
            "events": [
                {
                    "step": e.step,
                    "kind": e.kind,
                    "state": str(e.state),
                    "message": e.message,
                    "suggestion": e.suggestion,
                    "evidence": dict(e.evidence),
                }
                for e in self.events
            ],
        }


def verdict_from_events(events: Iterable[Event], state: str, last_step: int | None) -> Verdict:
    """Summarise a run's events (live or replayed) into a :class:`Verdict`."""
    events = tuple(events)
    spans: list[tuple[int, int | None]] = []  # (onset, recovery or None)
    for event in events:
        if event.kind == "collapsed":
            spans.append((int(event.step), None))
        elif event.kind == "recovered" and spans and spans[-1][1] is None:
            spans[-1] = (spans[-1][0], int(event.step))
    collapsed_at_end = state == COLLAPSED
    return Verdict(
        collapsed=bool(spans),
        onset_step=spans[0][0] if spans else None,
        recovered_step=spans[-1][1] if spans and not collapsed_at_end else None,
        state=state,
        collapsed_at_end=collapsed_at_end,
        last_step=last_step,
        collapse_spans=tuple(spans),
        events=events,
        diverged_step=next((e.step for e in events if e.kind == "diverged"), None),
    )


def thin(metrics: pd.DataFrame, every: int) -> pd.DataFrame:
    """The rows a recording at ``every`` would hold, from one of every step: every
    ``every``-th row, each with ``loss_margin_ratio_step_change`` averaged over the steps
    since the row before it (what ``watch()`` sums over unrecorded steps). For
    checking that a verdict does not depend on the recording interval."""
    if every < 1:
        raise ValueError(f"every must be a positive number of steps, got {every}")
    column = "loss_margin_ratio_step_change"
    kept = metrics.iloc[::every].copy()
    if column in metrics:
        block = (np.arange(len(metrics)) + every - 1) // every
        kept[column] = metrics[column].groupby(block).mean().to_numpy()[: len(kept)]
    return kept


def analyze(
    run: str | os.PathLike[str] | Run | pd.DataFrame, config: DetectorConfig | None = None
) -> Verdict:
    """Replay a run through a fresh detector and return its verdict.

    Args:
        run: a run file's path, a loaded :class:`~collapsewatch.store.Run`, or a metrics
            DataFrame (``Run.metrics``).
        config: the thresholds; by default those the run was recorded with (or the defaults
            for a bare DataFrame), so the verdict reproduces what ``watch()`` saw live.
    """
    if isinstance(run, str | os.PathLike):
        run = load_run(run)
    loss_family, traits, distance = "bundled", frozenset[str](), "euclidean"
    actions: list[Event] = []
    if isinstance(run, Run):
        # What the training loop did about a collapse is not the detector's to replay.
        actions = [
            Event(e.step, e.kind, e.state, e.message, e.suggestion, e.evidence, e.time)
            for e in run.events.itertuples(index=False)
            if e.kind in ACTION_EVENTS
        ]
        if config is None:
            recorded = run.metadata.get("detector") or {}
            known = DetectorConfig.__dataclass_fields__
            config = DetectorConfig(**{k: v for k, v in recorded.items() if k in known})
        loss_family = run.metadata.get("loss_family") or "bundled"
        traits = frozenset(run.metadata.get("loss_traits") or ())
        distance = str(run.metadata.get("distance") or "euclidean")
        run = run.metrics
    detector = CollapseDetector(config or DetectorConfig(), loss_family, traits, distance=distance)
    # Stable: at one step the detector's events come before the actions taken on them.
    events = sorted(detector.replay(run) + actions, key=lambda e: e.step)
    return verdict_from_events(events, detector.state, detector.last_step)
