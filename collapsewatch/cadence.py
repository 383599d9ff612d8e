"""Which steps ``watch()`` records, and on which of them it counts triplet difficulties.

Recording a step costs a few dozen small kernels, the loss's own statistics and the writer
thread's share of the interpreter; on a CPU that is a sizeable part of a small model's
step. The difficulty counts cost more again: they sort every anchor's row of the N×N
distance matrix, O(N² log N). So both have an interval, in steps: fixed (``every=k``,
``difficulty_every=k``) or chosen to fit a budget (``"auto"``, ``overhead=0.03``), which
the two share equally:

    every            = ⌈ r / (overhead/2 · t) ⌉, at most ``max_every``
    difficulty_every = ⌈ c / (overhead/2 · t) ⌉

where t is the device time of a training step without ``watch()``, r the extra time of a
recorded step (its hooks, the loss's statistics, and its share of the copy to the host and
of the writer thread's CPU time) and c the extra time of counting difficulties on it. The
recording interval is capped (``max_every``: half the detector's window) so that a collapse
is still seen within the window on a slow device; the cost can then exceed the budget, and
the timings in the run's metadata show by how much.

Calibration, once, at the start of the run:

1. ``CALIBRATION_STEPS`` loss calls, every one recorded with its difficulty counts.
2. At the first labelled recorded step after them the step's statistics are timed once
   without and once with the counts: c.
3. With ``every="auto"``: ``2 · RECORDING_PAIRS`` steps alternately recorded and skipped
   (no counts on them): t is the median gap between loss calls after a skipped step, r the
   median after a recorded one minus t. Then one commit (the run's second: the first,
   after phase 1, creates its tables): the host time of the copy and the writer thread's
   CPU time, per row, are added to r.
4. The intervals are chosen at the first loss call where every timing can be read; until
   then every step is recorded. Without phase 3, t is the median gap of phase 1 minus c.

Under torch.distributed ``every="auto"`` means 1 and ``difficulty_every="auto"`` a fixed
``DISTRIBUTED_INTERVAL``: every rank must record and count on the same steps (their sums
are reduced together), and timings differ between ranks.

Times are read from the device without waiting for it: CUDA events, polled with ``query()``
before ``elapsed_time`` is read; host time on the CPU, where the work is synchronous.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch

CALIBRATION_STEPS = 8
"""Loss calls timed before the difficulty interval is chosen (the first two gaps are left
out: they carry allocations and warm-up)."""

RECORDING_PAIRS = 6
"""Recorded and skipped steps, alternating, timed to choose the recording interval."""

DISTRIBUTED_INTERVAL = 10
"""The difficulty interval "auto" means under torch.distributed."""

MAX_INTERVAL = 10_000

Every = int | Literal["auto"]

Mark = float | torch.cuda.Event


class DeviceClock:
    """Marks on the device's timeline; the seconds between two, once the device got there."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Mark, end: Mark) -> float | None:
        """Seconds from ``start`` to ``end``; None while the device has not reached ``end``."""
        # One clock's marks are all perf_counter() floats or all CUDA events (see mark()).
        if not self.cuda:
            return end - start  # type: ignore[operator]  # floats here
        if not end.query():  # type: ignore[union-attr]  # events here
            return None
        return start.elapsed_time(end) / 1e3  # type: ignore[union-attr, arg-type]  # events


def _gaps(clock: DeviceClock, marks: Sequence[Mark]) -> list[float] | None:
    """Seconds between consecutive marks; None while the device has not reached them."""
    gaps = []
    for start, end in itertools.pairwise(marks):
        gap = clock.seconds(start, end)
        if gap is None:
            return None
        gaps.append(gap)
    return gaps


