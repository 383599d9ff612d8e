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

Untrusted files: run files are shared between people, so a reader treats one as data. It
opens it read-only with ``trusted_schema`` off, checks that the four tables are tables,
names only columns it validated (quoted), stops any query that runs past
:data:`QUERY_TIME_LIMIT`, and reads a malformed value (bad JSON, text in a metric column) as
NaN/None with one :class:`RunFileWarning` per reader and problem, never a traceback.

Storage faults: a failed write raises :class:`RunStorageError` (an ``OSError``) naming the
path and the cause (disk full, read-only file system, permission denied); a run is created
in a hidden draft beside it and linked into place, so a failed start leaves nothing that
takes the name and two processes racing on one name get one run and one ``FileExistsError``.

Threads: a writer must be used by one thread at a time (``watch()`` gives it to its
background thread); a reader likewise. Any number of readers, in any processes, may read
while one writer writes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import sqlite3
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd

from collapsewatch._version import __version__
from collapsewatch.states import RunState

RUN_SUFFIX = ".cwrun"
APPLICATION_ID = 0x43575231  # "CWR1": marks a SQLite file as a collapsewatch run
SCHEMA_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_COLUMN = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SNAPSHOT_KINDS = frozenset("fiub")  # numeric dtypes only: nothing that could need pickle
_TABLES = ("meta", "metrics", "events", "snapshots")
_EVENT_COLUMNS = ("id", "step", "time", "kind", "state", "message", "suggestion", "evidence")
QUERY_TIME_LIMIT = 30.0
"""Seconds one read of a run file may take before it is stopped (a crafted file's views or
CTEs must not spin a reader; a real 1,000,000-row read takes a few seconds)."""

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


class RunFileWarning(UserWarning):
    """Part of a run file could not be read (ill-named columns, malformed values); it was
    skipped or read as NaN/None."""


