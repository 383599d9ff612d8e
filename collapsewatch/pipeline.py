"""The commit pipeline: recorded steps from the device to the run file, without waiting.

Two sides, two threads:

* **Training thread** (the loss hooks, ``flush()``, ``close()``): records arrive from
  :class:`~collapsewatch.capture.Capture` (:meth:`CommitPipeline.started`,
  :meth:`CommitPipeline.finished`). Under torch.distributed each finished record's step
  vector (and Gram) starts one asynchronous ``all_reduce``. Every ``commit_every`` records,
  ``commit_interval`` seconds, or when the cadence asks, :meth:`CommitPipeline.flush` stacks
  the step vectors (``statistics.step_vectors``), copies them to the host with non-blocking
  copies and puts one :class:`CommitBatch` on the queue. Nothing waits for the device.
* **Writer thread** (rank 0 only, ``collapsewatch-<run>``): waits (polling) for the batch's
  device event, turns the vectors into metrics (``statistics.derive_metrics``), runs the
  detector over the rows, writes rows, events, snapshots and metadata through
  :class:`~collapsewatch.pending.PendingWrites` and feeds the ``log_to`` sinks.

What crosses between them, and who owns it:

=====================  ================  =====================================================
field                  written by        read by, and how it crosses
=====================  ================  =====================================================
``_queue``             training          writer: ``queue.Queue`` of :class:`CommitBatch`
                                         (None stops the thread); ``task_done`` lets
                                         ``flush(wait=True)`` join it
``CommitBatch.*``      training          writer: handed over whole through the queue and
                                         never touched again by the training thread
``noted``              training          writer: ``deque`` of events made in the training
                                         loop (a Rescue's), written with the next commit
``actions``            writer            training: ``deque`` of collapse / divergence onsets,
                                         acted on at the next loss call
``errors``             writer            training: ``deque`` of write and sink failures,
                                         warned about at the next loss call
``latest_metrics``     writer            training / integrations: one dict, replaced whole
``detector``           writer            training reads ``state`` and may ``add_traits``
                                         (each replaces one attribute whole, atomic under
                                         the GIL): as of the last rows written
``cadence``            training          writer reads ``every`` / ``interval`` /
                                         ``measured`` for the metadata and reports its CPU
                                         time with ``committed("writer", ...)``, which
                                         touches only the writer's own entries
=====================  ================  =====================================================

After ``close()`` has joined the writer thread, the training thread owns everything.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor

from collapsewatch.adapters import MarginSpec
from collapsewatch.cadence import Cadence
from collapsewatch.capture import StepRecord, caller_stacklevel
from collapsewatch.detect import CollapseDetector
from collapsewatch.pending import PendingWrites, WriteBatch
from collapsewatch.states import FAILED_STATES
from collapsewatch.statistics import (
    derive_metrics,
    embedding_sums,
    step_vector_size,
    step_vectors,
)
from collapsewatch.store import Event, RunWriter, Snapshot
from collapsewatch.trackers import Sink, SinkError, feed


def stack_step_vectors(records: list[StepRecord]) -> Tensor:
    """(S, step_vector_size(D)) step vectors (``statistics.step_vectors``) of records on one
    device, NaN where a loss never ran; the kept embeddings of one shape reduced together."""
    groups: dict[tuple[Any, ...], list[StepRecord]] = {}
    for record in records:
        if record.sums is None:
            assert record.embeddings is not None
            key = (record.embeddings.shape, record.embeddings.dtype)
            groups.setdefault(key, []).append(record)
    for group in groups.values():
        # Grouped above: every record of a group kept its embeddings.
        sums = embedding_sums(torch.stack([r.embeddings for r in group]))  # type: ignore[misc]
        for record, row in zip(group, sums.unbind(), strict=True):
            record.sums, record.embeddings = row, None
    sums = torch.stack([r.sums for r in records])  # type: ignore[misc]  # all reduced by now
    skipped = None
    if any(r.skipped is not None for r in records):
        none = sums.new_zeros(4)
        skipped = torch.stack([none if r.skipped is None else r.skipped for r in records])
    return step_vectors([r.loss for r in records], [r.triplet for r in records], sums, skipped)


@dataclass
class CommitBatch:
    """Recorded steps on their way to the writer thread, with a device event to wait on."""

    steps: list[int]
    times: list[float]
    dim: int  # the embedding dimension D of the vectors
    vectors: Tensor  # (S, step_vector_size(D)) in host memory
    grams: dict[int, Tensor]  # by index in ``steps``: rank-step sums
    snapshots: dict[int, tuple[Tensor, Tensor | None]]
    probes: dict[int, Tensor]
    plateaus: list[float | Tensor | None]
    loss_calls: int  # loss calls seen when the batch left the training thread
    ready: torch.cuda.Event | None = None


def to_host(tensor: Tensor) -> Tensor:
    """Copy to host memory without making the host wait (pinned memory on CUDA)."""
    if tensor.device.type != "cuda":
        return tensor.detach().cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


class CommitPipeline:
    """Recorded steps from the training thread to the run file (see the module docstring
    for which thread owns what).

    Args:
        detector: the run's collapse detector (fed by the writer thread).
        cadence: the recording intervals (told what each side's commit cost).
        margin_spec: the loss's margin and plateau.
        sinks: the ``log_to`` trackers.
        writer: the run file (rank 0), or None on the other ranks: no writer thread then.
        name: the run's name (the writer thread's).
        world_size: ranks under torch.distributed (1 without).
        commit_every, commit_interval: commit every this many records or seconds.
    """

    def __init__(
        self,
        detector: CollapseDetector,
        cadence: Cadence,
        margin_spec: MarginSpec,
        sinks: list[Sink],
        writer: RunWriter | None,
        *,
        name: str,
        world_size: int,
        commit_every: int,
        commit_interval: float,
    ) -> None:
        self.detector, self.cadence, self.margin_spec = detector, cadence, margin_spec
        self.sinks = sinks
        self.world_size = world_size
        self.commit_every, self.commit_interval = commit_every, commit_interval
        # Training thread.
        self._records: list[StepRecord] = []
        self._last_flush = time.monotonic()
        self._closed = False
        # Crossing threads (see the module docstring).
        self._queue: queue.Queue[CommitBatch | None] = queue.Queue()
        self.noted: deque[Event] = deque()
        self.actions: deque[Event] = deque()
        self.errors: deque[BaseException] = deque()
        self.latest_metrics: dict[str, Any] | None = None
        # Writer thread (rank 0).
        self._writer = writer
        self._pending = None if writer is None else PendingWrites(writer)
        self._thread: threading.Thread | None = None
        if writer is not None:
            self._thread = threading.Thread(
                target=self._write_loop, name=f"collapsewatch-{name}", daemon=True
            )
            self._thread.start()

    # -------------------------------------------------------------- training thread
    def started(self, record: StepRecord) -> None:
        """Take a record whose loss is about to run (it is committed even if the loss
        raises)."""
        self._records.append(record)

    def finished(self, record: StepRecord, *, loss_calls: int, dim: int | None) -> None:
        """A started record's loss returned: reduce it across ranks (not waited for here)
        and commit if one is due."""
        if self.world_size > 1:
            # One collective per recorded step, not waited for here: sums of sufficient
            # statistics (and the Gram) give the global batch's statistics exactly.
            parts = [stack_step_vectors([record])[0]]
            parts += [] if record.gram is None else [record.gram]
            payload = torch.cat(parts)
            work = dist.all_reduce(payload, op=dist.ReduceOp.SUM, async_op=True)
            record.reduced = (payload, work)
        if (
            len(self._records) >= self.commit_every
            or time.monotonic() - self._last_flush >= self.commit_interval
            or self.cadence.wants_flush
        ):
            self.flush(loss_calls=loss_calls, dim=dim)

    def flush(self, *, loss_calls: int, dim: int | None, wait: bool = False) -> None:
        """Send the records to the writer now (non-blocking on the device); with ``wait``,
        return once they are written. ``loss_calls``: the loss calls seen so far; ``dim``:
        the embedding dimension (None before any record)."""
        if wait:
            self.flush(loss_calls=loss_calls, dim=dim)
            if not self._closed:  # once closed, the writer has written everything
                self._queue.join()
            return
        records, self._records = self._records, []
        self._last_flush = started = time.monotonic()
        if not records:
            return
        assert dim is not None  # a record fixed it
        size = step_vector_size(dim)
        grams = {}
        if self.world_size > 1:
            vectors = []
            for i, record in enumerate(records):
                # finished() started every record's all-reduce under DDP.
                payload, work = record.reduced  # type: ignore[misc]
                work.wait()  # on NCCL this orders streams; the host does not wait
                vectors.append(payload[:size])
                if record.gram is not None:
                    grams[i] = payload[size:]
            if self._writer is None:  # not rank 0: its sums have been contributed
                return
            stacked = torch.stack(vectors)
        else:
            stacked = stack_step_vectors(records)
            grams = {i: r.gram for i, r in enumerate(records) if r.gram is not None}
        batch = CommitBatch(
            steps=[r.step for r in records],
            times=[r.time for r in records],
            dim=dim,
            vectors=to_host(stacked),
            grams={i: to_host(g) for i, g in grams.items()},
            snapshots={
                i: (
                    to_host(r.snapshot[0]),
                    None if r.snapshot[1] is None else to_host(r.snapshot[1]),
                )
                for i, r in enumerate(records)
                if r.snapshot is not None
            },
            probes={i: to_host(r.probe) for i, r in enumerate(records) if r.probe is not None},
            plateaus=[
                to_host(r.plateau) if isinstance(r.plateau, Tensor) else r.plateau for r in records
            ],
            loss_calls=loss_calls,
        )
        if stacked.device.type == "cuda":
            batch.ready = torch.cuda.Event()
            batch.ready.record()
        self.cadence.committed("host", time.monotonic() - started, len(records))
        self._queue.put(batch)

    def close(self, status: str, *, loss_calls: int, dim: int | None) -> None:
        """Commit the rest, stop the writer thread, write the last metadata and close the
        run file and the sinks (rank 0). Failures go to ``errors``; nothing raises for a
        storage fault."""
        self.flush(loss_calls=loss_calls, dim=dim)
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        assert self._writer is not None and self._pending is not None
        # The calls made since the last recorded step, and the training thread's events.
        empty = {"step": np.zeros(0, dtype=np.int64), "time": np.zeros(0)}
        final = WriteBatch(empty, self._take_noted(), metadata={"loss_calls": loss_calls})
        self._pending.add(final)
        try:  # a last try for rows a full disk held back: the space may be back
            self._pending.write()
        except Exception as error:
            self.errors.append(error)
        # Never raises for a storage fault: one warning says what did not reach the file.
        self._writer.close(status, lost=self._pending.lost(), stacklevel=caller_stacklevel() + 1)
        for sink in self.sinks:
            try:
                sink.close()  # flushes only: the writer or run passed to log_to is the user's
            except Exception as error:
                self.errors.append(SinkError(sink.kind, error))

    def _take_noted(self) -> list[Event]:
        taken = []
        while self.noted:
            taken.append(self.noted.popleft())
        return taken

    # ---------------------------------------------------------------- writer thread
    def _write_loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                self._write(batch)
            except BaseException as error:  # never let a write failure kill training
                self.errors.append(error)
            finally:
                self._queue.task_done()  # for flush(wait=True)

    def _write(self, batch: CommitBatch) -> None:
        if batch.ready is not None:
            # Poll rather than cudaEventSynchronize: only this thread ever waits.
            while not batch.ready.query():
                time.sleep(0.001)
        started = time.thread_time()  # CPU time: what this thread takes from training
        assert self._pending is not None
        columns = derive_metrics(
            np.asarray(batch.steps),
            np.asarray(batch.times),
            batch.vectors.numpy(),
            dim=batch.dim,
            margin=self.margin_spec.margin,
            # In-batch-negatives losses plateau at ln(candidates), which follows each batch.
            plateau=(
                np.array([math.nan if p is None else float(p) for p in batch.plateaus])
                if self.margin_spec.in_batch
                else self.margin_spec.plateau
            ),
            world_size=self.world_size,
            rank_sums={i: g.numpy() for i, g in batch.grams.items()},
            probes={i: p.numpy() for i, p in batch.probes.items()},
        )
        events: list[Event] = []
        # Rows as plain dicts straight from the arrays: DataFrame.to_dict is many times slower,
        # and this thread shares the interpreter with the training loop.
        values = zip(*(column.tolist() for column in columns.values()), strict=True)
        for row in (dict(zip(columns, row_values, strict=True)) for row_values in values):
            for event in self.detector.update(row):
                events.append(event)
                if event.kind in FAILED_STATES:  # "collapsed" and "diverged" onsets
                    self.actions.append(event)
        snapshots = [
            Snapshot(batch.steps[i], rows.numpy(), None if labels is None else labels.numpy())
            for i, (rows, labels) in batch.snapshots.items()
        ]
        events += self._take_noted()
        self._pending.add(
            WriteBatch(
                metrics=columns,
                events=events,
                snapshots=snapshots,
                metadata={
                    "embedding_dim": batch.dim,
                    "state": self.detector.state,
                    "every": self.cadence.every,
                    "difficulty_every": self.cadence.interval,
                    "cadence_timing": self.cadence.measured,
                    # What a resumed run numbers its steps from (not the last recorded step).
                    "loss_calls": batch.loss_calls,
                    "loss_traits": sorted(self.detector.traits),
                },
            )
        )
        # A full or read-only disk keeps the rows queued (bounded) for the next commit.
        fault = self._pending.write()
        if fault is not None:
            self.errors.append(fault)
        self.cadence.committed("writer", time.thread_time() - started, len(batch.steps))
        self.latest_metrics = {name: column[-1].item() for name, column in columns.items()}
        if self.sinks:
            frame = pd.DataFrame(columns)
            for sink in self.sinks:
                try:
                    feed(sink, frame, events, snapshots)
                except Exception as error:  # a tracker must never stop the run file
                    self.errors.append(SinkError(sink.kind, error))
