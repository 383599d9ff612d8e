"""Decimation: what of a long series to draw so its shape, extremes and flagged spans survive.

The rule: a series of more than ``max_points`` rows (rows with a finite value in a plotted
column) is cut into equal-width buckets along the step axis, and each bucket keeps the rows
holding the minimum and the maximum of every plotted column (NaN and ±inf ignored), so
every spike and the global extremes are drawn; the first and last row are kept too.

Bucket widths are powers of two, counted from the first step: as a live run grows, a bucket
the run has passed never changes, and when the run outgrows the budget, pairs of buckets
merge into one whose extremes are among theirs. So :class:`Extremes` folds over the rows as
they arrive, a poll paying for its new rows only, and ends with the rows one fold over the
whole run gives.

Rows in flagged spans (detector state warning or collapsed) and at event steps (with the
plotted rows either side) are kept exactly, up to half the point budget; a flagged span too
long for that keeps its first and last rows exactly (the onset and the recovery) and is
decimated in between.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .data import Span


@dataclass(frozen=True)
class Extremes:
    """The rows to draw of one group of ``k`` columns, folded over a run's rows in order.

    Immutable: :meth:`extend` returns a new one, so a state handed to another thread stays
    valid. Row numbers count every row given so far, measured or not.

    Attributes:
        max_points: the point budget per column.
        rows: (m,) kept row numbers, ascending: every measured row (a finite value in some
            column) while there are at most ``max_points``, then the buckets' extremes.
        steps: (m,) their steps.
        values: (m, k) their values.
        count: measured rows seen.
        first: the first measured row (-1 before one).
        last: the last measured row (-1 before one).
        origin: the first measured row's step, where the first bucket starts.
    """

    max_points: int
    rows: np.ndarray
    steps: np.ndarray
    values: np.ndarray
    count: int = 0
    first: int = -1
    last: int = -1
    origin: int = 0

    @classmethod
    def start(cls, max_points: int, k: int) -> Extremes:
        """Nothing seen yet, for ``k`` columns."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(max_points, empty, empty, np.zeros((0, k)))

    def extend(self, steps: np.ndarray, values: np.ndarray, offset: int) -> Extremes:
        """The fold after ``n`` more rows: ``steps`` (n,) ascending and after those seen,
        ``values`` (n,) or (n, k), the first of them being row number ``offset``."""
        if not len(steps):
            return self
        values = np.asarray(values, dtype=float).reshape(len(steps), -1)
        measured = np.isfinite(values).any(axis=1)
        if not measured.any():
            return self
        new_rows = offset + np.flatnonzero(measured)
        rows = np.concatenate([self.rows, new_rows])
        steps = np.concatenate([self.steps, np.asarray(steps, dtype=np.int64)[measured]])
        values = np.concatenate([self.values, values[measured]])
        count = self.count + len(new_rows)
        first, origin = self.first, self.origin
        if first < 0:
            first, origin = int(new_rows[0]), int(steps[0])
        if count > self.max_points:
            # rows ⊇ every bucket's extremes at the old width, and each bucket of the new
            # width is a union of old ones: the extremes among rows are the true ones.
            found = _extreme_rows(steps, values, self.max_points, origin)
            keep = np.unique(np.concatenate(found))
            rows, steps, values = rows[keep], steps[keep], values[keep]
        last = int(new_rows[-1])
        return Extremes(self.max_points, rows, steps, values, count, first, last, origin)

    def kept(self) -> np.ndarray:
        """Row numbers to draw, ascending: the kept rows and the first and last measured."""
        if self.count == 0:
            return self.rows
        return np.union1d(self.rows, [self.first, self.last])


