"""Decimation: what of a long series to draw so its shape, extremes and flagged spans survive.

The rule: a series longer than ``max_points`` is cut into equal-width buckets along the step
axis and each bucket keeps the rows holding the minimum and the maximum of every plotted
column (NaN ignored), so every spike and the global extremes are drawn. Rows in flagged
spans (detector state warning or collapsed) and at event steps (± one row) are kept
exactly, up to half the point budget; a flagged span too long for that keeps its first and
last rows exactly (the onset and the recovery) and is decimated in between.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from .data import Span


def decimate_indices(
    steps: np.ndarray,
    values: np.ndarray,
    max_points: int,
    exact: np.ndarray | None = None,
) -> np.ndarray:
    """Row indices to plot so a long series keeps its shape in about ``max_points`` points.

    Rows are split into ``max_points // (2·k)`` equal-width buckets along the step axis
    (``k`` = number of columns); each bucket keeps, for every column, the row of its
    minimum and of its maximum (NaN ignored), so every spike and the global extremes are
    drawn. The first and last row and every row where ``exact`` is true are kept too.
    With ``n ≤ max_points`` rows nothing is dropped.

    Args:
        steps: (n,) ascending steps.
        values: (n,) or (n, k) values of the plotted columns.
        max_points: the point budget per column, excluding exact rows.
        exact: optional (n,) mask of rows that must be kept.
    """
    n = len(steps)
    if n <= max_points:
        return np.arange(n)
    values = np.asarray(values, dtype=float).reshape(n, -1)
    k = values.shape[1]
    buckets = max(1, max_points // (2 * k))
    lo, hi = int(steps[0]), int(steps[-1])
    # Equal-width buckets of steps, not of rows: the picture does not depend on how densely
    # some stretch of training was logged.
    bucket = ((np.asarray(steps, dtype=np.int64) - lo) * buckets // max(hi - lo, 1)).clip(
        0, buckets - 1
    )
    keep = [np.array([0, n - 1]), *bucket_extremes(bucket, values)]
    if exact is not None:
        keep.append(np.flatnonzero(exact))
    return np.unique(np.concatenate(keep))


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


def exact_mask(
    steps: np.ndarray,
    spans: Sequence[Span],
    event_steps: Iterable[int],
    last_step: int | None,
    budget: int,
) -> np.ndarray:
    """Rows to keep exactly: inside flagged ``spans`` and at ``event_steps`` (± one row).

    Spans are kept whole while their rows fit in ``budget``; otherwise each span keeps its
    first and last ``budget / (2·spans)`` rows, so onset and recovery stay exact.
    """
    steps = np.asarray(steps)
    mask = np.zeros(len(steps), dtype=bool)
    ranges = []
    for span in spans:
        lo = int(np.searchsorted(steps, span.start, side="left"))
        hi = int(np.searchsorted(steps, span.stop(last_step), side="right"))
        ranges.append((lo, hi))
    total = sum(hi - lo for lo, hi in ranges)
    per_end = max(1, budget // (2 * max(1, len(ranges))))
    for lo, hi in ranges:
        if total <= budget:
            mask[lo:hi] = True
        else:
            mask[lo : min(hi, lo + per_end)] = True
            mask[max(lo, hi - per_end) : hi] = True
    for step in event_steps:
        at = int(np.searchsorted(steps, step, side="left"))
        mask[max(0, at - 1) : at + 2] = True
    return mask


def decimate_frame(
    frame: pd.DataFrame,
    columns: Sequence[str],
    max_points: int,
    spans: Sequence[Span] = (),
    event_steps: Iterable[int] = (),
    last_step: int | None = None,
) -> pd.DataFrame:
    """The rows of ``frame`` to plot for ``columns``: rows where any of them is finite,
    decimated by :func:`decimate_indices` with flagged spans and events kept exact."""
    present = [c for c in columns if c in frame]
    if not present:
        return frame.iloc[0:0][["step"]]
    values = frame[present].to_numpy(dtype=float)
    rows = np.isfinite(values).any(axis=1)
    values, sub = values[rows], frame.loc[rows, ["step", *present]]
    steps = sub["step"].to_numpy()
    exact = exact_mask(steps, spans, event_steps, last_step, max(1, max_points // 2))
    return sub.iloc[decimate_indices(steps, values, max_points, exact)]