class RunStorageError(OSError):
    """A run file could not be written: the message names the path and the ``cause``
    ("the disk is full", "the file system is read-only", "permission denied", …)."""

    def __init__(self, message: str, *, cause: str, code: int | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.errno = code


def _storage_error(path: Path, error: BaseException, doing: str) -> RunStorageError:
    """``error`` from writing ``path`` as a :class:`RunStorageError` that says why."""
    cause = _storage_cause(path, error)
    return RunStorageError(
        f"cannot {doing} run file {str(path)!r}: {cause} ({error})",
        cause=cause,
        code=getattr(error, "errno", None),
    )


def _storage_cause(path: Path, error: BaseException) -> str:
    # SQLite reports most faults as text ("database or disk is full", "unable to open
    # database file", "attempt to write a readonly database"): ask the file system instead.
    code = getattr(error, "errno", None)
    if code == errno.ENOSPC or "full" in str(error).lower():
        return "the disk is full"
    directory = path if path.is_dir() else path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        status = os.statvfs(directory)
    except OSError:
        status = None
    if code == errno.EROFS or (status is not None and status.f_flag & os.ST_RDONLY):
        return "the file system is read-only"
    if code in (errno.EACCES, errno.EPERM) or not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    if status is not None and status.f_bavail == 0:
        return "the disk is full"
    return "the write failed"


def check_run_name(name: str) -> str:
    """Return ``name`` if it can name a run file (letters, digits, ``._-``), else raise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"run name must be 1-200 characters of letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit; got {name!r}"
        )
    return name


def run_path(logdir: str | os.PathLike[str], name: str) -> Path:
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
    # os.walk, not rglob: a dashboard lists a 1,000-run sweep on every poll, and rglob's
    # Path objects and their comparisons cost 4× the walk. Like rglob, it does not descend
    # into symlinked folders; a listed name is kept if it is (or links to) a file.
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(RUN_SUFFIX) and os.path.isfile(path):
                found.append((Path(path).parts, path))
    return [Path(path) for _, path in sorted(found)]


@dataclass(frozen=True)
class Event:
    """One detector transition or warning, as stored in a run's events.

    ``state`` is the run's state after the event (a ``RunState`` value: "healthy",
    "warning", "collapsed", "diverged");
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


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON can hold it: NaN and ±inf become None (null), NumPy scalars
    Python ones, mappings dicts with string keys, tuples lists; through any nesting. The
    one NaN → None rule of the run file, the CLI's ``--json`` and the detector's evidence."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    return json.dumps(json_safe(value), allow_nan=False, default=str, sort_keys=True)


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

    Raises:
        FileExistsError: ``path`` exists (without ``resume``), or another process created it
            first.
        RunStorageError: the file cannot be written (disk full, read-only, permission).
    """

    def __init__(
        self, path: str | Path, metadata: Mapping[str, Any], *, resume: bool = False
    ) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        if self.path.suffix != RUN_SUFFIX:
            raise ValueError(f"a run file must end in {RUN_SUFFIX}, got {str(self.path)!r}")
        if resume:
            # Opening it read-only first checks that it is a collapsewatch run.
            with RunReader(self.path) as reader:
                columns = reader.metric_columns()
                resumed = reader.metadata().get("resumed", [])
            self._db = self._connect(self.path)
            self._columns = columns
            with self.transaction():
                self.set_metadata(
                    {**metadata, "status": "running", "resumed": [*resumed, time.time()]}
                )
            return
        if self.path.exists():
            raise FileExistsError(f"run file {str(self.path)!r} already exists")
        base = {
            "name": self.path.name[: -len(RUN_SUFFIX)],
            "created": time.time(),
            "collapsewatch_version": __version__,
            "status": "running",
        }
        _create(self.path, {**base, **metadata})
        self._db = self._connect(self.path)
        self._columns = ["step", "time"]

    def _connect(self, path: Path) -> sqlite3.Connection:
        try:
            # isolation_level=None: transactions are ours, so a batch of steps is one commit.
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError as error:
            raise _storage_error(path, error, "open") from None
        return db

    def set_metadata(self, values: Mapping[str, Any]) -> None:
        """Insert or replace metadata keys."""
        self._begin().executemany(
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
        db = self._begin()
        integer = {c for c, v in arrays.items() if np.issubdtype(v.dtype, np.integer)}
        for column in arrays:
            if column not in self._columns:
                if not _COLUMN.fullmatch(column):
                    raise ValueError(f"invalid metric column name {column!r}")
                kind = "INTEGER" if column in integer else "REAL"
                db.execute(f'ALTER TABLE metrics ADD COLUMN "{column}" {kind}')
                self._columns.append(column)
        names = list(arrays)
        # Plain Python values for sqlite3; SQLite stores a NaN double as NULL.
        columns = [arrays[c].astype("int64" if c in integer else "float64").tolist() for c in names]
        placeholders = ", ".join("?" * len(names))
        db.executemany(
            f"INSERT INTO metrics ({', '.join(map(_quoted, names))}) VALUES ({placeholders})",
            zip(*columns, strict=True),
        )

    def append_events(self, events: Iterable[Event]) -> None:
        """Append detector events."""
        self._begin().executemany(
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
        self._begin().execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?)",
            (int(step), dtype, shape, blob, labels_dtype, labels_blob),
        )

    def commit(self) -> None:
        """Make everything appended so far durable and visible to readers.

        Raises:
            RunStorageError: it could not be written; everything since the last commit is
                rolled back, so the same rows can be appended again and retried.
        """
        db = self._open()
        if not db.in_transaction:
            return
        try:
            db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            self._rollback()
            raise _storage_error(self.path, error, "write") from None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything appended inside is committed at the end, or (on any error) rolled back
        and the error raised: all of it lands or none of it."""
        self._begin()
        try:
            yield
        except BaseException:
            self._rollback()
            raise
        self.commit()

    def _rollback(self) -> None:
        db = self._open()
        with contextlib.suppress(sqlite3.Error):
            if db.in_transaction:
                db.execute("ROLLBACK")
        # Columns added in the rolled-back transaction are gone again.
        with contextlib.suppress(sqlite3.Error):
            self._columns = [row[1] for row in db.execute("PRAGMA table_info(metrics)")]

    def close(
        self, status: str = "finished", *, lost: Sequence[str] = (), stacklevel: int = 2
    ) -> None:
        """Record the final ``status``, commit, and fold the WAL back into the file.

        Never raises for a storage fault: what could not be done (and ``lost``, what the
        caller could not write) is said in one ``RuntimeWarning`` naming the path.
        """
        if self._db is None:
            return
        problems = list(lost)
        try:
            with self.transaction():
                self.set_metadata({"status": status, "finished": time.time()})
        except RunStorageError as error:
            problems.append(f"its final status {status!r} was not recorded ({error.cause})")
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            # A finished run becomes one self-contained file again, which read-only openers
            # can read without creating -wal/-shm files beside it. If a reader has it open
            # right now the switch is refused; the run then simply stays in WAL mode.
            self._db.execute("PRAGMA busy_timeout=200")
            with contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.Error as error:
            # Nothing committed is lost: SQLite reads the -wal file beside the run.
            problems.append(
                f"its write-ahead log stays beside it in {self.path.name}-wal "
                f"({_storage_cause(self.path, error)})"
            )
        finally:
            self._db.close()
            self._db = None
        if problems:
            warnings.warn(
                f"closing run {str(self.path)!r}: {'; '.join(problems)}",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError(f"run writer for {str(self.path)!r} is closed")
        return self._db

    def _begin(self) -> sqlite3.Connection:
        db = self._open()
        if not db.in_transaction:
            try:
                db.execute("BEGIN")
            except sqlite3.OperationalError as error:
                raise _storage_error(self.path, error, "write") from None
        return db


def _create(path: Path, metadata: Mapping[str, Any]) -> None:
    """Create the run file ``path`` complete (marker, schema, metadata) or not at all.

    The run is built in a hidden draft beside it and hard-linked into place: the link is
    atomic and fails if the name is taken, so no reader sees a half-made run, a failed start
    leaves nothing behind, and of two processes racing on one name exactly one wins.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _storage_error(path, error, "create") from None
    draft = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.draft")
    try:
        db = sqlite3.connect(draft, isolation_level=None)
        try:
            db.executescript(
                f"BEGIN; PRAGMA application_id={APPLICATION_ID}; "
                f"PRAGMA user_version={SCHEMA_VERSION}; {_SCHEMA}"
            )
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [(str(k), _dumps(v)) for k, v in metadata.items()],
            )
            db.execute("COMMIT")
        finally:
            db.close()
        _link_exclusive(draft, path)
    except sqlite3.OperationalError as error:
        raise _storage_error(path, error, "create") from None
    except FileExistsError:
        raise FileExistsError(f"run file {str(path)!r} already exists") from None
    except OSError as error:
        raise _storage_error(path, error, "create") from None
    finally:
        for leftover in (draft, draft.with_name(draft.name + "-journal")):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _link_exclusive(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A file system without hard links: claim the name exclusively, then move the
        # finished draft over the (for a moment empty) claimed file.
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(source, target)


def _quoted(identifier: str) -> str:
    """An identifier already checked against ``_COLUMN``, quoted for SQL."""
    return f'"{identifier}"'


@dataclass(frozen=True)
class RunSummary:
    """What a run list shows, read cheaply (no full metrics read). ``state`` is a
    :class:`~collapsewatch.states.RunState` value (the detector's state after the last
    event); ``display_state(state, ever_collapsed)`` gives what to show."""

    path: Path
    name: str
    status: str
    state: str
    recorded_steps: int
    last_step: int | None
    last_time: float | None
    last_loss: float | None
    margin: float | None
    ever_collapsed: bool


class RunReader:
    """Read-only access to one run file; safe while another process is writing it.

    Every read returns fresh data (a new DataFrame or dict), never a live view. The file is
    treated as untrusted data (see the module docstring): ill-named columns are skipped and
    malformed values read as NaN/None, each with one :class:`RunFileWarning`.

    Raises:
        RunFileError: the path is missing, not a SQLite file, not a collapsewatch run, or a
            read ran past :data:`QUERY_TIME_LIMIT`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._warned: set[str] = set()
        self._deadline = math.inf
        if not self.path.is_file():
            raise RunFileError(f"{str(self.path)!r}: no such run file")
        try:
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as error:
            raise RunFileError(f"{str(self.path)!r} cannot be opened ({error})") from None
        # Checked every 1,000 SQLite instructions: a query past its time limit is stopped.
        self._db.set_progress_handler(self._past_deadline, 1000)
        try:
            # Functions with side effects are refused inside the file's own schema (views).
            self._db.execute("PRAGMA trusted_schema=OFF")
            application_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as error:
            self._db.close()
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
        try:
            self._check_tables()
        except RunFileError:
            self._db.close()
            raise

    def _check_tables(self) -> None:
        # A view (or anything else) under a table's name would run the file's own SQL.
        kinds = dict(
            self._query("SELECT name, type FROM sqlite_master WHERE name IN (?, ?, ?, ?)", _TABLES)
        )
        for table in _TABLES:
            if kinds.get(table) != "table":
                found = f"a {kinds[table]}" if table in kinds else "missing"
                raise RunFileError(
                    f"{str(self.path)!r} is not a collapsewatch run: its {table!r} table is {found}"
                )
        names = [name for name, _ in self._metric_types(validated=False)]
        if names[:1] != ["step"] or "time" not in names:
            raise RunFileError(
                f"{str(self.path)!r} is not a collapsewatch run: its metrics table lacks "
                "the step and time columns"
            )

    def _past_deadline(self) -> int:
        return time.monotonic() > self._deadline

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
        self._deadline = time.monotonic() + QUERY_TIME_LIMIT
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.DatabaseError as error:
            if time.monotonic() > self._deadline:
                raise RunFileError(
                    f"{str(self.path)!r}: a read took longer than {QUERY_TIME_LIMIT:g} s and "
                    "was stopped (a damaged or crafted file?)"
                ) from None
            raise RunFileError(f"{str(self.path)!r}: cannot read run ({error})") from None
        finally:
            self._deadline = math.inf

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"run file {str(self.path)!r}: {message}", RunFileWarning, stacklevel=3)

    @property
    def name(self) -> str:
        return self.path.name[: -len(RUN_SUFFIX)]

    def metadata(self) -> dict[str, Any]:
        """All metadata keys with their (JSON-decoded) values; a value that is not JSON
        reads as None."""
        meta, broken = {}, []
        for key, value in self._query("SELECT key, value FROM meta"):
            try:
                meta[str(key)] = json.loads(value)
            except (TypeError, ValueError):
                meta[str(key)] = None
                broken.append(str(key))
        if broken:
            self._warn_once("meta", f"metadata {broken} are not JSON; read as None")
        return meta

    def _metric_types(self, validated: bool = True) -> list[tuple[str, str]]:
        """(name, declared type) of the metrics table's columns; with ``validated``, only
        names a writer could have made (others are skipped with a warning)."""
        declared = [(str(row[1]), str(row[2])) for row in self._query("PRAGMA table_info(metrics)")]
        if not validated:
            return declared
        valid = [(name, kind) for name, kind in declared if _COLUMN.fullmatch(name)]
        if len(valid) < len(declared):
            skipped = [name[:60] for name, _ in declared if not _COLUMN.fullmatch(name)]
            self._warn_once("columns", f"metric columns with invalid names skipped: {skipped}")
        return valid

    def metric_columns(self) -> list[str]:
        """Names of the metrics table's columns, ``step`` and ``time`` first."""
        return [name for name, _ in self._metric_types()]

    def metrics(
        self,
        since_step: int | None = None,
        columns: Sequence[str] | None = None,
        until_step: int | None = None,
        limit: int | None = None,
    ) -> pd.DataFrame:
        """Metric rows with since_step < step ≤ until_step (both optional), by step.

        Args:
            since_step: only rows after this step (for polling: pass the last step seen).
            columns: the columns to read (``step`` is always included); default all.
            until_step: only rows up to this step.
            limit: at most this many rows, the first by step (read a long run in chunks,
                each well inside :data:`QUERY_TIME_LIMIT`, passing the last step read).

        A value that is not a number reads as NaN (a row whose step is not an integer is
        skipped), with one :class:`RunFileWarning`.
        """
        declared = dict(self._metric_types())
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
        sql = f"SELECT {', '.join(map(_quoted, wanted))} FROM metrics"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY step"
        if limit is not None:
            sql += " LIMIT ?"
            parameters.append(int(limit))
        rows = self._query(sql, parameters)
        frame = pd.DataFrame.from_records(rows, columns=wanted)
        steps = self._numbers(frame["step"], "step")
        if steps.isna().any():
            frame = frame[steps.notna()].reset_index(drop=True)
        for column in wanted:
            values = self._numbers(frame[column], column)
            if declared[column] == "INTEGER" or column == "step":
                # Integer counts come back as integers (nullable only if a value is missing).
                whole = values.dropna()
                if (whole == whole.round()).all():
                    values = values.astype("Int64" if values.isna().any() else "int64")
            frame[column] = values
        return frame

    def _numbers(self, values: pd.Series, column: str) -> pd.Series:
        """``values`` as float64; anything that is not a number becomes NaN (warned once)."""
        if values.dtype != object:
            return values.astype("float64")
        numbers = pd.to_numeric(values.map(_number_or_none), errors="coerce").astype("float64")
        if numbers.isna().sum() > values.isna().sum():
            self._warn_once(
                f"metric {column}", f"metric column {column!r} holds non-numbers; read as NaN"
            )
        return numbers

    def events(self, since_id: int | None = None) -> pd.DataFrame:
        """Events in order, columns id, step, time, kind, state, message, suggestion,
        evidence (a dict; ``{}`` where the stored JSON is malformed)."""
        rows = self._query(
            f"SELECT {', '.join(map(_quoted, _EVENT_COLUMNS))} FROM events "
            "WHERE id > ? ORDER BY id",
            (-1 if since_id is None else int(since_id),),
        )
        frame = pd.DataFrame.from_records(rows, columns=list(_EVENT_COLUMNS))
        for column in ("id", "step", "time"):
            frame[column] = self._numbers(frame[column], f"events.{column}")
        if frame[["id", "step"]].isna().any(axis=None):
            self._warn_once("event steps", "events without an integer step skipped")
            frame = frame.dropna(subset=["id", "step"]).reset_index(drop=True)
        for column in ("kind", "state", "message", "suggestion"):
            frame[column] = ["" if v is None else str(v) for v in frame[column]]
        frame["evidence"] = [self._evidence(e) for e in frame["evidence"]]
        return frame.astype({"id": "int64", "step": "int64", "time": "float64"})

    def _evidence(self, text: Any) -> dict[str, Any]:
        try:
            evidence = json.loads(text)
        except (TypeError, ValueError):
            evidence = None
        if not isinstance(evidence, dict):
            self._warn_once("evidence", "event evidence that is not a JSON object read as {}")
            return {}
        return evidence

    def snapshot_steps(self) -> list[int]:
        """Steps that have an embedding snapshot, ascending."""
        steps = self._query("SELECT step FROM snapshots ORDER BY step")
        return [row[0] for row in steps if isinstance(row[0], int)]

    def snapshot(self, step: int) -> Snapshot:
        """The embedding snapshot of ``step``.

        Raises:
            KeyError: there is none.
            RunFileError: it is corrupt (unknown dtype, a shape its bytes do not fill).
        """
        rows = self._query(
            "SELECT dtype, shape, embeddings, labels_dtype, labels FROM snapshots WHERE step = ?",
            (int(step),),
        )
        if not rows:
            raise KeyError(f"run {self.name!r} has no snapshot at step {step}")
        dtype, shape, blob, labels_dtype, labels_blob = rows[0]
        try:
            labels = None
            if labels_blob is not None:
                labels = _blob_to_array(labels_dtype, "[-1]", labels_blob)
            embeddings = _blob_to_array(dtype, shape, blob)
        except (TypeError, ValueError) as error:
            raise RunFileError(
                f"{str(self.path)!r}: the snapshot of step {step} is corrupt ({error})"
            ) from None
        return Snapshot(int(step), embeddings, labels)

    def summary(self, previous: RunSummary | None = None) -> RunSummary:
        """Counts, last values and the detector's current state, without reading all rows.

        Counting the rows reads them all (a 1,000,000-row run: 0.1 s on an idle machine);
        given ``previous``, a summary read earlier of this same run (rows are only ever
        appended, by step), only the rows after its last step are counted.
        """
        meta = self.metadata()
        if previous is not None and previous.last_step is not None:
            new, last_step = self._query(
                "SELECT COUNT(*), MAX(step) FROM metrics WHERE step > ?", (previous.last_step,)
            )[0]
            count = previous.recorded_steps + new
            last_step = previous.last_step if last_step is None else last_step
        else:
            count, last_step = self._query("SELECT COUNT(*), MAX(step) FROM metrics")[0]
        last_time = last_loss = None
        if last_step is not None:
            loss = '"loss"' if "loss" in self.metric_columns() else "NULL"
            last_time, last_loss = self._query(
                f'SELECT "time", {loss} FROM metrics WHERE step = ?', (last_step,)
            )[0]
        states = self._query("SELECT state FROM events ORDER BY id DESC LIMIT 1")
        collapsed = self._query(
            "SELECT 1 FROM events WHERE state = ? LIMIT 1", (RunState.COLLAPSED.value,)
        )
        return RunSummary(
            path=self.path,
            name=self.name,
            status=str(meta.get("status", "unknown")),
            # A run that never recorded a step has not been judged: "empty", not "healthy".
            state=str(states[0][0])
            if states
            else (RunState.HEALTHY if count else RunState.EMPTY).value,
            recorded_steps=int(count),
            last_step=last_step if isinstance(last_step, int) else None,
            last_time=_number_or_none(last_time),
            last_loss=_number_or_none(last_loss),
            margin=_number_or_none(meta.get("margin")),
            ever_collapsed=bool(collapsed),
        )


def _number_or_none(value: Any) -> float | None:
    """A stored number as a float; anything else (text, blobs, JSON junk) as None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


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


def load_run(path: str | os.PathLike[str]) -> Run:
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
