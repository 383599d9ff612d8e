"""The dashboard's data layer: run ids, the run list, cached incremental reads of each run.

Everything here goes through the store's public API (``list_runs``, ``RunReader``); the
dashboard never touches a run's tables itself and never writes.

Run ids: the browser names a run by its path relative to the log directory, in POSIX form
(``"sweep/lr-0.1.cwrun"``). :func:`resolve_run_id` is the only way such an id becomes a path,
and it rejects anything that would leave the log directory.

Decimation lives in :mod:`.decimate`, embedding projections in :mod:`.projection`.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from collapsewatch.detect import RESCUED, reference_rank
from collapsewatch.states import RunState, display_state
from collapsewatch.store import (
    RUN_SUFFIX,
    RunFileError,
    RunReader,
    RunSummary,
    list_runs,
)

from .projection import Basis, Projection, fit_basis, fit_steps, project_pca, project_tsne

# Longest run id accepted from the browser; real ones are far shorter.
MAX_RUN_ID_LENGTH = 1024

ERROR = "error"  # the run file cannot be read: not a detector state
UI_STATES = (*(s.value for s in RunState), ERROR)


class InvalidRunIdError(ValueError):
    """A run id from the browser that does not name a run file inside the log directory."""


def resolve_run_id(logdir: str | Path, run_id: object) -> Path:
    """The run file that ``run_id`` names inside ``logdir``, or raise :class:`InvalidRunIdError`.

    A valid id is a relative POSIX path ending in ``.cwrun`` whose parts are names a folder
    of runs may have (Hydra's ``lr=0.1,margin=0.2``, spaces, any script) but do not start
    with a dot (so no ``..`` and no hidden folder) or hold a control character, and whose
    resolved path (symlinks followed) is still inside ``logdir``. The file need not exist.
    """
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_RUN_ID_LENGTH:
        raise InvalidRunIdError(f"invalid run id {_shown(run_id)}")
    if "\\" in run_id or "\x00" in run_id or run_id.startswith("/"):
        raise InvalidRunIdError(f"invalid run id {_shown(run_id)}")
    parts = PurePosixPath(run_id).parts
    if not parts[-1].endswith(RUN_SUFFIX):
        raise InvalidRunIdError(f"run id {_shown(run_id)} does not name a {RUN_SUFFIX} file")
    for part in (*parts[:-1], parts[-1][: -len(RUN_SUFFIX)]):
        if not part or part.startswith(".") or any(c < " " or c == "\x7f" for c in part):
            raise InvalidRunIdError(f"invalid run id {_shown(run_id)}")
    root = Path(logdir).resolve()
    path = root.joinpath(*parts).resolve()
    # A symlink may still point elsewhere: the resolved file must live under the root.
    if not path.is_relative_to(root) or path.suffix != RUN_SUFFIX:
        raise InvalidRunIdError(f"run id {_shown(run_id)} points outside the log directory")
    return path


def _shown(run_id: object) -> str:
    # Whatever the browser sent goes back in an error message: keep it short.
    text = repr(run_id)
    return text if len(text) <= 80 else f"{text[:77]}..."


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
    the same state (say a "dimensional_collapse" while collapsed) do not move it.
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


FINAL_COLUMNS = ("loss_margin_ratio", "mean_pairwise_distance")
"""Metric columns whose value at the run's last recorded step the run list keeps."""


@dataclass(frozen=True)
class RunEntry:
    """One line of the run list: a readable run's summary, or why it cannot be read."""

    run_id: str
    summary: RunSummary | None = None
    error: str | None = None
    alert: Alert | None = None  # why the run is in its current warning/collapsed state
    # The first step the detector called it collapsed or diverged (if it is not healthy now
    # or ever collapsed: a divergence since cleared is not looked up).
    onset_step: int | None = None
    final: dict[str, float | None] = field(default_factory=dict)  # FINAL_COLUMNS at last step
    config: dict[str, Any] = field(default_factory=dict)  # what watch(config=...) was given
    generation: Any = None  # the run's "created" metadata: a new run in the same file differs

    @property
    def name(self) -> str:
        if self.summary is not None:
            return self.summary.name
        return PurePosixPath(self.run_id).name.removesuffix(RUN_SUFFIX)

    @property
    def ui_state(self) -> str:
        """A :class:`RunState` value (``display_state``: "recovered" is healthy again after a
        collapse), or "error" for a file that cannot be read."""
        if self.summary is None:
            return ERROR
        state = self.summary.state
        if state not in UI_STATES:
            return RunState.WARNING.value  # a state this version does not know
        return display_state(state, self.summary.ever_collapsed).value


@dataclass(frozen=True)
class RunListing:
    """All runs under the log directory at one moment, sorted by run id.

    ``version`` names the listing's content: a listing read again with nothing changed is
    the same object with the same version, so a poll compares one string, not 1,000 rows.
    Versions are random, so a page kept open across a server restart never matches.
    """

    entries: tuple[RunEntry, ...]
    error: str | None = None  # the log directory itself could not be listed
    version: str = field(default_factory=lambda: secrets.token_hex(8))

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


class Folds:
    """Values folded over a run's rows as they are appended, so a poll pays for new rows.

    :meth:`fold` keeps, per key, the state after the most rows folded so far; the rows of
    one generation of a run only ever grow at the end, so a longer frame of it needs only
    its new rows added. States are never changed in place (``add`` returns a new one), so
    one handed out stays valid. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[Hashable, tuple[int, Any]] = {}

    def fold(
        self,
        key: Hashable,
        frame: pd.DataFrame,
        start: Callable[[], Any],
        add: Callable[[Any, pd.DataFrame, int], Any],
    ) -> Any:
        """``add`` folded over ``frame``'s rows from ``start()``: ``add(state, rows,
        offset)`` gets the rows from row number ``offset`` on. A frame shorter than the
        longest folded (an older view) is folded from the start, and not kept."""
        with self._lock:
            done, state = self._states.get(key, (0, None))
        if state is None or done > len(frame):
            done, state = 0, start()
        if done < len(frame):
            state = add(state, frame.iloc[done:], done)
        with self._lock:
            if len(frame) >= self._states.get(key, (0, None))[0]:
                self._states[key] = (len(frame), state)
        return state


@dataclass(frozen=True)
class RunView:
    """A run as cached at one moment. The frames are shared: treat them as read-only.
    ``folds`` carries what callers fold over these rows to the next view of the run."""

    run_id: str
    path: Path
    name: str
    generation: Any  # changes when the file is replaced by a new run of the same name
    metadata: dict[str, Any]
    metrics: pd.DataFrame  # every row, sorted by step, with derived columns added
    events: pd.DataFrame
    snapshot_steps: tuple[int, ...]
    folds: Folds = field(default_factory=Folds, compare=False)

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
    leaves them ("recovered", "cleared") or at a ``rescued`` event: the training loop put
    the run back to a healthy state there, although the detector, still holding its old
    window, only says "recovered" later. A rescue never opens a span; the next other event
    in one of ``states`` (a new collapse, a ``rescue_failed``) does. One still open has
    ``end=None``.
    """
    wanted = set(states)
    spans: list[Span] = []
    start: int | None = None
    steps, kinds = events.get("step", []), events.get("kind", [None] * len(events))
    for step, kind, state in zip(steps, kinds, events.get("state", []), strict=True):
        inside = state in wanted and kind != RESCUED
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
    if {"num_classes", "embedding_dim", "batch_size"} <= set(frame.columns):
        # What the detector compares the effective rank with, drawn beside it.
        reference = reference_rank(
            frame["num_classes"].to_numpy(dtype=float),
            frame["embedding_dim"].to_numpy(dtype=float),
            frame["batch_size"].to_numpy(dtype=float),
        )
        frame = frame.assign(reference_rank=reference)
    return frame


