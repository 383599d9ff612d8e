"""Recorded steps on their way into the run file, kept while the disk refuses them.

``watch()``'s writer thread derives each batch of rows once (the detector has seen them) and
hands it to :class:`PendingWrites`, which writes the batches in order, one transaction
each. When the disk is full (or turned read-only) the batch stays queued and is written
with the next one, once there is space again; nothing is derived twice. The queue is
bounded: past ``max_rows`` rows the oldest batches are dropped, past ``max_snapshots``
embedding samples the oldest samples, and what was dropped is counted for the warning.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from collapsewatch.store import Event, RunStorageError, RunWriter, Snapshot

MAX_PENDING_ROWS = 100_000  # ~40 float64 columns: about 32 MB
MAX_PENDING_SNAPSHOTS = 16


@dataclass
class WriteBatch:
    """One commit's worth: metric columns (each (S,)), events, snapshots, metadata."""

    metrics: dict[str, np.ndarray]
    events: list[Event] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.metrics["step"])


class PendingWrites:
    """Batches waiting to be written to ``writer``, oldest first (one thread at a time)."""

    def __init__(
        self,
        writer: RunWriter,
        *,
        max_rows: int = MAX_PENDING_ROWS,
        max_snapshots: int = MAX_PENDING_SNAPSHOTS,
    ) -> None:
        self.writer = writer
        self.max_rows = max_rows
        self.max_snapshots = max_snapshots
        self._batches: deque[WriteBatch] = deque()
        self.dropped_steps: list[int] = []  # steps given up on to bound memory
        self.dropped_snapshots = 0
        self.fault: RunStorageError | None = None  # the last fault, None once writes succeed

    @property
    def rows(self) -> int:
        """Rows waiting to be written."""
        return sum(batch.rows for batch in self._batches)

    def add(self, batch: WriteBatch) -> None:
        """Queue ``batch`` behind the others, dropping the oldest past the bounds."""
        self._batches.append(batch)
        while self.rows > self.max_rows and len(self._batches) > 1:
            self.dropped_steps += self._batches.popleft().metrics["step"].tolist()
        snapshots = sum(len(b.snapshots) for b in self._batches)
        for old in self._batches:
            if snapshots <= self.max_snapshots:
                break
            kept = old.snapshots[max(0, snapshots - self.max_snapshots) :]
            self.dropped_snapshots += len(old.snapshots) - len(kept)
            snapshots -= len(old.snapshots) - len(kept)
            old.snapshots = kept

    def write(self) -> RunStorageError | None:
        """Write the queued batches in order; stop at a storage fault (kept for the next
        try) and return it, or None once everything is written.

        Raises:
            Exception: anything that is not a storage fault (that batch is dropped first,
                so one bad batch cannot block the ones behind it).
        """
        while self._batches:
            batch = self._batches[0]
            try:
                with self.writer.transaction():
                    self.writer.append_metrics(batch.metrics)
                    self.writer.append_events(batch.events)
                    for snapshot in batch.snapshots:
                        self.writer.add_snapshot(
                            snapshot.step, snapshot.embeddings, snapshot.labels
                        )
                    self.writer.set_metadata(batch.metadata)
            except RunStorageError as fault:
                self.fault = fault
                return fault
            except Exception:
                self.dropped_steps += self._batches.popleft().metrics["step"].tolist()
                raise
            self._batches.popleft()
        self.fault = None
        return None

    def lost(self) -> list[str]:
        """What never reached the file (the queue, and what was dropped), for a warning."""
        problems = []
        steps = self.dropped_steps + [s for b in self._batches for s in b.metrics["step"].tolist()]
        if steps:
            cause = f" ({self.fault.cause})" if self.fault is not None else ""
            problems.append(
                f"{len(steps)} recorded steps ({_ranges(sorted(steps))}) were not written{cause}"
            )
        snapshots = self.dropped_snapshots + sum(len(b.snapshots) for b in self._batches)
        if snapshots:
            problems.append(f"{snapshots} embedding snapshots were not written")
        return problems


def _ranges(steps: list[int], limit: int = 4) -> str:
    """ "steps 3-7, 12-15" for sorted steps, runs of consecutive recorded steps merged."""
    # Recorded steps are every k-th step: the smallest spacing is the recording interval.
    gap = int(np.diff(steps).min()) if len(steps) > 1 else 1
    spans: list[list[int]] = []
    for step in steps:
        if spans and step - spans[-1][1] <= max(1, gap):
            spans[-1][1] = step
        else:
            spans.append([step, step])
    shown = [f"{a}-{b}" if a != b else str(a) for a, b in spans[:limit]]
    more = f" and {len(spans) - limit} more" if len(spans) > limit else ""
    return "steps " + ", ".join(shown) + more
