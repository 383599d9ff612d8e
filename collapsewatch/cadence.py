"""How often ``watch()`` counts easy / semi-hard / hard triplets.

Every recorded statistic costs one pass over the batch or its distance matrix, except the
difficulty counts: they sort every anchor's row of the N×N distance matrix, O(N² log N),
which on a CPU can cost more than a small model's whole training step. So they get their
own interval, in steps: fixed (``difficulty_every=k``) or chosen to fit a budget
(``difficulty_every="auto"``, ``overhead=0.03``):

    interval = ⌈ c / (overhead · t) ⌉

where c is the device time of one difficulty count on the run's own batch (measured once,
as statistics with the counts minus statistics without them) and t the device time of a
training step without them (the median gap between loss calls over the first steps, minus
c). The counts then cost at most ``overhead`` of the step time on average. The choice is
made once, after ``CALIBRATION_STEPS`` loss calls, and stored in the run's metadata.

Under torch.distributed "auto" is a fixed ``DISTRIBUTED_INTERVAL``: every rank must count
on the same steps (their counts are summed), and timings differ between ranks.

Times are read from the device without waiting for it: CUDA events, polled with ``query()``
before ``elapsed_time`` is read; host time on the CPU, where the work is synchronous.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from typing import Literal

import torch

CALIBRATION_STEPS = 8
"""Loss calls timed before the interval is chosen (the first two gaps are left out: they
carry allocations and warm-up)."""

DISTRIBUTED_INTERVAL = 10
"""The interval "auto" means under torch.distributed."""

MAX_INTERVAL = 10_000

DifficultyEvery = int | Literal["auto"]

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
        if not self.cuda:
            return end - start  # type: ignore[operator]
        if not end.query():  # type: ignore[union-attr]
            return None
        return start.elapsed_time(end) / 1e3  # type: ignore[union-attr]


def check_difficulty_every(value: object, overhead: object) -> None:
    """Raise ``ValueError`` naming the problem with ``difficulty_every`` or ``overhead``."""
    if value != "auto" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"difficulty_every must be 'auto' or an integer ≥ 1, got {value!r}")
    if isinstance(value, int) and value < 1:
        raise ValueError(f"difficulty_every must be 'auto' or an integer ≥ 1, got {value!r}")
    if not (isinstance(overhead, int | float) and 0 < overhead <= 1):
        raise ValueError(f"overhead must be a fraction in (0, 1], got {overhead!r}")


class DifficultyCadence:
    """Decides, step by step, whether to count triplet difficulties.

    Args:
        every: an interval in steps, or "auto" (see the module docstring).
        overhead: the share of the step time the counts may take on average ("auto").
        device: where the training runs (its clock is used).
        distributed: running under torch.distributed ("auto" is then fixed).
    """

    def __init__(
        self, every: DifficultyEvery, overhead: float, device: torch.device, distributed: bool
    ) -> None:
        check_difficulty_every(every, overhead)
        if every == "auto" and distributed:
            every = DISTRIBUTED_INTERVAL
        self.interval: int | None = None if every == "auto" else int(every)
        self.overhead = overhead
        self.measured: dict[str, float] = {}
        self._clock = DeviceClock(device)
        self._calls: list[Mark] = []
        self._cost: tuple[Mark, Mark, Mark] | None = None
        self._last: int | None = None

    def loss_called(self) -> None:
        """Note a loss call (a step) while the interval is undecided."""
        if self.interval is not None:
            return
        if len(self._calls) < CALIBRATION_STEPS:
            self._calls.append(self._clock.mark())
        self._decide()

    def due(self, step: int) -> bool:
        """Whether recorded step ``step`` counts difficulties; every step until decided."""
        waiting = self.interval is not None and self._last is not None
        if waiting and step - self._last < self.interval:  # type: ignore[operator]
            return False
        self._last = step
        return True

    @property
    def wants_measurement(self) -> bool:
        """Whether the next labelled step should time the counts (:meth:`measure`)."""
        return (
            self.interval is None and self._cost is None and len(self._calls) >= CALIBRATION_STEPS
        )

    def measure(self, without: Callable[[], object], with_counts: Callable[[], object]) -> None:
        """Time the step's statistics without and with the difficulty counts, once."""
        start = self._clock.mark()
        without()
        middle = self._clock.mark()
        with_counts()
        self._cost = (start, middle, self._clock.mark())

    def _decide(self) -> None:
        if self._cost is None:
            return
        clock = self._clock
        plain = clock.seconds(self._cost[0], self._cost[1])
        full = clock.seconds(self._cost[1], self._cost[2])
        gaps = [clock.seconds(a, b) for a, b in itertools.pairwise(self._calls[2:])]
        if plain is None or full is None or None in gaps:
            return  # the device is not there yet: ask again at the next call
        counts = max(full - plain, 0.0)
        # The calibration steps counted difficulties: take that cost out of their gaps.
        step = max(statistics.median(gaps) - counts, 1e-9)  # type: ignore[type-var]
        # Rounded first, so that timings at the budget exactly give that interval.
        wanted = math.ceil(round(counts / (self.overhead * step), 9))
        self.interval = min(max(wanted, 1), MAX_INTERVAL)
        self.measured = {"difficulty_seconds": counts, "step_seconds": step}