@dataclass
class _Cached:
    stamp: tuple | None = None  # the file's stamp before the last refresh read it
    generation: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    columns: tuple[str, ...] = ()
    metrics: pd.DataFrame | None = None
    events: pd.DataFrame | None = None
    snapshot_steps: tuple[int, ...] = ()
    folds: Folds = field(default_factory=Folds)  # new with every full read of the rows
    refreshed: float = -math.inf
    lock: threading.Lock = field(default_factory=threading.Lock)


class RunCache:
    """Cached, incremental, read-only access to the runs under one log directory.

    * The run list (every run's summary) is re-read at most every ``list_ttl`` seconds.
    * Each run's rows are kept in memory; a refresh asks the store only for rows after the
      last step seen (``metrics(since_step=...)``) and events after the last id seen, and
      happens at most every ``min_refresh`` seconds however many callbacks ask, and only
      if the file's stamp (size and modification time, its write-ahead log's too) moved.
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
        self._previous: RunListing | None = None  # the listing before self._listing
        self._listed_at = -math.inf
        self._listing_lock = threading.Lock()
        # run id -> (file stamp, entry) as of the last listing: see _read_listing.
        self._entries: dict[str, tuple[tuple | None, RunEntry]] = {}
        self._runs: OrderedDict[Path, _Cached] = OrderedDict()
        self._projections: OrderedDict[tuple, Projection] = OrderedDict()
        self._bases: dict[Path, tuple[tuple, Basis]] = {}

    # -- run list ------------------------------------------------------------------------

    def run_list(self, *, force: bool = False) -> RunListing:
        """Every run file under the log directory with its summary or its error."""
        with self._lock:
            if not force and self._listing is not None and self._listing_is_fresh():
                return self._listing
        # One listing at a time: the callbacks of a poll arrive together, and on a new
        # 200-run sweep each reading every file would multiply the first wait by four.
        with self._listing_lock:
            with self._lock:
                if not force and self._listing is not None and self._listing_is_fresh():
                    return self._listing
            listing = self._read_listing()
        with self._lock:
            changed = listing is not self._listing
            if changed:
                self._previous = self._listing
            self._listing, self._listed_at = listing, self._clock()
            if changed:
                # Forget runs whose file went away so the cache does not grow without bound.
                present = {(self.logdir / e.run_id).resolve() for e in listing.entries}
                for path in [p for p in self._runs if p not in present]:
                    del self._runs[path]
                    self._bases.pop(path, None)
        return listing

    def listing_before(self, version: str | None) -> RunListing | None:
        """The listing just before the current one, if its version is ``version``: what a
        page that polled one listing ago shows (to send it only what changed)."""
        with self._lock:
            previous = self._previous
        return previous if previous is not None and previous.version == version else None

    def _listing_is_fresh(self) -> bool:
        return self._listing is not None and self._clock() - self._listed_at < self.list_ttl

    def _read_listing(self) -> RunListing:
        """Every run's entry; a run whose file (and write-ahead log) has the same size and
        modification time as at the last listing keeps its entry unread, so a poll of a
        finished 200-run sweep costs 400 ``stat`` calls, not 200 opened databases. When no
        file changed, came or went, the last listing itself is returned (same version)."""
        previous = self._listing
        try:
            paths = list_runs(self.logdir)
        except OSError as error:
            message = f"cannot list {str(self.logdir)!r}: {error}"
            if previous is not None and not previous.entries and previous.error == message:
                return previous
            self._entries = {}
            return RunListing((), message)
        entries, stamps, changed = [], {}, previous is None or previous.error is not None
        prefix = f"{self.logdir}{os.sep}"
        for path in paths:
            text = str(path)
            # The id by slicing where the path starts with the logdir as given (run_id_of's
            # pathlib arithmetic, a third of a 1,000-run poll, only where it does not).
            if text.startswith(prefix):
                run_id = text[len(prefix) :].replace(os.sep, "/")
            else:
                run_id = run_id_of(self.logdir, path)
            stamp = _file_stamp(text)
            known = self._entries.get(run_id)
            if stamp is not None and known is not None and known[0] == stamp:
                entry = known[1]
            else:
                earlier = known[1] if known is not None else None
                entry, changed = _read_entry(self.logdir, path, run_id, earlier), True
            entries.append(entry)
            stamps[run_id] = (stamp, entry)
        changed |= stamps.keys() != self._entries.keys()
        self._entries = stamps  # only runs still present: the cache cannot outgrow the logdir
        if not changed and previous is not None:
            return previous
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
                # A finished run's file is not opened again: a refresh of one that has not
                # changed still costs 50 ms of opening and empty reads, per run and callback.
                stamp = _file_stamp(str(path))
                if cached.metrics is None or stamp is None or stamp != cached.stamp:
                    try:
                        self._refresh(path, cached)
                    except RunFileError:
                        raise
                    except Exception as error:
                        raise RunFileError(f"{run_id}: {_describe(error)}") from error
                    cached.stamp = stamp
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
                folds=cached.folds,
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
                new = _rows_after(reader, _last(cached.metrics, "step"))
                new_events = reader.events(since_id=_last(cached.events, "id"))
            else:  # first read, a replaced file, or a column added mid-run: read it all
                new, new_events = _rows_after(reader, None), reader.events()
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
            cached.folds = Folds()  # other rows, or other columns: fold them afresh
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
        chosen = fit_steps(view.snapshot_steps)
        key: tuple[Any, ...] = (view.path, view.generation, int(step), method)
        if method == "pca":
            key += (chosen,)
        with self._lock:
            if key in self._projections:
                self._projections.move_to_end(key)
                return self._projections[key]
        with RunReader(view.path) as reader:
            snapshot = reader.snapshot(step)
            first = reader.snapshot(view.snapshot_steps[0])
            if method == "pca":
                basis = self._basis(view, chosen, reader)
                projection = project_pca(snapshot, basis, first)
            else:
                projection = project_tsne(snapshot, first)
        with self._lock:
            self._projections[key] = projection
            while len(self._projections) > 256:
                self._projections.popitem(last=False)
        return projection

    def _basis(self, view: RunView, steps: tuple[int, ...], reader: RunReader) -> Basis:
        with self._lock:
            known = self._bases.get(view.path)
            if known is not None and known[0] == (view.generation, steps):
                return known[1]
        basis = fit_basis([reader.snapshot(s) for s in steps])
        with self._lock:
            self._bases[view.path] = ((view.generation, steps), basis)
        return basis


SETTLE_SECONDS = 1.0
"""How long after its last write a file's stamp is trusted to change with the next write:
file times move only with the kernel's clock tick, and a write-ahead log reused after a
checkpoint keeps its size, so two commits within one tick can leave the same stamp."""


READ_CHUNK = 100_000
"""Rows per query when reading a run: a 1,000,000-row run read in one query takes 10 s on an
idle 2-core machine and more than the store's 30 s query limit on a busy one."""


