"""The dashboard's data layer: run ids, cached incremental reads, decimation, projections.

Everything here goes through the store's public API (``list_runs``, ``RunReader``); the
dashboard never touches a run's tables itself and never writes.

Run ids: the browser names a run by its path relative to the log directory, in POSIX form
(``"sweep/lr-0.1.cwrun"``). :func:`resolve_run_id` is the only way such an id becomes a path,
and it rejects anything that would leave the log directory.

Decimation (see :func:`decimate_indices`): a series longer than ``max_points`` is cut into
equal-width step buckets and each bucket keeps the rows holding its minimum and maximum of
every plotted column, so spikes and the global extremes survive; rows in flagged spans
(detector state warning or collapsed) and at event steps are kept exactly, up to half the
point budget.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from collapsewatch.store import (
    RUN_SUFFIX,
    RunFileError,
    RunReader,
    RunSummary,
    check_run_name,
    list_runs,
)

# Longest run id accepted from the browser; real ones are far shorter.
MAX_RUN_ID_LENGTH = 1024
# Snapshot points sent to the browser; more than this is a blur anyway.
MAX_EMBEDDING_POINTS = 2000
# t-SNE is O(n log n) per iteration and runs on request; this keeps it to seconds.
MAX_TSNE_POINTS = 1000
# Snapshots (and points per snapshot) used to fit the shared PCA basis of a run.
PCA_FIT_SNAPSHOTS = 20
PCA_FIT_POINTS = 500

UI_STATES = ("healthy", "warning", "collapsed", "recovered", "error")


class InvalidRunIdError(ValueError):
    """A run id from the browser that does not name a run file inside the log directory."""


def resolve_run_id(logdir: str | Path, run_id: object) -> Path:
    """The run file that ``run_id`` names inside ``logdir``, or raise :class:`InvalidRunIdError`.

    A valid id is a relative POSIX path whose parts are run-name-like (letters, digits,
    ``._-``, not starting with a dot, so no ``..``), ending in ``.cwrun``, and whose resolved
    path (symlinks followed) is still inside ``logdir``. The file need not exist.
    """
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_RUN_ID_LENGTH:
        raise InvalidRunIdError(f"invalid run id {run_id!r}")
    if "\\" in run_id or "\x00" in run_id or run_id.startswith("/"):
        raise InvalidRunIdError(f"invalid run id {run_id!r}")
    parts = PurePosixPath(run_id).parts
    if not parts[-1].endswith(RUN_SUFFIX):
        raise InvalidRunIdError(f"run id {run_id!r} does not name a {RUN_SUFFIX} file")
    try:
        for part in (*parts[:-1], parts[-1][: -len(RUN_SUFFIX)]):
            check_run_name(part)
    except ValueError:
        raise InvalidRunIdError(f"invalid run id {run_id!r}") from None
    root = Path(logdir).resolve()
    path = root.joinpath(*parts).resolve()
    # A symlink may still point elsewhere: the resolved file must live under the root.
    if not path.is_relative_to(root) or path.suffix != RUN_SUFFIX:
        raise InvalidRunIdError(f"run id {run_id!r} points outside the log directory")
    return path


def run_id_of(logdir: str | Path, path: str | Path) -> str:
    """The browser-side id of a run file found under ``logdir``."""
    return Path(path).relative_to(Path(logdir)).as_posix()


# ---------------------------------------------------------------------------------------
# Run list
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """The event that put a run into its current (warning or collapsed) state."""

    state: str
    kind: str
    onset_step: int
    message: str
    suggestion: str
    evidence: dict[str, Any]


def current_alert(events: pd.DataFrame) -> Alert | None:
    """The event that started the run's current non-healthy state, or None if healthy.

    The onset is the first event of the current streak of that state, so later events in
    the same state (say a "nonfinite" while collapsed) do not move it.
    """
    if not len(events):
        return None
    states = events["state"].tolist()
    current = states[-1]
    if current == "healthy":
        return None
    start = len(states) - 1
    while start > 0 and states[start - 1] == current:
        start -= 1
    row = events.iloc[start]
    evidence = row["evidence"] if isinstance(row["evidence"], dict) else {}
    return Alert(
        state=str(current),
        kind=str(row["kind"]),
        onset_step=int(row["step"]),
        message=str(row["message"]),
        suggestion=str(row["suggestion"]),
        evidence=dict(evidence),
    )


@dataclass(frozen=True)
class RunEntry:
    """One line of the run list: a readable run's summary, or why it cannot be read."""

    run_id: str
    summary: RunSummary | None = None
    error: str | None = None
    alert: Alert | None = None  # why the run is in its current warning/collapsed state

    @property
    def name(self) -> str:
        if self.summary is not None:
            return self.summary.name
        return PurePosixPath(self.run_id).name.removesuffix(RUN_SUFFIX)

    @property
    def ui_state(self) -> str:
        """healthy / warning / collapsed / recovered (healthy again after a collapse) / error."""
        if self.summary is None:
            return "error"
        state = self.summary.state
        if state == "healthy" and self.summary.ever_collapsed:
            return "recovered"
        return state if state in UI_STATES else "warning"