def _extreme_rows(
    steps: np.ndarray, values: np.ndarray, max_points: int, origin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of each bucket's extremes among ``steps`` (m,) / ``values`` (m, k), the
    buckets counted from step ``origin`` (see :func:`bucket_extremes`)."""
    buckets = max(1, max_points // (2 * values.shape[1]))
    width = 1  # the narrowest power of two that fits the steps in `buckets` buckets
    while (int(steps[-1]) - origin) // width >= buckets:
        width <<= 1
    return bucket_extremes((steps - origin) // width, values)


def decimate_indices(
    steps: np.ndarray,
    values: np.ndarray,
    max_points: int,
    exact: np.ndarray | None = None,
) -> np.ndarray:
    """Row indices to plot so a long series keeps its shape in about ``max_points`` points.

    With more than ``max_points`` measured rows (a finite value in some column), rows are
    split into at most ``max_points // (2·k)`` buckets along the step axis, of one
    power-of-two width counted from the first measured step (``k`` = number of columns);
    each bucket keeps, for every column, the first row of its minimum and of its maximum
    (NaN and ±inf ignored), so every spike and the global extremes are drawn. Otherwise
    every measured row is kept. The first and last measured row and every row where
    ``exact`` is true are kept too. This is one :class:`Extremes` fold over all rows.

    Args:
        steps: (n,) ascending steps.
        values: (n,) or (n, k) values of the plotted columns.
        max_points: the point budget per column, excluding exact rows.
        exact: optional (n,) mask of rows that must be kept.
    """
    values = np.asarray(values, dtype=float)
    k = values.shape[1] if values.ndim == 2 else 1
    keep = [Extremes.start(max_points, k).extend(steps, values, 0).kept()]
    if exact is not None:
        keep.append(np.flatnonzero(exact))
    return np.unique(np.concatenate(keep)).astype(np.int64)


def bucket_extremes(bucket: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket and column, the first row of its minimum and of its maximum (NaN and ±inf
    are never an extreme; a bucket where a column has no finite value gives that column no
    row).

    Args:
        bucket: (n,) non-decreasing bucket numbers, so each bucket is one run of rows.
        values: (n, k) values.

    Returns:
        (rows of minima, rows of maxima), each ascending within a column, column after column.
    """
    finite = np.isfinite(values)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    group = np.cumsum(np.r_[False, bucket[1:] != bucket[:-1]])  # (n,) run number of each row
    found = []
    for sign in (1.0, -1.0):
        # O(n): a bucket is a run of rows, so its minimum is one reduceat, and the first row
        # holding it is the first hit of that run (ties go to the earliest row).
        key = np.where(finite, sign * values, np.inf)
        lowest = np.minimum.reduceat(key, starts, axis=0)  # (buckets, k)
        hit = finite & (key == lowest[group])
        column, row = np.nonzero(hit.T)  # column-major: each column's rows ascending
        run = column * len(starts) + group[row]
        first = np.r_[True, run[1:] != run[:-1]]
        found.append(row[first])
    return found[0], found[1]


def exact_rows(
    frame: pd.DataFrame,
    columns: Sequence[str],
    spans: Sequence[Span],
    event_steps: Iterable[int],
    last_step: int | None,
    budget: int,
) -> np.ndarray:
    """Row numbers of ``frame`` to keep exactly: inside flagged ``spans``, and at each of
    ``event_steps`` the first row measured in ``columns`` at or after it with the measured
    rows either side of that one.

    Spans are kept whole while their rows fit in ``budget``; otherwise each span keeps its
    first and last ``budget / (2·spans)`` rows, so onset and recovery stay exact. Costs
    the spans' and events' rows, not the frame's.
    """
    steps = frame["step"].to_numpy()
    ranges = []
    for span in spans:
        lo = int(np.searchsorted(steps, span.start, side="left"))
        hi = int(np.searchsorted(steps, span.stop(last_step), side="right"))
        ranges.append((lo, hi))
    total = sum(hi - lo for lo, hi in ranges)
    per_end = max(1, budget // (2 * max(1, len(ranges))))
    parts = [np.zeros(0, dtype=np.int64)]
    for lo, hi in ranges:
        if total <= budget:
            parts.append(np.arange(lo, hi))
        else:
            parts += [np.arange(lo, min(hi, lo + per_end)), np.arange(max(lo, hi - per_end), hi)]
    for step in event_steps:
        parts.append(_measured_around(frame, columns, int(np.searchsorted(steps, step))))
    return np.unique(np.concatenate(parts)).astype(np.int64)


def _measured_around(frame: pd.DataFrame, columns: Sequence[str], at: int) -> np.ndarray:
    """The first row measured in ``columns`` at or after row ``at``, the measured row
    before it and the one after it: searched in a window that widens until it holds
    them (rank columns are measured every few rows only)."""
    n, window = len(frame), 8
    while True:
        lo, hi = max(0, at - window), min(n, at + window)
        block = frame.iloc[lo:hi][list(columns)].to_numpy(dtype=float)
        measured = lo + np.flatnonzero(np.isfinite(block).any(axis=1))
        before, after = measured[measured < at], measured[measured >= at]
        if (len(before) or lo == 0) and (len(after) >= 2 or hi == n):
            return np.concatenate([before[-1:], after[:2]])
        window *= 4


def decimate_frame(
    frame: pd.DataFrame,
    columns: Sequence[str],
    max_points: int,
    spans: Sequence[Span] = (),
    event_steps: Iterable[int] = (),
    last_step: int | None = None,
    extremes: Extremes | None = None,
) -> pd.DataFrame:
    """The rows of ``frame`` to plot for ``columns``, each with a finite value in one of
    them: what :class:`Extremes` keeps, with flagged spans and events kept exact.

    ``extremes`` is the fold over ``frame``'s rows of its present ``columns`` (in order)
    if the caller keeps one as the run grows; without it, it is folded here from all rows.
    """
    present = [c for c in columns if c in frame]
    if not present:
        return frame.iloc[0:0][["step"]]
    if extremes is None:
        extremes = Extremes.start(max_points, len(present))
        extremes = extremes.extend(frame["step"].to_numpy(), frame[present].to_numpy(float), 0)
    exact = exact_rows(frame, present, spans, event_steps, last_step, max(1, max_points // 2))
    sub = frame.iloc[np.union1d(extremes.kept(), exact)][["step", *present]]
    return sub[np.isfinite(sub[present].to_numpy(dtype=float)).any(axis=1)]