def _rows_after(reader: RunReader, step: int | None) -> pd.DataFrame:
    """The metric rows after ``step`` (all for None), read :data:`READ_CHUNK` at a time."""
    chunks = [reader.metrics(since_step=step, limit=READ_CHUNK)]
    while len(chunks[-1]) == READ_CHUNK:
        step = int(chunks[-1]["step"].iloc[-1])
        chunks.append(reader.metrics(since_step=step, limit=READ_CHUNK))
    return chunks[0] if len(chunks) == 1 else pd.concat(chunks, ignore_index=True)


def _last(frame: pd.DataFrame | None, column: str) -> int | None:
    """The last row's value of an integer column; None for no frame or an empty one."""
    return int(frame[column].iloc[-1]) if frame is not None and len(frame) else None


def _file_stamp(path: str) -> tuple | None:
    """(size, mtime) of the run file and of its write-ahead log, which a live writer in WAL
    mode appends to without touching the main file; None, "read it again next time", if
    the file cannot be stat'ed or was written less than :data:`SETTLE_SECONDS` ago. Take
    it before reading the file: a write after the stamp then changes the next one."""
    try:
        main = os.stat(path)
    except OSError:
        return None
    newest = main.st_mtime_ns
    try:
        wal = os.stat(f"{path}-wal")
        wal_stamp: tuple | None = (wal.st_size, wal.st_mtime_ns)
        newest = max(newest, wal.st_mtime_ns)
    except OSError:
        wal_stamp = None
    if time.time_ns() - newest < SETTLE_SECONDS * 1e9:
        return None
    return (main.st_size, main.st_mtime_ns, wal_stamp)


