"""The run store: one training run is one SQLite database file, ``<logdir>/<run>.cwrun``.

The file holds the run's metadata, one row of metrics per recorded step, the detector's
events and embedding snapshots (raw little-endian bytes with dtype and shape; nothing is
ever pickled). It is written by :class:`RunWriter` and read by :class:`RunReader`, which
opens it read-only, so the CLI and the dashboard can read a run that training is still
writing.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``; a commit survives a
crash or ``kill -9`` of the writing process (not a power cut), so a killed run loses at most
what was written since its last commit and opens cleanly. SQLite's WAL needs a local file
system: do not put a log directory on NFS or another network file system.

Threads: a writer must be used by one thread at a time (``watch()`` gives it to its
background thread); a reader likewise. Any number of readers, in any processes, may read
while one writer writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from collapsewatch._version import __version__

RUN_SUFFIX = ".cwrun"
APPLICATION_ID = 0x43575231  # "CWR1": marks a SQLite file as a collapsewatch run
SCHEMA_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_COLUMN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SNAPSHOT_KINDS = frozenset("fiub")  # numeric dtypes only: nothing that could need pickle

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE metrics (step INTEGER PRIMARY KEY, time REAL NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    step INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT NOT NULL,
    suggestion TEXT NOT NULL,
    evidence TEXT NOT NULL
);
CREATE TABLE snapshots (
    step INTEGER PRIMARY KEY,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    embeddings BLOB NOT NULL,
    labels_dtype TEXT,
    labels BLOB
);
"""


class RunFileError(ValueError):
    """A path that is not a readable collapsewatch run (missing, corrupt, or another file)."""


def check_run_name(name: str) -> str:
    """Return ``name`` if it can name a run file (letters, digits, ``._-``), else raise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"run name must be 1-200 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit; got {name!r}"
        )
    return name


def run_path(logdir: str | Path, name: str) -> Path:
    """The file of run ``name`` in ``logdir``."""
    return Path(logdir) / f"{check_run_name(name)}{RUN_SUFFIX}"


def list_runs(logdir: str | Path) -> list[Path]:
    """Paths of the run files under ``logdir`` (searched recursively), sorted.

    Every ``*.cwrun`` file is listed, readable or not, so that a broken run shows up as
    broken instead of silently disappearing; open it to find out.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"log directory {str(root)!r} does not exist")
    return sorted(p for p in root.rglob(f"*{RUN_SUFFIX}") if p.is_file())


@dataclass(frozen=True)
class Event:
    """One detector transition or warning, as stored in a run's events.

    ``state`` is the run's state after the event ("healthy", "warning", "collapsed");
    ``evidence`` holds the values that triggered it (JSON-serialisable).
    """

    step: int
    kind: str
    state: str
    message: str
    suggestion: str = ""
    evidence: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Snapshot:
    """A sample of one step's embeddings, (n, D), with their labels (n,) or None."""

    step: int
    embeddings: np.ndarray
    labels: np.ndarray | None


def _json_value(value: Any) -> Any:
    # NaN and inf are not JSON; store them as null rather than writing invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_value(value.item())
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_json_value(value), allow_nan=False, default=str, sort_keys=True)