@dataclass(frozen=True)
class RunListing:
    """All runs under the log directory at one moment, sorted by run id."""

    entries: tuple[RunEntry, ...]
    error: str | None = None  # the log directory itself could not be listed

    def get(self, run_id: str) -> RunEntry | None:
        return next((e for e in self.entries if e.run_id == run_id), None)


# ---------------------------------------------------------------------------------------
# Per-run cache
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Steps ``start`` ≤ step ≤ ``end`` in one detector state; ``end`` None = still open."""

    start: int
    end: int | None

    def stop(self, last_step: int | None) -> int:
        """The span's last step, an open span ending at the run's last step."""
        if self.end is not None:
            return self.end
        return max(self.start, last_step if last_step is not None else self.start)


@dataclass(frozen=True)
class RunView:
    """A run as cached at one moment. The frames are shared: treat them as read-only."""

    run_id: str
    path: Path
    name: str
    generation: Any  # changes when the file is replaced by a new run of the same name
    metadata: dict[str, Any]
    metrics: pd.DataFrame  # every row, sorted by step, with derived columns added
    events: pd.DataFrame
    snapshot_steps: tuple[int, ...]

    @property
    def last_step(self) -> int | None:
        return int(self.metrics["step"].iloc[-1]) if len(self.metrics) else None

    @property
    def steps(self) -> np.ndarray:
        return self.metrics["step"].to_numpy()

    def rows_after(self, step: int | None) -> pd.DataFrame:
        """Rows with a step after ``step`` (all rows for None), found by bisection."""
        if step is None:
            return self.metrics
        start = int(np.searchsorted(self.steps, step, side="right"))
        return self.metrics.iloc[start:]

    @property
    def margin(self) -> float | None:
        value = self.metadata.get("margin")
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value)
        return None

    @property
    def embedding_dim(self) -> int | None:
        value = self.metadata.get("embedding_dim")
        if isinstance(value, int) and value > 0:
            return value
        if "embedding_dim" in self.metrics and self.metrics["embedding_dim"].notna().any():
            return int(self.metrics["embedding_dim"].dropna().iloc[-1])
        return None

    def spans(self, states: Iterable[str] = ("collapsed",)) -> list[Span]:
        """Spans in which the detector's state was one of ``states``."""
        return state_spans(self.events, states)


def state_spans(events: pd.DataFrame, states: Iterable[str] = ("collapsed",)) -> list[Span]:
    """Spans of steps in ``states``, from the events' state transitions (events in id order).

    A span opens at the event that enters one of ``states`` and closes at the event that
    leaves them ("recovered", "cleared"); one still open has ``end=None``.
    """
    wanted = set(states)
    spans: list[Span] = []
    start: int | None = None
    for step, state in zip(events.get("step", []), events.get("state", []), strict=True):
        inside = state in wanted
        if inside and start is None:
            start = int(step)
        elif not inside and start is not None:
            spans.append(Span(start, int(step)))
            start = None
    if start is not None:
        spans.append(Span(start, None))
    return spans


def _with_derived(frame: pd.DataFrame, margin: float | None) -> pd.DataFrame:
    # Older or foreign runs may lack the ratio; it is the headline number, so derive it.
    if "loss_margin_ratio" not in frame and "loss" in frame:
        if "margin" in frame:
            frame = frame.assign(loss_margin_ratio=frame["loss"] / frame["margin"])
        elif margin:
            frame = frame.assign(loss_margin_ratio=frame["loss"] / margin)
    return frame


@dataclass
class _Cached:
    generation: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    metrics: pd.DataFrame | None = None
    events: pd.DataFrame | None = None
    snapshot_steps: tuple[int, ...] = ()
    refreshed: float = -math.inf
    lock: threading.Lock = field(default_factory=threading.Lock)