def _read_entry(logdir: Path, path: Path, run_id: str, earlier: RunEntry | None = None) -> RunEntry:
    """The run list's entry for one run file, read through the store's reader; given the
    ``earlier`` entry of the same run (a growing one), only its new rows are counted."""
    try:
        resolve_run_id(logdir, run_id)
        with RunReader(path) as reader, reader.consistent():
            metadata = reader.metadata()
            generation = metadata.get("created")
            previous = None
            if earlier is not None and generation is not None and earlier.generation == generation:
                previous = earlier.summary
            summary = reader.summary(previous)
            # Events are few; reading them here gives banners their onset and evidence
            # without loading the metrics of a run nobody is plotting.
            alert, onset = None, None
            if summary.state != "healthy" or summary.ever_collapsed:
                # Reading events costs more than the rest (a DataFrame): a healthy run that
                # never collapsed, most of a sweep, has no onset or alert to show anyway.
                events = reader.events()
                alert = current_alert(events) if summary.state != "healthy" else None
                failed = events[events["state"].isin(("collapsed", "diverged"))]
                onset = int(failed["step"].iloc[0]) if len(failed) else None
            final = _final_values(reader, summary)
            config = metadata.get("config")
        return RunEntry(
            run_id,
            summary=summary,
            alert=alert,
            onset_step=onset,
            final=final,
            config=config if isinstance(config, dict) else {},
            generation=generation,
        )
    # A broken file must become an error card, never take the app down: reading a corrupt
    # file can fail in sqlite, in JSON decoding of metadata, or in the OS.
    except Exception as error:
        return RunEntry(run_id, error=_describe(error))


def _final_values(reader: RunReader, summary: RunSummary) -> dict[str, float | None]:
    """:data:`FINAL_COLUMNS` at the last recorded step (one row read); NaN reads as None."""
    final: dict[str, float | None] = dict.fromkeys(FINAL_COLUMNS)
    if summary.last_step is None:
        return final
    present = [c for c in FINAL_COLUMNS if c in reader.metric_columns()]
    if present:
        row = reader.metrics(since_step=summary.last_step - 1, columns=present)
        for column in present:
            value = float(row[column].iloc[-1]) if len(row) else math.nan
            final[column] = value if math.isfinite(value) else None
    if final["loss_margin_ratio"] is None and summary.last_loss is not None and summary.margin:
        # Older or foreign runs without the ratio column: derive it as the panels do.
        ratio = summary.last_loss / summary.margin
        final["loss_margin_ratio"] = ratio if math.isfinite(ratio) else None
    return final


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