def _array_to_blob(array: np.ndarray) -> tuple[str, str, bytes]:
    array = np.ascontiguousarray(array)
    if array.dtype.kind not in _SNAPSHOT_KINDS:
        raise ValueError(f"snapshots hold numeric arrays only, got dtype {array.dtype}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return little.dtype.str, json.dumps(list(array.shape)), little.tobytes()


def _blob_to_array(dtype: str, shape: str, blob: bytes) -> np.ndarray:
    parsed = np.dtype(dtype)
    if parsed.kind not in _SNAPSHOT_KINDS:
        raise RunFileError(f"snapshot has unsupported dtype {dtype!r}")
    return np.frombuffer(blob, dtype=parsed).reshape(json.loads(shape)).copy()


class RunWriter:
    """Creates a run file and appends to it. Nothing is durable until :meth:`commit`.

    Args:
        path: the ``.cwrun`` file to create; it must not exist unless ``resume``.
        metadata: JSON-serialisable run metadata (config, model and loss class, margin, …).
        resume: append to the existing run at ``path`` (its metadata updated, its rows kept).
    """

    def __init__(
        self, path: str | Path, metadata: Mapping[str, Any], *, resume: bool = False
    ) -> None:
        self.path = Path(path)
        if self.path.suffix != RUN_SUFFIX:
            raise ValueError(f"a run file must end in {RUN_SUFFIX}, got {str(self.path)!r}")
        if resume:
            # Opening it read-only first checks that it is a collapsewatch run.
            with RunReader(self.path) as reader:
                columns = reader.metric_columns()
                resumed = reader.metadata().get("resumed", [])
            self._db = self._connect()
            self._columns = columns
            self.set_metadata({**metadata, "status": "running", "resumed": [*resumed, time.time()]})
            self.commit()
            return
        if self.path.exists():
            raise FileExistsError(f"run file {str(self.path)!r} already exists")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = self._connect()
        # Marker, schema and metadata in one transaction: no reader sees a half-made run.
        self._db.executescript(
            f"BEGIN; PRAGMA application_id={APPLICATION_ID}; "
            f"PRAGMA user_version={SCHEMA_VERSION}; {_SCHEMA}"
        )
        self._columns = ["step", "time"]
        base = {
            "name": self.path.name[: -len(RUN_SUFFIX)],
            "created": time.time(),
            "collapsewatch_version": __version__,
            "status": "running",
        }
        self.set_metadata({**base, **metadata})
        self.commit()

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are ours, so a batch of steps is one commit.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def set_metadata(self, values: Mapping[str, Any]) -> None:
        """Insert or replace metadata keys."""
        self._begin()
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(str(k), _dumps(v)) for k, v in values.items()],
        )

    def append_metrics(self, frame: pd.DataFrame | Mapping[str, np.ndarray]) -> None:
        """Append rows of metrics: a DataFrame, or a mapping of column name to (S,) array;
        they need ``step`` and ``time`` columns.

        Metrics are append-only: a step that is already stored raises
        ``sqlite3.IntegrityError`` (readers poll with ``since_step`` and rely on old rows
        never changing). A column the table does not have yet is added (names: lowercase,
        digits, ``_``). NaN is stored as NULL and read back as NaN.
        """
        # The live writer passes plain arrays: building a DataFrame per commit costs more
        # than the insert, on a thread that shares the interpreter with training.
        arrays = {str(c): np.asarray(v) for c, v in frame.items()}
        missing = {"step", "time"} - set(arrays)
        if missing:
            raise ValueError(f"metrics need columns {sorted(missing)}")
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) > 1:
            raise ValueError(f"metric columns differ in length: {sorted(lengths)}")
        self._begin()
        integer = {c for c, v in arrays.items() if np.issubdtype(v.dtype, np.integer)}
        for column in arrays:
            if column not in self._columns:
                if not _COLUMN.fullmatch(column):
                    raise ValueError(f"invalid metric column name {column!r}")
                kind = "INTEGER" if column in integer else "REAL"
                self._db.execute(f"ALTER TABLE metrics ADD COLUMN {column} {kind}")
                self._columns.append(column)
        names = list(arrays)
        # Plain Python values for sqlite3; SQLite stores a NaN double as NULL.
        columns = [arrays[c].astype("int64" if c in integer else "float64").tolist() for c in names]
        placeholders = ", ".join("?" * len(names))
        self._db.executemany(
            f"INSERT INTO metrics ({', '.join(names)}) VALUES ({placeholders})",
            zip(*columns, strict=True),
        )

    def append_events(self, events: Iterable[Event]) -> None:
        """Append detector events."""
        self._begin()
        self._db.executemany(
            "INSERT INTO events (step, time, kind, state, message, suggestion, evidence) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (e.step, e.time, e.kind, e.state, e.message, e.suggestion, _dumps(e.evidence))
                for e in events
            ],
        )

    def add_snapshot(self, step: int, embeddings: np.ndarray, labels: np.ndarray | None) -> None:
        """Store a (n, D) sample of step ``step``'s embeddings and their (n,) labels."""
        if embeddings.ndim != 2:
            raise ValueError(f"snapshot embeddings must be 2-D, got shape {embeddings.shape}")
        dtype, shape, blob = _array_to_blob(embeddings)
        labels_dtype, labels_blob = None, None
        if labels is not None:
            labels_dtype, _, labels_blob = _array_to_blob(labels.reshape(-1))
        self._begin()
        self._db.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
            (int(step), dtype, shape, blob, labels_dtype, labels_blob),
        )

    def commit(self) -> None:
        """Make everything appended so far durable and visible to readers."""
        if self._db.in_transaction:
            self._db.execute("COMMIT")

    def close(self, status: str = "finished") -> None:
        """Record the final ``status``, commit, and fold the WAL back into the file."""
        if self._db is None:
            return
        self.set_metadata({"status": status, "finished": time.time()})
        self.commit()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # A finished run becomes one self-contained file again, which read-only openers
        # can read without creating -wal/-shm files beside it. If a reader has it open
        # right now the switch is refused; the run then simply stays in WAL mode.
        self._db.execute("PRAGMA busy_timeout=200")
        with contextlib.suppress(sqlite3.OperationalError):
            self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.close()
        self._db = None

    def _begin(self) -> None:
        if self._db is None:
            raise RuntimeError(f"run writer for {str(self.path)!r} is closed")
        if not self._db.in_transaction:
            self._db.execute("BEGIN")