class RunCache:
    """Cached, incremental, read-only access to the runs under one log directory.

    * The run list (every run's summary) is re-read at most every ``list_ttl`` seconds.
    * Each run's rows are kept in memory; a refresh asks the store only for rows after the
      last step seen (``metrics(since_step=...)``) and events after the last id seen, and
      happens at most every ``min_refresh`` seconds however many callbacks ask.
    * Readers are opened per refresh and closed again: Flask serves callbacks from several
      threads and a SQLite connection belongs to the thread that opened it.

    Thread-safe. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        logdir: str | Path,
        *,
        list_ttl: float = 1.0,
        min_refresh: float = 0.25,
        max_runs: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logdir = Path(logdir)
        self.list_ttl = list_ttl
        self.min_refresh = min_refresh
        self.max_runs = max_runs
        self._clock = clock
        self._lock = threading.Lock()
        self._listing: RunListing | None = None
        self._listed_at = -math.inf
        self._runs: OrderedDict[Path, _Cached] = OrderedDict()
        self._projections: OrderedDict[tuple, Projection] = OrderedDict()
        self._bases: dict[Path, tuple[tuple, _Basis]] = {}

    # -- run list ------------------------------------------------------------------------

    def run_list(self, *, force: bool = False) -> RunListing:
        """Every run file under the log directory with its summary or its error."""
        with self._lock:
            if (
                not force
                and self._listing is not None
                and self._clock() - self._listed_at < self.list_ttl
            ):
                return self._listing
        listing = self._read_listing()
        with self._lock:
            self._listing, self._listed_at = listing, self._clock()
            # Forget runs whose file went away so the cache does not grow without bound.
            present = {(self.logdir / e.run_id).resolve() for e in listing.entries}
            for path in [p for p in self._runs if p not in present]:
                del self._runs[path]
                self._bases.pop(path, None)
        return listing

    def _read_listing(self) -> RunListing:
        try:
            paths = list_runs(self.logdir)
        except OSError as error:
            return RunListing((), f"cannot list {str(self.logdir)!r}: {error}")
        entries = []
        for path in paths:
            run_id = run_id_of(self.logdir, path)
            try:
                resolve_run_id(self.logdir, run_id)
                with RunReader(path) as reader, reader.consistent():
                    summary = reader.summary()
                    # Events are few; reading them here gives banners their onset and
                    # evidence without loading the metrics of a run nobody is plotting.
                    alert = current_alert(reader.events()) if summary.state != "healthy" else None
                    entries.append(RunEntry(run_id, summary=summary, alert=alert))
            # A broken file must become an error card, never take the app down: reading a
            # corrupt file can fail in sqlite, in JSON decoding of metadata, or in the OS.
            except Exception as error:
                entries.append(RunEntry(run_id, error=_describe(error)))
        return RunListing(tuple(sorted(entries, key=lambda e: e.run_id)))

    # -- one run -------------------------------------------------------------------------

    def view(self, run_id: str) -> RunView:
        """The run's rows as of now, fetching only what is new since the last refresh.

        Raises:
            InvalidRunIdError: the id does not name a run file in the log directory.
            RunFileError: the file is missing, corrupt or not a collapsewatch run.
        """
        path = resolve_run_id(self.logdir, run_id)
        with self._lock:
            cached = self._runs.get(path)
            if cached is None:
                cached = self._runs[path] = _Cached()
            self._runs.move_to_end(path)
            while len(self._runs) > self.max_runs:
                self._runs.popitem(last=False)
        with cached.lock:
            if self._clock() - cached.refreshed >= self.min_refresh or cached.metrics is None:
                try:
                    self._refresh(path, cached)
                except RunFileError:
                    raise
                except Exception as error:
                    raise RunFileError(f"{run_id}: {_describe(error)}") from error
                cached.refreshed = self._clock()
            assert cached.metrics is not None and cached.events is not None
            return RunView(
                run_id=run_id,
                path=path,
                name=str(cached.metadata.get("name", path.stem)),
                generation=cached.generation,
                metadata=cached.metadata,
                metrics=cached.metrics,
                events=cached.events,
                snapshot_steps=cached.snapshot_steps,
            )

    def _refresh(self, path: Path, cached: _Cached) -> None:
        with RunReader(path) as reader, reader.consistent():
            metadata = reader.metadata()
            generation = metadata.get("created")
            columns = tuple(reader.metric_columns())
            incremental = (
                cached.metrics is not None
                and cached.events is not None
                and generation == cached.generation
                and columns == cached.columns
            )
            if incremental:
                last = int(cached.metrics["step"].iloc[-1]) if len(cached.metrics) else None
                new = reader.metrics(since_step=last)
                last_id = int(cached.events["id"].iloc[-1]) if len(cached.events) else None
                new_events = reader.events(since_id=last_id)
            else:  # first read, a replaced file, or a column added mid-run: read it all
                new, new_events = reader.metrics(), reader.events()
            snapshot_steps = tuple(reader.snapshot_steps())
        margin = metadata.get("margin")
        new = _with_derived(new, margin if isinstance(margin, int | float) else None)
        if incremental and cached.metrics is not None and cached.events is not None:
            if len(new):
                cached.metrics = pd.concat([cached.metrics, new], ignore_index=True)
            if len(new_events):
                cached.events = pd.concat([cached.events, new_events], ignore_index=True)
        else:
            cached.metrics, cached.events = new.reset_index(drop=True), new_events
        cached.generation, cached.metadata, cached.columns = generation, metadata, columns
        cached.snapshot_steps = snapshot_steps

    # -- projections ---------------------------------------------------------------------

    def projection(self, run_id: str, step: int, method: str = "pca") -> Projection:
        """A 2-D projection of the run's embedding snapshot at ``step``, cached.

        ``method`` "pca" centres each snapshot on its own mean and projects it onto one PCA
        basis fitted to (up to 20 of) the run's snapshots, with axes fixed across steps, so a
        collapsing run's points visibly shrink onto one spot; "tsne" runs t-SNE on this
        snapshot alone (slow; only on request).
        """
        if method not in ("pca", "tsne"):
            raise ValueError(f"unknown projection method {method!r}")
        view = self.view(run_id)
        if step not in view.snapshot_steps:
            raise KeyError(f"run {view.name!r} has no snapshot at step {step}")
        fit_steps = _fit_steps(view.snapshot_steps)
        key = (view.path, view.generation, int(step), method)
        if method == "pca":
            key += (fit_steps,)
        with self._lock:
            if key in self._projections:
                self._projections.move_to_end(key)
                return self._projections[key]
        with RunReader(view.path) as reader:
            snapshot = reader.snapshot(step)
            first = reader.snapshot(view.snapshot_steps[0])
            if method == "pca":
                basis = self._basis(view, fit_steps, reader)
                projection = _project_pca(snapshot, basis, first)
            else:
                projection = _project_tsne(snapshot, first)
        with self._lock:
            self._projections[key] = projection
            while len(self._projections) > 256:
                self._projections.popitem(last=False)
        return projection

    def _basis(self, view: RunView, fit_steps: tuple[int, ...], reader: RunReader) -> _Basis:
        with self._lock:
            known = self._bases.get(view.path)
            if known is not None and known[0] == (view.generation, fit_steps):
                return known[1]
        basis = _fit_basis([reader.snapshot(s) for s in fit_steps])
        with self._lock:
            self._bases[view.path] = ((view.generation, fit_steps), basis)
        return basis


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


# ---------------------------------------------------------------------------------------
# Decimation
# ---------------------------------------------------------------------------------------


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
    keep = [np.array([0, n - 1])]
    for column in values.T:
        finite = np.isfinite(column)
        for sign in (1.0, -1.0):
            key = np.where(finite, sign * column, np.inf)
            order = np.lexsort((key, bucket))  # by bucket, then value: firsts are the extremes
            ordered = bucket[order]
            first = order[np.r_[True, ordered[1:] != ordered[:-1]]]
            keep.append(first[finite[first]])
    if exact is not None:
        keep.append(np.flatnonzero(exact))
    return np.unique(np.concatenate(keep))


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


# ---------------------------------------------------------------------------------------
# Embedding projections
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """2-D coordinates of (a sample of) one snapshot, ready to plot."""

    step: int
    method: str
    xy: np.ndarray  # (m, 2)
    labels: np.ndarray | None  # (m,)
    n_points: int  # points in the snapshot (m ≤ n_points are shown)
    radius: float  # RMS distance to the centroid, in the original embedding space
    reference_radius: float  # the same for the run's first snapshot
    axis_titles: tuple[str, str]
    extent: tuple[tuple[float, float], tuple[float, float]] | None  # fixed axes, or None


@dataclass(frozen=True)
class _Basis:
    mean: np.ndarray
    components: np.ndarray  # (2, D)
    explained: tuple[float, float]
    extent: tuple[tuple[float, float], tuple[float, float]]


def _fit_steps(steps: Sequence[int]) -> tuple[int, ...]:
    if len(steps) <= PCA_FIT_SNAPSHOTS:
        return tuple(steps)
    picks = np.linspace(0, len(steps) - 1, PCA_FIT_SNAPSHOTS).round().astype(int)
    return tuple(steps[i] for i in np.unique(picks))


def _sample(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    # Fixed seed: the same points are shown at every step of a run, and on every reload.
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def _radius(embeddings: np.ndarray) -> float:
    x = np.asarray(embeddings, dtype=np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    if not len(x):
        return float("nan")
    return float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()))


def _clean(embeddings: np.ndarray) -> np.ndarray:
    # A diverged run stores NaN/inf embeddings; plot them at 0 rather than failing.
    return np.nan_to_num(np.asarray(embeddings, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _centred(embeddings: np.ndarray) -> np.ndarray:
    x = _clean(embeddings)
    return x - x.mean(axis=0) if len(x) else x


def _fit_basis(snapshots: Sequence[Any]) -> _Basis:
    from sklearn.decomposition import PCA

    # Each snapshot is centred on its own mean: a drift of the whole cloud is not collapse,
    # and left in it would take the first component and squash the clusters.
    samples = [
        _centred(s.embeddings)[_sample(len(s.embeddings), PCA_FIT_POINTS)] for s in snapshots
    ]
    stacked = np.concatenate(samples)
    dims = stacked.shape[1]
    components = np.zeros((2, dims))
    explained = [0.0, 0.0]
    mean = stacked.mean(axis=0)
    usable = min(2, dims, len(stacked))
    if usable and np.ptp(stacked, axis=0).max() > 0:
        pca = PCA(n_components=usable, random_state=0).fit(stacked)
        mean = pca.mean_
        for i in range(usable):
            # Deterministic sign (largest loading positive): refits do not flip the picture.
            c = pca.components_[i]
            components[i] = c if c[np.argmax(np.abs(c))] >= 0 else -c
            explained[i] = float(pca.explained_variance_ratio_[i])
    xy = (stacked - mean) @ components.T
    return _Basis(mean, components, (explained[0], explained[1]), _extent(xy))


def _extent(xy: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    half = max(float((hi - lo).max()) / 2 * 1.08, 1e-6)  # square, with a margin
    cx, cy = (lo + hi) / 2
    return ((cx - half, cx + half), (cy - half, cy + half))


def _project_pca(snapshot: Any, basis: _Basis, first: Any) -> Projection:
    pick = _sample(len(snapshot.embeddings), MAX_EMBEDDING_POINTS)
    xy = (_centred(snapshot.embeddings)[pick] - basis.mean) @ basis.components.T
    (x0, x1), (y0, y1) = basis.extent
    # A snapshot outside the fitted extent (the basis predates it) still fits on screen.
    if len(xy):
        x0, y0 = min(x0, xy[:, 0].min()), min(y0, xy[:, 1].min())
        x1, y1 = max(x1, xy[:, 0].max()), max(y1, xy[:, 1].max())
    ex1, ex2 = basis.explained
    return Projection(
        step=snapshot.step,
        method="pca",
        xy=xy,
        labels=None if snapshot.labels is None else snapshot.labels[pick],
        n_points=len(snapshot.embeddings),
        radius=_radius(snapshot.embeddings),
        reference_radius=_radius(first.embeddings),
        axis_titles=(f"PC 1 ({ex1:.0%} of variance)", f"PC 2 ({ex2:.0%} of variance)"),
        extent=((float(x0), float(x1)), (float(y0), float(y1))),
    )


def _project_tsne(snapshot: Any, first: Any) -> Projection:
    from sklearn.manifold import TSNE

    pick = _sample(len(snapshot.embeddings), MAX_TSNE_POINTS)
    x = _clean(snapshot.embeddings)[pick]
    if len(x) >= 4 and np.ptp(x, axis=0).max() > 0:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        xy = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=0, max_iter=500
        ).fit_transform(x)
    else:  # too few or identical points: t-SNE is undefined, every point is one spot
        xy = np.zeros((len(x), 2))
    return Projection(
        step=snapshot.step,
        method="tsne",
        xy=xy,
        labels=None if snapshot.labels is None else snapshot.labels[pick],
        n_points=len(snapshot.embeddings),
        radius=_radius(snapshot.embeddings),
        reference_radius=_radius(first.embeddings),
        axis_titles=("t-SNE 1", "t-SNE 2"),
        extent=None,
    )