def check_interval(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is "auto" or an integer ≥ 1."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise ValueError(f"{name} must be 'auto' or an integer ≥ 1, got {value!r}")


def check_overhead(overhead: object) -> None:
    if not (isinstance(overhead, int | float) and not isinstance(overhead, bool)):
        raise ValueError(f"overhead must be a fraction in (0, 1], got {overhead!r}")
    if not 0 < overhead <= 1:
        raise ValueError(f"overhead must be a fraction in (0, 1], got {overhead!r}")


def _interval(cost: float, budget: float, most: int) -> int:
    # Rounded first, so that timings exactly at the budget give that interval.
    return min(max(math.ceil(round(cost / budget, 9)), 1), most)


class Cadence:
    """Decides, step by step, whether to record a step and whether to count difficulties.

    Args:
        every: the recording interval in steps, or "auto" (see the module docstring).
        difficulty_every: the difficulty interval in steps, or "auto".
        overhead: the share of the step time watching may take on average ("auto").
        device: where the training runs (its clock is used).
        distributed: running under torch.distributed ("auto" is then fixed).
        max_every: the largest recording interval "auto" may choose.
    """

    def __init__(
        self,
        every: Every,
        difficulty_every: Every,
        overhead: float,
        device: torch.device,
        *,
        distributed: bool = False,
        max_every: int = MAX_INTERVAL,
    ) -> None:
        check_interval("every", every)
        check_interval("difficulty_every", difficulty_every)
        check_overhead(overhead)
        if distributed:
            every = 1 if every == "auto" else every
            if difficulty_every == "auto":
                difficulty_every = DISTRIBUTED_INTERVAL
        self.every: int | None = None if every == "auto" else int(every)
        self.interval: int | None = None if difficulty_every == "auto" else int(difficulty_every)
        self.overhead = float(overhead)
        self.max_every = max(1, max_every)
        self.measured: dict[str, float] = {}
        self._clock = DeviceClock(device)
        self._calls = 0
        self._first: list[Mark] = []  # phase 1: the first loss calls
        self._cost: tuple[Mark, Mark, Mark] | None = None  # phase 2
        # Phase 3: (mark, whether recorded, whether timed) per loss call, from its first step.
        self._alternating: list[tuple[Mark, bool, bool]] = []
        self._alternate_from: int | None = None
        self._commits: dict[str, int] = {}  # commits seen, by side
        self._commit: dict[str, float] = {}  # seconds per row of the second commit, by side
        self._every_from = 0  # the step the decided recording interval counts from
        self._last_counted: int | None = None

    # ------------------------------------------------------------------ per loss call
    def loss_called(self, step: int) -> None:
        """Note the loss call of step ``step``; decisions take effect from the next step."""
        self._calls += 1
        if self.every is None and self._alternate_from is None and self._calls > CALIBRATION_STEPS:
            self._alternate_from = step
        first = self.calibrating and len(self._first) < CALIBRATION_STEPS
        # Phase 3's marks: one per call in it, and one more that ends its last gap.
        alternating = self._alternate_from is not None and (
            len(self._alternating) < 2 * RECORDING_PAIRS + 1
        )
        if first or alternating:
            mark = self._clock.mark()
            if first:
                self._first.append(mark)
            if alternating:
                self._alternating.append((mark, self.records(step), True))
        self._decide(step)

    def records(self, step: int) -> bool:
        """Whether step ``step`` is recorded (asked before its loss call too, by the model
        hook, so it only depends on what earlier calls decided)."""
        if self.every is not None:
            return step >= self._every_from and (step - self._every_from) % self.every == 0
        phase = self._alternating_phase(step)
        return phase is None or phase % 2 == 0

    def counts_difficulty(self, step: int) -> bool:
        """Whether recorded step ``step`` counts difficulties: every step until the interval
        is decided, except while the recording interval is being timed. Asked once per
        recorded step, in step order: a True answer starts the next interval."""
        if self._alternating_phase(step) is not None:
            return False
        last = self._last_counted
        if self.interval is not None and last is not None and step - last < self.interval:
            return False
        self._last_counted = step
        return True

    # ------------------------------------------------------------------ measurements
    @property
    def calibrating(self) -> bool:
        return self.every is None or self.interval is None

    @property
    def wants_measurement(self) -> bool:
        """Whether the next labelled step should time the counts (:meth:`measure`)."""
        return self.interval is None and self._cost is None and self._calls >= CALIBRATION_STEPS

    def measure(self, without: Callable[[], object], with_counts: Callable[[], object]) -> None:
        """Time the step's statistics without and with the difficulty counts, once."""
        if self._alternating and self._alternating[-1][1]:
            # This step's gap carries the measurement: it says nothing about recording.
            mark, recorded, _ = self._alternating[-1]
            self._alternating[-1] = (mark, recorded, False)
        start = self._clock.mark()
        without()
        middle = self._clock.mark()
        with_counts()
        self._cost = (start, middle, self._clock.mark())

    @property
    def wants_flush(self) -> bool:
        """Whether the recorded steps should be committed now: once after phase 1 (the
        run's first commit creates its tables, which is not what a commit costs), and
        once after phase 3, the commit that is timed."""
        if self.every is not None:
            return False
        commits = self._commits.get("host", 0)
        return (commits == 0 and len(self._first) >= CALIBRATION_STEPS) or (
            commits == 1 and len(self._alternating) > 2 * RECORDING_PAIRS
        )

    def committed(self, side: Literal["host", "writer"], seconds: float, rows: int) -> None:
        """Note the seconds a commit of ``rows`` recorded steps took on one side: the host
        time of the copy (training thread), or the writer thread's CPU time. The second
        commit's are kept."""
        if self.every is None and rows > 0:
            self._commits[side] = self._commits.get(side, 0) + 1
            if self._commits[side] == 2:
                self._commit[side] = seconds / rows

    # ------------------------------------------------------------------ decisions
    def _alternating_phase(self, step: int) -> int | None:
        """Step's index in phase 3 (recorded when even), or None outside it."""
        if self.every is not None or self._alternate_from is None:
            return None
        index = step - self._alternate_from
        return index if 0 <= index < 2 * RECORDING_PAIRS else None

    def _decide(self, step: int) -> None:
        clock = self._clock
        step_seconds = None
        if self.every is None:
            step_seconds = self._decide_every(step)
            if self.every is None:
                return
        if self.interval is not None or self._cost is None:
            return
        plain = clock.seconds(self._cost[0], self._cost[1])
        full = clock.seconds(self._cost[1], self._cost[2])
        gaps = _gaps(clock, self._first[2:])
        if plain is None or full is None or gaps is None:
            return  # the device is not there yet: ask again at the next call
        counts = max(full - plain, 0.0)
        if step_seconds is None:
            step_seconds = self.measured.get("step_seconds")
        if step_seconds is None:
            # The first steps counted difficulties: take that cost out of their gaps.
            step_seconds = max(statistics.median(gaps) - counts, 1e-9)
            self.measured["step_seconds"] = step_seconds
        self.interval = _interval(counts, self.overhead / 2 * step_seconds, MAX_INTERVAL)
        self.measured["difficulty_seconds"] = counts

    def _decide_every(self, step: int) -> float | None:
        """Choose the recording interval once phase 3 and one commit can be read."""
        if len(self._alternating) <= 2 * RECORDING_PAIRS or len(self._commit) < 2:
            return None  # not timed yet: the commit on the host, then by the writer
        clock = self._clock
        recorded: list[float] = []
        skipped: list[float] = []
        for (start, was_recorded, timed), (end, _, _) in itertools.pairwise(self._alternating):
            gap = clock.seconds(start, end)
            if gap is None:
                return None
            if timed:
                (recorded if was_recorded else skipped).append(gap)
        step_seconds = max(statistics.median(skipped), 1e-9)
        hooks = max(statistics.median(recorded) - step_seconds, 0.0)
        commit = self._commit["host"] + self._commit["writer"]
        cost = hooks + commit
        self.every = _interval(cost, self.overhead / 2 * step_seconds, self.max_every)
        self._every_from = step + 1
        self.measured.update(
            step_seconds=step_seconds,
            record_seconds=hooks,
            commit_host_seconds=self._commit["host"],
            commit_writer_seconds=self._commit["writer"],
        )
        return step_seconds