@dataclass(frozen=True)
class RunSummary:
    """What a run list shows, read cheaply (no full metrics read)."""

    path: Path
    name: str
    status: str
    state: str
    num_steps: int
    last_step: int | None
    last_time: float | None
    last_loss: float | None
    margin: float | None
    ever_collapsed: bool


class RunReader:
    """Read-only access to one run file; safe while another process is writing it.

    Every read returns fresh data (a new DataFrame or dict), never a live view.

    Raises:
        RunFileError: the path is missing, not a SQLite file, or not a collapsewatch run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RunFileError(f"{str(self.path)!r}: no such run file")
        try:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
            application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise RunFileError(f"{str(self.path)!r} is not a collapsewatch run ({error})") from None
        if application_id != APPLICATION_ID:
            self._db.close()
            raise RunFileError(
                f"{str(self.path)!r} is a SQLite database but not a collapsewatch run"
            )
        if version > SCHEMA_VERSION:
            self._db.close()
            raise RunFileError(
                f"{str(self.path)!r} was written by a newer collapsewatch (schema {version}); "
                "upgrade collapsewatch to read it"
            )

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def consistent(self) -> Iterator[RunReader]:
        """Reads inside this block all see the run as of one moment (one read transaction)."""
        self._query("BEGIN")
        try:
            yield self
        finally:
            self._query("COMMIT")

    def _query(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.DatabaseError as error:
            raise RunFileError(f"{str(self.path)!r}: cannot read run ({error})") from None

    @property
    def name(self) -> str:
        return self.path.name[: -len(RUN_SUFFIX)]

    def metadata(self) -> dict[str, Any]:
        """All metadata keys with their (JSON-decoded) values."""
        return {key: json.loads(value) for key, value in self._query("SELECT * FROM meta")}

    def metric_columns(self) -> list[str]:
        """Names of the metrics table's columns, ``step`` and ``time`` first."""
        return [row[1] for row in self._query("PRAGMA table_info(metrics)")]

    def metrics(
        self,
        since_step: int | None = None,
        columns: Sequence[str] | None = None,
        until_step: int | None = None,
    ) -> pd.DataFrame:
        """Metric rows with since_step < step ≤ until_step (both optional), by step.

        Args:
            since_step: only rows after this step (for polling: pass the last step seen).
            columns: the columns to read (``step`` is always included); default all.
            until_step: only rows up to this step.
        """
        declared = {row[1]: row[2] for row in self._query("PRAGMA table_info(metrics)")}
        available = list(declared)
        wanted = list(available if columns is None else dict.fromkeys(["step", *columns]))
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise KeyError(f"unknown metric columns {unknown}; this run has {available}")
        where, parameters = [], []
        if since_step is not None:
            where.append("step > ?")
            parameters.append(int(since_step))
        if until_step is not None:
            where.append("step <= ?")
            parameters.append(int(until_step))
        sql = f"SELECT {', '.join(wanted)} FROM metrics"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY step", parameters)
        frame = pd.DataFrame.from_records(rows, columns=wanted)
        for column in wanted:
            if declared[column] != "INTEGER":
                frame[column] = frame[column].astype("float64")
            else:  # integer counts come back as integers (nullable only if a value is missing)
                values = frame[column]
                frame[column] = values.astype("Int64" if values.isna().any() else "int64")
        return frame

    def events(self, since_id: int | None = None) -> pd.DataFrame:
        """Events in order, columns id, step, time, kind, state, message, suggestion,
        evidence (a dict)."""
        rows = self._query(
            "SELECT id, step, time, kind, state, message, suggestion, evidence FROM events "
            "WHERE id > ? ORDER BY id",
            (-1 if since_id is None else int(since_id),),
        )
        columns = ["id", "step", "time", "kind", "state", "message", "suggestion", "evidence"]
        frame = pd.DataFrame.from_records(rows, columns=columns)
        frame["evidence"] = [json.loads(e) for e in frame["evidence"]]
        return frame.astype({"id": "int64", "step": "int64", "time": "float64"})

    def snapshot_steps(self) -> list[int]:
        """Steps that have an embedding snapshot, ascending."""
        return [row[0] for row in self._query("SELECT step FROM snapshots ORDER BY step")]

    def snapshot(self, step: int) -> Snapshot:
        """The embedding snapshot of ``step`` (``KeyError`` if there is none)."""
        rows = self._query("SELECT * FROM snapshots WHERE step = ?", (int(step),))
        if not rows:
            raise KeyError(f"run {self.name!r} has no snapshot at step {step}")
        _, dtype, shape, blob, labels_dtype, labels_blob = rows[0]
        labels = None
        if labels_blob is not None:
            labels = _blob_to_array(labels_dtype, "[-1]", labels_blob)
        return Snapshot(int(step), _blob_to_array(dtype, shape, blob), labels)

    def summary(self) -> RunSummary:
        """Counts, last values and the detector's current state, without reading all rows."""
        meta = self.metadata()
        count, last_step = self._query("SELECT COUNT(*), MAX(step) FROM metrics")[0]
        last_time = last_loss = None
        if last_step is not None:
            columns = self.metric_columns()
            loss = "loss" if "loss" in columns else "NULL"
            last_time, last_loss = self._query(
                f"SELECT time, {loss} FROM metrics WHERE step = ?", (last_step,)
            )[0]
        states = self._query("SELECT state FROM events ORDER BY id DESC LIMIT 1")
        collapsed = self._query("SELECT 1 FROM events WHERE state = 'collapsed' LIMIT 1")
        return RunSummary(
            path=self.path,
            name=self.name,
            status=str(meta.get("status", "unknown")),
            # A run that never recorded a step has not been judged: "empty", not "healthy".
            state=states[0][0] if states else ("healthy" if count else "empty"),
            num_steps=int(count),
            last_step=last_step,
            last_time=last_time,
            last_loss=last_loss,
            margin=meta.get("margin"),
            ever_collapsed=bool(collapsed),
        )


@dataclass(frozen=True)
class Run:
    """A run as read at one moment: metadata, metrics (one row per recorded step), events.

    ``metrics`` and ``events`` are fresh DataFrames owned by the caller. Snapshots are read
    on demand with :meth:`snapshot`.
    """

    path: Path
    metadata: Mapping[str, Any]
    metrics: pd.DataFrame
    events: pd.DataFrame
    snapshot_steps: tuple[int, ...]

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.path.stem))

    def snapshot(self, step: int) -> Snapshot:
        with RunReader(self.path) as reader:
            return reader.snapshot(step)


def load_run(path: str | Path) -> Run:
    """Read a whole run (it may still be being written).

    Raises:
        RunFileError: the path is missing, corrupt, or not a collapsewatch run.
    """
    with RunReader(path) as reader, reader.consistent():
        return Run(
            path=reader.path,
            metadata=MappingProxyType(reader.metadata()),
            metrics=reader.metrics(),
            events=reader.events(),
            snapshot_steps=tuple(reader.snapshot_steps()),
        )


def iter_readable_runs(logdir: str | Path) -> Iterator[tuple[Path, RunReader | RunFileError]]:
    """Each run file under ``logdir`` with an open reader, or the error that opening raised."""
    for path in list_runs(logdir):
        try:
            yield path, RunReader(path)
        except RunFileError as error:
            yield path, error
