"""``watch(model, loss_fn)``: record collapse statistics from an existing training loop.

A *step* is one call of the loss while autograd is enabled (calls under ``torch.no_grad()``
or ``inference_mode``, e.g. validation, are not steps). Forward hooks on the model capture
the embeddings it produced since the previous step; hooks on the loss read its inputs, its
output and, for the bundled losses, the statistics its own pass computed.

Nothing in the training step waits for the device: every statistic is a device tensor, the
step vectors are stacked and copied to the host with non-blocking copies every
``commit_every`` recorded steps (or ``commit_interval`` seconds), and a background thread
turns them into metrics, runs the collapse detector and commits them to the run file.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import numbers
import os
import queue
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import Tensor

from collapsewatch._version import __version__
from collapsewatch.adapters import (
    DistanceSpec,
    LossCall,
    MarginSpec,
    default_embedding,
    default_loss_value,
    find_distance,
    find_labels,
    find_margin,
    loss_family,
    loss_traits,
    parse_loss_call,
)
from collapsewatch.cadence import Cadence, Every, check_interval, check_overhead
from collapsewatch.columns import LABEL_COLUMNS, MARGIN_RELATIVE
from collapsewatch.command import command_name
from collapsewatch.detect import CollapseDetector, DetectorConfig
from collapsewatch.losses.base import ReportsStatistics
from collapsewatch.losses.distances import Distance
from collapsewatch.losses.functional import AnchorSampler, TripletStatistics, triplet_statistics
from collapsewatch.pending import PendingWrites, WriteBatch
from collapsewatch.rescue import Rescue
from collapsewatch.states import FAILED_STATES
from collapsewatch.statistics import (
    derive_metrics,
    embedding_sums,
    explicit_triplet_statistics,
    nonfinite_counts,
    probe_statistics,
    rank_step_sums,
    step_vector_size,
    step_vectors,
    unlabelled_statistics,
)
from collapsewatch.store import (
    Event,
    RunFileError,
    RunReader,
    RunStorageError,
    RunSummary,
    RunWriter,
    Snapshot,
    check_run_name,
    load_run,
    run_path,
)
from collapsewatch.trackers import Sink, SinkError, feed, make_sinks

OnCollapse = Literal["warn", "raise", "ignore", "rescue"] | Rescue | Callable[[Event], Any]


class CollapseError(RuntimeError):
    """Raised from the training loop by ``watch(..., on_collapse="raise")``."""

    def __init__(self, event: Event) -> None:
        super().__init__(f"{event.message} {event.suggestion}".strip())
        self.event = event


class CollapseWarning(UserWarning):
    """Emitted once per collapse onset by ``watch(..., on_collapse="warn")``."""


@dataclass
class _Record:
    """One recorded step, still on the device.

    The embedding part is taken before the loss runs, so a step whose loss raises (e.g. on
    NaN embeddings) is still recorded; the loss and its statistics are added after it.
    Small embeddings are kept (a copy) and reduced with the rest of their commit by
    :func:`_step_vectors`; large ones are reduced at once (``EAGER_ELEMENTS``).
    """

    step: int
    time: float
    call: LossCall | None
    embeddings: Tensor | None  # (N, D) copy, until reduced
    sums: Tensor | None  # embedding_sums(embeddings), once reduced
    gram: Tensor | None
    snapshot: tuple[Tensor, Tensor | None] | None
    loss: Tensor | None = None
    triplet: TripletStatistics | None = None
    reduced: Any = None  # the step's pending all_reduce, under DDP
    # (2,) non-finite [losses, embedding entries] of the unrecorded steps before this one.
    skipped: Tensor | None = None
    # The spread of embeddings the loss made itself from unreadable arguments (no labels).
    unlabelled: TripletStatistics | None = None
    probe: Tensor | None = None  # (4,) statistics.probe_statistics, on probe steps
    plateau: float | Tensor | None = None  # the loss at zero distances for this call


EAGER_ELEMENTS = 1 << 18
"""Embeddings with more entries are reduced in their own step: the kernels then cost more
than launching them, and keeping a commit's worth of them would hold device memory."""


def _step_vectors(records: list[_Record]) -> Tensor:
    """(S, step_vector_size(D)) step vectors (``statistics.step_vectors``) of records on one
    device, NaN where a loss never ran; the kept embeddings of one shape reduced together."""
    groups: dict[tuple[Any, ...], list[_Record]] = {}
    for record in records:
        if record.sums is None:
            assert record.embeddings is not None
            key = (record.embeddings.shape, record.embeddings.dtype)
            groups.setdefault(key, []).append(record)
    for group in groups.values():
        sums = embedding_sums(torch.stack([r.embeddings for r in group]))  # type: ignore[misc]
        for record, row in zip(group, sums.unbind(), strict=True):
            record.sums, record.embeddings = row, None
    sums = torch.stack([r.sums for r in records])  # type: ignore[misc]
    skipped = None
    if any(r.skipped is not None for r in records):
        none = sums.new_zeros(2)
        skipped = torch.stack([none if r.skipped is None else r.skipped for r in records])
    return step_vectors([r.loss for r in records], [r.triplet for r in records], sums, skipped)


@dataclass
class _Batch:
    """Recorded steps on their way to the writer thread, with a device event to wait on."""

    steps: list[int]
    times: list[float]
    vectors: Tensor
    grams: dict[int, Tensor]
    snapshots: dict[int, tuple[Tensor, Tensor | None]]
    probes: dict[int, Tensor]
    plateaus: list[float | Tensor | None]
    loss_calls: int  # loss calls seen when the batch left the training thread
    ready: torch.cuda.Event | None = None


@dataclass
class _Dashboard:
    """A dashboard child process and the thread that announces it once it answers."""

    process: subprocess.Popen
    url: str
    logdir: Path
    announced: threading.Event = field(default_factory=threading.Event)
    announcer: threading.Thread | None = None


_DASHBOARDS: dict[tuple[str, int], _Dashboard] = {}
_OPEN_WATCHERS: weakref.WeakSet[Watcher] = weakref.WeakSet()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_run_name(loss_fn: torch.nn.Module) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{type(loss_fn).__name__.lower()}-{secrets.token_hex(2)}"


@dataclass(eq=False)
class Watcher:
    """The hooks and recorder that :func:`watch` attaches; see there for the options."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    logdir: Path
    name: str
    margin_spec: MarginSpec
    distance: DistanceSpec
    rank_every: int
    snapshot_every: int
    snapshot_size: int
    embedding: Callable[[Any], Tensor]
    loss_value: Callable[[Any], Any]
    commit_every: int
    commit_interval: float
    on_collapse: OnCollapse
    detector: CollapseDetector
    cadence: Cadence
    config: Mapping[str, Any] = field(default_factory=dict)
    sinks: list[Sink] = field(default_factory=list)  # log_to= (see collapsewatch.trackers)
    step: int = 0  # loss calls seen so far: the next step's number
    resume: bool = False
    probe: Any = None  # watch(probe=...): the model's input for the held-out batch
    probe_labels: Tensor | None = None
    probe_every: int = 50

    def __post_init__(self) -> None:
        self.rank, self.world_size = _distributed()
        self.path = run_path(self.logdir, self.name)
        self.margin = self.margin_spec.margin
        self.closed = False
        self._current: _Record | None = None
        self._captured: list[Tensor] = []  # model outputs since the last loss call
        # Model outputs produced while the loss runs (losses that embed their own inputs,
        # like sentence-transformers'): they belong to that call's step.
        self._inside: list[Tensor] = []
        self._in_loss = False
        self._deferred: int | None = None  # a recorded step waiting for the loss to finish
        self._difficulty = True  # whether the step being recorded counts difficulties
        # Non-finite counts of the unrecorded steps since the last recorded one, kept on the
        # device (no sync) and written with the next recorded step: a NaN burst between
        # recorded steps is never missed.
        self._skipped: Tensor | None = None
        self._recording = False  # whether the current loss call is a recorded step
        self._call_plateau: float | Tensor | None = None  # the recorded call's plateau
        self._records: list[_Record] = []
        self._last_flush = time.monotonic()
        self._last_rank_step: int | None = None
        self._last_snapshot_step: int | None = None
        self._last_probe_step: int | None = None
        self._dim: int | None = None
        self._warned: set[str] = set()
        self._actions: deque[Event] = deque()
        # Events from the training thread (a Rescue's), written with the next commit.
        self._noted: deque[Event] = deque()
        self._writer_errors: deque[BaseException] = deque()
        # A loss that reports its own statistics (the bundled ones, or any loss following
        # the ReportsStatistics protocol) is switched per recorded step and read.
        self._self_reporting = isinstance(self.loss_fn, ReportsStatistics)
        # What close() puts back: watch() switches both per recorded step.
        self._original_switches = (
            (self.loss_fn.statistics, self.loss_fn.difficulty) if self._self_reporting else None
        )
        self._writer: RunWriter | None = None
        self._anchor_sampler = AnchorSampler()  # a foreign loss's difficulty counts
        self._queue: queue.Queue[_Batch | None] = queue.Queue()
        # The last row written to the run (rank 0), for integrations that report it.
        self.latest_metrics: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        if self.rank == 0:
            if self.resume:
                self._replay_existing()
            self._writer = RunWriter(self.path, self._metadata(), resume=self.resume)
            self._pending = PendingWrites(self._writer)
            self._thread = threading.Thread(
                target=self._write_loop, name=f"collapsewatch-{self.name}", daemon=True
            )
            self._thread.start()
        if self.world_size > 1:
            # Ranks must agree on which calls are recorded steps (one collective each).
            shared = [self.step]
            dist.broadcast_object_list(shared, src=0)
            self.step = shared[0]
        self._handles = [
            self.model.register_forward_hook(self._model_hook),
            self.loss_fn.register_forward_pre_hook(self._loss_pre_hook, with_kwargs=True),
            self.loss_fn.register_forward_hook(self._loss_hook, with_kwargs=True),
        ]
        _OPEN_WATCHERS.add(self)

    # ----------------------------------------------------------------------------- hooks
    def _model_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if self._in_loss:
            if self._deferred is None:
                return
            into = self._inside
        elif self.cadence.records(self.step):
            into = self._captured
        else:
            into = None
        try:
            embeddings = self.embedding(output)
            if not (isinstance(embeddings, Tensor) and embeddings.dim() == 2):
                shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else None
                raise TypeError(
                    f"watch() needs (N, D) embeddings from the model, got "
                    f"{type(embeddings).__name__} of shape {shape}; pass embedding= to pick "
                    "or reshape them"
                )
        except Exception as error:  # a monitor must not break the user's forward pass
            self._warn_once(
                "embedding",
                f"watch(): cannot read embeddings from {type(module).__name__}'s output: "
                f"{error} Embedding statistics come only from the loss's inputs, where it is "
                "called as (embeddings, labels) or (anchor, positive, negative).",
            )
            return
        if into is None:
            self._count_skipped(None, [embeddings])
        else:
            into.append(embeddings)

    def _loss_pre_hook(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        if not torch.is_grad_enabled():
            return
        self._act_on_events()
        if self._in_loss:
            # The previous call raised before its forward hook ran: what the model produced
            # since then was produced outside any loss call.
            self._captured += self._inside
        step, captured = self.step, self._captured
        self.cadence.loss_called(step)
        self.step += 1
        self._captured, self._inside = [], []
        self._current, self._deferred = None, None
        self._in_loss = True
        self._recording = self.cadence.records(step)
        if self._recording:
            self._call_plateau = self.margin_spec.plateau_of_call(args, kwargs)
        if not self._recording:
            if self._self_reporting:
                # Statistics cost a sort for batch-hard: compute them only when recorded.
                module.statistics = False
            return
        self._difficulty = self.cadence.counts_difficulty(step)
        if self._self_reporting:
            module.statistics = True
            module.difficulty = self._difficulty
        call = parse_loss_call(args, kwargs)
        if call is None:
            # Unrecognised arguments: maybe the loss runs the model itself. Decide after it
            # ran, with whatever the model produced during the call.
            self._deferred = step
            self._captured = captured
            return
        with torch.no_grad():
            self._current = self._start_record(step, call, captured)

    def _loss_hook(self, module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        self._in_loss = False
        if not torch.is_grad_enabled():
            return
        record, self._current = self._current, None
        if not self._recording:
            with torch.no_grad():
                self._count_skipped(self._read_loss(output), [])
            return
        if self._deferred is not None:
            embeddings = self._inside or self._captured
            step, self._deferred = self._deferred, None
            self._inside, self._captured = [], []
            call = None
            if embeddings:
                rows = embeddings[0] if len(embeddings) == 1 else torch.cat(embeddings)
                labels = find_labels(args, kwargs, rows.shape[0])
                call = LossCall(embeddings=rows, labels=labels) if labels is not None else None
            with torch.no_grad():
                record = self._start_record(step, call, embeddings)
        if record is None:
            return
        with torch.no_grad():
            record.loss = self._read_loss(output)
            call = record.call
            record.triplet = self._triplet_statistics(call, self._difficulty) or record.unlabelled
            if self.cadence.wants_measurement and call is not None and call.is_labelled:
                self.cadence.measure(
                    lambda: self._labelled_statistics(call, with_difficulty=False),
                    lambda: self._labelled_statistics(call, with_difficulty=True),
                )
            record.call = None  # do not keep the loss's inputs (and their graph) alive
            if self.world_size > 1:
                # One collective per recorded step, not waited for here: sums of sufficient
                # statistics (and the Gram) give the global batch's statistics exactly.
                parts = [_step_vectors([record])[0]]
                parts += [] if record.gram is None else [record.gram]
                payload = torch.cat(parts)
                work = dist.all_reduce(payload, op=dist.ReduceOp.SUM, async_op=True)
                record.reduced = (payload, work)
        self._maybe_flush()

    def _read_loss(self, output: Any) -> Tensor | None:
        try:
            value = self.loss_value(output)
        except Exception as error:  # a bad picker must not break the training step
            value, reason = None, f"loss_value raised {error!r}"
        else:
            reason = f"its output is a {type(output).__name__}"
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = torch.tensor(float(value), dtype=torch.float64)
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            # One number per step: the mean of an unreduced (reduction="none") loss.
            return value.detach() if value.dim() == 0 else value.detach().mean()
        self._warn_once(
            "loss_value",
            f"watch(): cannot read a loss value from {type(self.loss_fn).__name__} ({reason}); "
            "the loss column stays NaN and the detector judges contraction and dimensional "
            "collapse from the embeddings alone. Pass watch(..., loss_value=lambda out: ...) "
            "to pick the scalar loss.",
        )
        return None

    # ----------------------------------------------------------------------- per step
    def _count_skipped(self, loss: Tensor | None, embeddings: list[Tensor]) -> None:
        """Add an unrecorded step's non-finite counts to those the next record carries."""
        if loss is None and not embeddings:
            return
        try:
            with torch.no_grad():
                counts = nonfinite_counts(loss, embeddings)
                self._skipped = counts if self._skipped is None else self._skipped + counts
        except Exception as error:  # a monitor must not break the user's training step
            self._warn_once("skipped", f"watch(): cannot count non-finite values: {error!r}")

    def _start_record(
        self, step: int, call: LossCall | None, captured: list[Tensor]
    ) -> _Record | None:
        if captured:
            embeddings = captured[0] if len(captured) == 1 else torch.cat(captured)
        elif call is not None:
            embeddings = call.all_embeddings()
        else:
            self._warn_once(
                "signature",
                f"watch(): {type(self.loss_fn).__name__} was called with arguments it does not "
                "recognise and the model produced no embeddings; this step is not recorded",
            )
            return None
        if self._dim is None:
            self._dim = embeddings.shape[1]
        elif embeddings.shape[1] != self._dim:
            self._warn_once(
                "dim",
                f"watch(): embedding dimension changed from {self._dim} to "
                f"{embeddings.shape[1]}; such steps are not recorded",
            )
            return None
        if call is None:
            self._warn_once(
                "signature",
                f"watch(): {type(self.loss_fn).__name__} is given the model's inputs, not "
                "(embeddings, labels), and no labels can be read from its call: the "
                "embeddings the model made during the call are recorded (their spread under "
                f"the {self.distance.distance} distance, variance, direction spread, rank), "
                "but no triplet difficulty and no label columns "
                f"({', '.join(LABEL_COLUMNS)})",
            )
        elif not call.is_labelled:
            self._warn_once(
                "labels",
                f"watch(): {type(self.loss_fn).__name__} is called with (anchor, positive, "
                f"negative) and no labels: {', '.join(LABEL_COLUMNS)} are NaN and dimensional "
                "collapse is judged against the embedding dimension, not the classes",
            )
        labels = call.labels if call is not None else None
        if labels is not None and labels.shape[0] != embeddings.shape[0]:
            labels = None  # rows the labels do not describe (e.g. several model calls)
        gram = None  # on rank steps: the Gram and the label-aware geometry sums
        if self._due(step, self._last_rank_step, self.rank_every):
            self._last_rank_step = step
            gram = rank_step_sums(embeddings, labels)
        snapshot = None
        if self.rank == 0 and self._due(step, self._last_snapshot_step, self.snapshot_every):
            self._last_snapshot_step = step
            # A copy: the writer reads it later, after the loop may have reused the memory.
            rows = embeddings[: self.snapshot_size].detach().float().clone()
            snapshot = (rows, None if labels is None else labels[: self.snapshot_size].clone())
        kept, sums = embeddings.detach().clone(), None
        if embeddings.numel() > EAGER_ELEMENTS:
            kept, sums = None, embedding_sums(embeddings)
        record = _Record(step, time.time(), call, kept, sums, gram, snapshot)
        record.plateau = self._call_plateau
        if (
            self.rank == 0
            and self.probe is not None
            and self._due(step, self._last_probe_step, self.probe_every)
        ):
            self._last_probe_step = step
            record.probe = self._run_probe()
        if call is None:
            record.unlabelled = unlabelled_statistics(embeddings, self.distance.distance)
        if self._skipped is not None:
            record.skipped, self._skipped = self._skipped.to(embeddings.device), None
        self._records.append(record)
        return record

    def _run_probe(self) -> Tensor | None:
        """The probe batch through the model in eval mode under no_grad (dropout and
        batch-norm updates off), on the unwrapped module: no DDP hooks, no recompilation."""
        module = unwrap_model(self.model)
        training = module.training
        try:
            module.eval()
            with torch.no_grad():
                embeddings = self.embedding(module(_on_device(self.probe, _device_of(module))))
                labels = self.probe_labels
                if labels is not None:
                    labels = labels.to(embeddings.device)
                return probe_statistics(embeddings, labels, self.distance.distance)
        except Exception as error:  # a monitor must not break the training step
            self._warn_once(
                "probe",
                f"watch(): the probe batch cannot be evaluated ({error!r}); the probe_* "
                "columns stay NaN and the detector judges the training batches alone.",
            )
            return None
        finally:
            module.train(training)

    def _triplet_statistics(
        self, call: LossCall | None, difficulty: bool
    ) -> TripletStatistics | None:
        if self._self_reporting:
            return self.loss_fn.last_stats
        if call is None:
            return None
        if call.is_labelled:
            return self._labelled_statistics(call, with_difficulty=difficulty)
        return explicit_triplet_statistics(
            call.anchor, call.positive, call.negative, self._margin_or_any, self.distance.distance
        )

    def _labelled_statistics(self, call: LossCall, with_difficulty: bool) -> TripletStatistics:
        """A foreign loss's statistics of an (embeddings, labels) call; also what the
        difficulty interval is timed with."""
        embeddings = call.embeddings
        assert embeddings is not None and call.labels is not None
        if self.distance.normalize:
            embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)
        return triplet_statistics(
            embeddings,
            call.labels,
            self._margin_or_any,
            distance=self.distance.distance,
            with_difficulty=with_difficulty,
            anchor_sampler=self._anchor_sampler,
        )

    @property
    def _margin_or_any(self) -> float:
        # Without a margin any m will do: derive_metrics keeps only the columns that do not
        # depend on it (frac_hard, hardest-pair means, distances).
        return 1.0 if self.margin is None else self.margin

    @staticmethod
    def _due(step: int, last: int | None, every: int) -> bool:
        return every > 0 and (last is None or step - last >= every)

    # ------------------------------------------------------------------------ flushing
    def _maybe_flush(self) -> None:
        if (
            len(self._records) >= self.commit_every
            or time.monotonic() - self._last_flush >= self.commit_interval
            or self.cadence.wants_flush
        ):
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send the recorded steps to the writer now (non-blocking on the device); with
        ``wait``, return once they are written (``latest_metrics`` and ``state`` include them)."""
        if wait:
            self.flush()
            if not self.closed:  # once closed, the writer has written everything
                self._queue.join()
            return
        records, self._records = self._records, []
        self._last_flush = started = time.monotonic()
        if not records:
            return
        size = step_vector_size(self._dim or 0)
        grams = {}
        if self.world_size > 1:
            vectors = []
            for i, record in enumerate(records):
                payload, work = record.reduced
                work.wait()  # on NCCL this orders streams; the host does not wait
                vectors.append(payload[:size])
                if record.gram is not None:
                    grams[i] = payload[size:]
            if self.rank != 0:
                return
            stacked = torch.stack(vectors)
        else:
            stacked = _step_vectors(records)
            grams = {i: r.gram for i, r in enumerate(records) if r.gram is not None}
        batch = _Batch(
            steps=[r.step for r in records],
            times=[r.time for r in records],
            vectors=_to_host(stacked),
            grams={i: _to_host(g) for i, g in grams.items()},
            snapshots={
                i: (
                    _to_host(r.snapshot[0]),
                    None if r.snapshot[1] is None else _to_host(r.snapshot[1]),
                )
                for i, r in enumerate(records)
                if r.snapshot is not None
            },
            probes={i: _to_host(r.probe) for i, r in enumerate(records) if r.probe is not None},
            plateaus=[
                _to_host(r.plateau) if isinstance(r.plateau, Tensor) else r.plateau for r in records
            ],
            loss_calls=self.step,
        )
        if stacked.device.type == "cuda":
            batch.ready = torch.cuda.Event()
            batch.ready.record()
        self.cadence.committed("host", time.monotonic() - started, len(records))
        self._queue.put(batch)

    # --------------------------------------------------------------- writer thread
    def _write_loop(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                self._write(batch)
            except BaseException as error:  # never let a write failure kill training
                self._writer_errors.append(error)
            finally:
                self._queue.task_done()  # for flush(wait=True)

    def _write(self, batch: _Batch) -> None:
        if batch.ready is not None:
            # Poll rather than cudaEventSynchronize: only this thread ever waits.
            while not batch.ready.query():
                time.sleep(0.001)
        started = time.thread_time()  # CPU time: what this thread takes from training
        assert self._writer is not None and self._dim is not None
        columns = derive_metrics(
            np.asarray(batch.steps),
            np.asarray(batch.times),
            batch.vectors.numpy(),
            dim=self._dim,
            margin=self.margin,
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
                    self._actions.append(event)
        snapshots = [
            Snapshot(batch.steps[i], rows.numpy(), None if labels is None else labels.numpy())
            for i, (rows, labels) in batch.snapshots.items()
        ]
        events += self._take_noted()
        assert self._pending is not None
        self._pending.add(
            WriteBatch(
                metrics=columns,
                events=events,
                snapshots=snapshots,
                metadata={
                    "embedding_dim": self._dim,
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
            self._writer_errors.append(fault)
        self.cadence.committed("writer", time.thread_time() - started, len(batch.steps))
        self.latest_metrics = {name: column[-1].item() for name, column in columns.items()}
        if self.sinks:
            frame = pd.DataFrame(columns)
            for sink in self.sinks:
                try:
                    feed(sink, frame, events, snapshots)
                except Exception as error:  # a tracker must never stop the run file
                    self._writer_errors.append(SinkError(sink.kind, error))

    # --------------------------------------------------------------------- actions
    def _act_on_events(self, closing: bool = False) -> None:
        while self._writer_errors:
            error = self._writer_errors.popleft()
            if isinstance(error, SinkError):
                self._warn_once(f"log_to {error.kind}", f"watch(): {error}")
            elif isinstance(error, RunStorageError):
                self._warn_once(
                    "storage",
                    f"watch(): {error}. Training goes on; the recorded steps are kept in "
                    "memory (up to a bound) and written once the file can be written again.",
                )
            else:
                self._warn_once(
                    "writer", f"watch(): writing run {str(self.path)!r} failed: {error!r}"
                )
        while self._actions:
            event = self._actions.popleft()
            action = self.on_collapse
            if action == "ignore":
                continue
            if callable(action):
                action(event)
            elif action == "raise" and not closing:
                raise CollapseError(event)
            else:
                warnings.warn(
                    f"{event.message} {event.suggestion}",
                    CollapseWarning,
                    stacklevel=_caller_stacklevel(),
                )

    def add_traits(self, traits: set[str]) -> None:
        """Tell the advice what the run already does (``detect.Remedy.unless`` names, e.g.
        "group_by_label" from a trainer's settings); stored with the next commit."""
        self.detector.add_traits(traits)

    def note_event(self, event: Event) -> None:
        """Record ``event`` (made in the training thread) with the next commit."""
        self._noted.append(event)

    def _take_noted(self) -> list[Event]:
        taken = []
        while self._noted:
            taken.append(self._noted.popleft())
        return taken

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=_caller_stacklevel())

    # ------------------------------------------------------------------ life cycle
    def _replay_existing(self) -> None:
        """Resume: feed the stored steps to the detector (as ``analyze`` would) and number
        the new steps after the loss calls the run has seen (the last *recorded* step is
        earlier when the last calls were not recorded)."""
        run = load_run(self.path)
        self.detector.replay(run.metrics)
        calls = run.metadata.get("loss_calls")
        after_rows = -1 if self.detector.last_step is None else self.detector.last_step
        # A killed run may have committed rows after its last count: never number backwards.
        self.step = max(after_rows + 1, calls if isinstance(calls, int) else 0)
        dim = run.metadata.get("embedding_dim")
        self._dim = int(dim) if dim is not None else None

    def _metadata(self) -> dict[str, Any]:
        return {
            "margin": self.margin,
            "plateau": self.margin_spec.plateau,
            "margin_source": self.margin_spec.source,
            "model_class": type(unwrap_model(self.model)).__name__,
            "loss_class": type(self.loss_fn).__name__,
            "loss_family": self.detector.loss_family,
            "loss_traits": sorted(self.detector.traits),
            "distance": self.distance.distance,
            "world_size": self.world_size,
            "torch_version": torch.__version__,
            "collapsewatch_version": __version__,
            "config": dict(self.config),
            "every": self.cadence.every,
            "overhead": self.cadence.overhead,
            "rank_every": self.rank_every,
            "probe_every": self.probe_every if self.probe is not None else None,
            "detector": dataclasses.asdict(self.detector.config),
            "log_to": [sink.kind for sink in self.sinks],
        }

    def close(self, status: str = "finished") -> None:
        """Remove every hook, write what is left and close the run. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for handle in self._handles:
            handle.remove()
        if self._self_reporting:
            self.loss_fn.statistics, self.loss_fn.difficulty = self._original_switches
        if isinstance(self.on_collapse, Rescue):
            self.on_collapse.detach()
        self.flush()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            assert self._writer is not None and self._pending is not None
            # The calls made since the last recorded step, and the training thread's events.
            empty = {"step": np.zeros(0, dtype=np.int64), "time": np.zeros(0)}
            final = WriteBatch(empty, self._take_noted(), metadata={"loss_calls": self.step})
            self._pending.add(final)
            try:  # a last try for rows a full disk held back: the space may be back
                self._pending.write()
            except Exception as error:
                self._writer_errors.append(error)
            # Never raises for a storage fault: one warning says what did not reach the file.
            self._writer.close(
                status, lost=self._pending.lost(), stacklevel=_caller_stacklevel() + 1
            )
            for sink in self.sinks:
                try:
                    sink.close()  # flushes only: the writer or run passed to log_to is the user's
                except Exception as error:
                    self._writer_errors.append(SinkError(sink.kind, error))
        self._act_on_events(closing=True)
        _OPEN_WATCHERS.discard(self)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.close("finished" if exc_type is None else "failed")

    @property
    def state(self) -> str:
        """The detector's state as of the last steps written (rank 0)."""
        return self.detector.state


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel
    (``module``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


_LIBRARY_DIRS = tuple(
    str(Path(module.__file__).parent) for module in (torch, sys.modules["collapsewatch"])
)


def _caller_stacklevel() -> int:
    """The stacklevel that attributes a warning to the user's code calling the loss."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _to_host(tensor: Tensor) -> Tensor:
    """Copy to host memory without making the host wait (pinned memory on CUDA)."""
    if tensor.device.type != "cuda":
        return tensor.detach().cpu()
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


DASHBOARD_PORTS_TRIED = 20  # a busy port moves the dashboard up to this many ports on
DASHBOARD_START_TIMEOUT = 180.0  # seconds to wait for the page before saying it is late


def _reopen_command(logdir: Path) -> str:
    return f"{command_name()} dashboard {shlex.quote(str(logdir))}"


def _free_port(first: int) -> int | None:
    """The first port from ``first`` that 127.0.0.1 can bind, or None within the range."""
    for port in range(first, min(first + DASHBOARD_PORTS_TRIED, 65536)):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


def _start_dashboard(logdir: Path, port: int) -> str | None:
    """Serve ``logdir`` from a child process (never from the training process itself).

    A busy ``port`` moves to the next free one (and says so); the URL is printed by a
    thread once the page answers, so training never waits for it. Returns the URL, or None
    when no dashboard could be started: that is reported and training goes on.
    """
    key = (str(logdir.resolve()), port)
    running = _DASHBOARDS.get(key)
    if running is not None and running.process.poll() is None:
        return running.url
    reopen = _reopen_command(logdir)
    free = _free_port(port)
    if free is None:
        last = port + DASHBOARD_PORTS_TRIED - 1
        print(
            f"collapsewatch: ports {port}–{last} are all busy, so no dashboard was started; "
            f"training goes on. Open one later with: {reopen} --port PORT",
            flush=True,
        )
        return None
    if free != port:
        print(f"collapsewatch: port {port} is busy; the dashboard uses port {free}", flush=True)
    command = [sys.executable, "-m", "collapsewatch", "dashboard", str(logdir)]
    command += ["--port", str(free), "--exit-with", str(os.getpid())]
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except OSError as error:
        print(f"collapsewatch: cannot start the dashboard ({error}); open it with: {reopen}")
        return None
    url = f"http://127.0.0.1:{free}"
    dashboard = _Dashboard(process, url, logdir)
    dashboard.announcer = threading.Thread(
        target=_announce, args=(dashboard,), name="collapsewatch-dashboard", daemon=True
    )
    _DASHBOARDS[key] = dashboard
    dashboard.announcer.start()
    return url


def _announce(dashboard: _Dashboard) -> None:
    """Print the dashboard's URL once its page answers, or why it never did."""
    deadline = time.monotonic() + DASHBOARD_START_TIMEOUT
    while time.monotonic() < deadline:
        code = dashboard.process.poll()
        if code is not None:
            print(
                f"collapsewatch: the dashboard stopped before it answered (exit code {code});"
                f" open it with: {_reopen_command(dashboard.logdir)}",
                flush=True,
            )
            return
        try:
            with urllib.request.urlopen(dashboard.url + "/", timeout=2) as page:
                if page.status == 200:
                    print(f"collapsewatch dashboard: {dashboard.url}", flush=True)
                    dashboard.announced.set()
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    print(
        f"collapsewatch: the dashboard at {dashboard.url} has not answered after"
        f" {DASHBOARD_START_TIMEOUT:.0f} s; it may still be starting",
        flush=True,
    )


def _stop_dashboards() -> None:
    """Stop the dashboards this process started; say how to reopen each run directory."""
    for dashboard in _DASHBOARDS.values():
        if dashboard.process.poll() is None:
            if dashboard.announcer is not None:  # an answering page gets its URL line first
                dashboard.announcer.join(timeout=3)
            dashboard.process.terminate()
            print(
                f"collapsewatch: the dashboard stopped with training; reopen it with:"
                f" {_reopen_command(dashboard.logdir)}",
                flush=True,
            )
    _DASHBOARDS.clear()


@atexit.register
def _shutdown() -> None:
    for watcher in list(_OPEN_WATCHERS):
        watcher.close("interrupted")
    _stop_dashboards()


def _on_device(batch: Any, device: torch.device) -> Any:
    """A model input (a tensor, or a mapping or sequence of them, e.g. tokenizer features)
    moved to ``device``; anything else as it is."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _on_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_on_device(v, device) for v in batch)
    return batch


def _device_of(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _check_probe(probe: Any, labels: Any, every: Any) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"probe_every must be a positive int, got {every!r}")
    if labels is None:
        return
    if probe is None:
        raise ValueError("probe_labels needs probe= (the batch they label)")
    if not (isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point()):
        raise ValueError(
            f"probe_labels must be a 1-D integer tensor, got "
            f"{getattr(labels, 'dtype', type(labels).__name__)} of shape "
            f"{tuple(getattr(labels, 'shape', ()))}"
        )
    if isinstance(probe, Tensor) and probe.shape[0] != labels.shape[0]:
        raise ValueError(
            f"probe_labels has {labels.shape[0]} labels for a probe of {probe.shape[0]} rows"
        )


def _claim_run_name(path: Path, resume: bool) -> bool:
    """Whether to resume ``path``: True if it exists and ``resume``; an existing run that
    never recorded a step and is not running is removed; any other existing run raises."""
    if not path.exists():
        return False
    if resume:
        return True
    summary = _summary_or_none(path)
    if summary is not None and summary.recorded_steps == 0 and summary.status != "running":
        for leftover in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))):
            leftover.unlink(missing_ok=True)
        return False
    what = (
        ""
        if summary is None
        else f" ({summary.recorded_steps} recorded steps up to step {summary.last_step}, "
        f"{summary.status})"
    )
    raise FileExistsError(
        f"run {path.stem!r} already exists in {str(path.parent)!r}{what}; continue it with "
        "watch(..., resume=True), pick another name, or leave run= out for a unique "
        "timestamped one"
    )


def _summary_or_none(path: Path) -> RunSummary | None:
    try:
        with RunReader(path) as reader:
            return reader.summary()
    except RunFileError:
        return None


def watch(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    *,
    logdir: str | os.PathLike[str] = "runs",
    run: str | None = None,
    margin: float | None = None,
    every: Every = "auto",
    rank_every: int = 50,
    snapshot_every: int = 100,
    snapshot_size: int = 256,
    embedding: Callable[[Any], Tensor] | None = None,
    loss_value: Callable[[Any], Any] | None = None,
    resume: bool = False,
    config: Mapping[str, Any] | None = None,
    distance: Distance | None = None,
    commit_every: int | None = None,
    commit_interval: float = 5.0,
    on_collapse: OnCollapse = "warn",
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    detector: DetectorConfig | None = None,
    dashboard: bool | int = False,
    log_to: Any = None,
    difficulty_every: Every = "auto",
    probe: Any = None,
    probe_labels: Tensor | None = None,
    probe_every: int = 50,
    overhead: float = 0.03,
) -> Watcher:
    """Attach collapse monitoring to ``model`` and ``loss_fn``; returns the :class:`Watcher`.

    Use it as a context manager, or call ``close()`` when training ends::

        with cw.watch(model, loss_fn, logdir="runs", run="baseline") as w:
            for x, y in loader:
                loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        run = cw.load_run(w.path)

    Args:
        model: the embedding model (any ``nn.Module``; DDP- and ``torch.compile``-wrapped too).
        loss_fn: the loss module, called as ``(embeddings, labels)`` or
            ``(anchor, positive, negative)``.
        logdir: directory of run files (created if missing; keep it on a local disk).
        run: the run's name (letters, digits, ``._-``); default a timestamped unique name.
            A run of that name that recorded no step (it failed before its first one) is
            replaced; one with steps is an error unless ``resume``.
        margin: the loss's margin; read from the loss (``margin``, ``triplet_margin``, PML's
            ``neg_margin``) when omitted. A loss without one (NTXent, InfoNCE) is watched
            margin-free: no plateau rule, margin-relative fractions NaN, contraction judged
            against the run's own peak.
        every: record every k-th step; "auto" picks k from a timing of the first steps so
            that recording costs at most half of ``overhead`` of the step time, k ≤ half the
            detector's window (1 under torch.distributed). The k chosen is in the run's
            metadata. See collapsewatch.cadence.
        rank_every: measure the effective rank at most every k steps (NaN in between; 0 never).
        snapshot_every: store an embedding sample at most every k steps (0: never).
        snapshot_size: rows per embedding sample.
        embedding: picks the (N, D) embedding tensor out of the model's output; by default
            the tensor itself, a dict's ``"sentence_embedding"``/``"embeddings"``/
            ``"embedding"``, or a tuple of (N, D) tensors concatenated.
        loss_value: picks the scalar loss out of the loss's output; by default the tensor
            itself, the first tensor of a tuple/list, or a dict's ``"loss"``.
        resume: continue run ``run`` if it exists: its steps are replayed through the
            detector and new steps are numbered after them.
        config: free-form JSON-serialisable dict saved with the run.
        distance: the distance to compute a foreign loss's statistics under; found from the
            loss when omitted (Euclidean by default).
        commit_every: copy to host and commit every k recorded steps (default 50; 1 when
            rescuing, so that a collapse is acted on within one recording interval) ...
        commit_interval: ... or every this many seconds, whichever comes first. A killed
            process loses at most this much.
        on_collapse: "warn" (a :class:`CollapseWarning`), "raise" (a :class:`CollapseError`
            from the next loss call), "ignore", "rescue" (restore the last healthy state of
            the model and ``optimizer`` and apply a remedy: :class:`collapsewatch.Rescue`,
            which may also be passed itself for other settings), or a callable given the
            collapse ``Event``; acted on once per onset of a collapse and of a divergence
            ("diverged": a non-finite loss or embedding, or exploding norms).
        optimizer: the run's optimizer, for ``on_collapse="rescue"``.
        scheduler: an LR scheduler to restore and adjust with it (``on_collapse="rescue"``).
        detector: thresholds of the collapse detector.
        dashboard: True (port 8050) or a port: serve this logdir's dashboard from a child
            process (the next free port if that one is busy), print its URL once the page
            answers and, when the process exits, how to reopen it. Never fails training.
        log_to: also send the metrics (as ``collapsewatch/<column>``, NaN left out), events
            and snapshots to a ``SummaryWriter``, a W&B run, an MLflow run (or the ``mlflow``
            module), a callable ``(metrics, step)``, or a list of these; written from the
            background thread after each commit. See docs/trackers.md.
        difficulty_every: count easy / semi-hard / hard triplets (a sort of every anchor's
            row, the one costly statistic) at most every k steps, NaN in between; "auto"
            picks k from a timing of the first steps so that they cost at most half of
            ``overhead`` of the step time (10 under torch.distributed).
        overhead: the share of the step time watching may take ("auto" intervals), half for
            recording and half for the difficulty counts.
        probe: a fixed held-out batch, as the model takes it (``model(probe)``; e.g. a
            (N, …) tensor, or a sentence-transformers features dict): every ``probe_every``
            steps (at the first recorded step from then) it goes through the model in eval
            mode under ``no_grad``, and its spread, direction spread and kNN accuracy are
            recorded as the ``probe_*`` columns; the detector then also judges contraction
            on it. Use it when dropout or augmentation keep the training batches apart
            while the model itself has collapsed. Costs one forward pass of N rows.
        probe_labels: (N,) integer labels of the probe's rows, for ``probe_knn_accuracy``
            (leave-one-out 1-nearest neighbour).
        probe_every: the probe's interval in training steps.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loss_fn, torch.nn.Module):
        raise TypeError(
            f"loss_fn must be a torch.nn.Module (hooks attach to modules), got "
            f"{type(loss_fn).__name__}; wrap a plain function in an nn.Module"
        )
    check_interval("every", every)
    check_interval("difficulty_every", difficulty_every)
    check_overhead(overhead)
    if on_collapse == "rescue":
        if optimizer is None:
            raise ValueError(
                "on_collapse='rescue' needs the run's optimizer: watch(..., optimizer=opt, "
                "on_collapse='rescue')"
            )
        on_collapse = Rescue(optimizer, scheduler=scheduler)
    elif optimizer is not None or scheduler is not None:
        raise ValueError("optimizer= and scheduler= are for on_collapse='rescue'")
    if commit_every is None:
        commit_every = 1 if isinstance(on_collapse, Rescue) else 50
    if not isinstance(commit_every, int) or commit_every < 1:
        raise ValueError(f"commit_every must be an integer ≥ 1, got {commit_every!r}")
    for option, value in {
        "rank_every": rank_every,
        "snapshot_every": snapshot_every,
        "snapshot_size": snapshot_size,
    }.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{option} must be an integer ≥ 0, got {value!r}")
    if not (commit_interval > 0):
        raise ValueError(f"commit_interval must be > 0 seconds, got {commit_interval!r}")
    if on_collapse not in ("warn", "raise", "ignore") and not callable(on_collapse):
        raise ValueError(
            f"on_collapse must be 'warn', 'raise', 'ignore', 'rescue', a Rescue or a callable, "
            f"got {on_collapse!r}"
        )
    detector_config = detector or DetectorConfig()
    _check_probe(probe, probe_labels, probe_every)
    sinks = make_sinks(log_to)
    margin_spec = find_margin(loss_fn, margin)
    distance_spec = find_distance(loss_fn, distance)
    if margin_spec.in_batch:
        measured = f"the {distance_spec.distance.replace('_', ' ')} distance" + (
            " of the L2-normalised embeddings" if distance_spec.normalize else ""
        )
        unseparated = (
            " and, for a run that has never separated, against 1 (the cosine distance of "
            "unrelated directions)"
            if distance_spec.distance == "cosine"
            else ""
        )
        warnings.warn(
            f"watch(): {type(loss_fn).__name__} compares each anchor with the batch's other "
            f"rows (in-batch negatives: {margin_spec.candidates}) and has no margin: the "
            f"margin-relative columns ({', '.join(MARGIN_RELATIVE)}) are NaN; "
            "loss_margin_ratio is the loss over ln(in-batch candidates), its value once "
            "every embedding is the same, and the plateau is checked there; the spread is "
            f"measured by {measured} and judged against the run's own peak{unseparated}.",
            RuntimeWarning,
            stacklevel=2,
        )
    elif margin_spec.margin is None:
        if margin_spec.plateau is None:
            judged = (
                "the plateau rule and loss_margin_ratio are off (NaN) and collapse is judged "
                "from the contraction of the embeddings against the run's own peak"
            )
        else:
            judged = f"the plateau is checked at its soft-margin level {margin_spec.plateau:.4g}"
        warnings.warn(
            f"watch(): {type(loss_fn).__name__} has no margin (looked for margin, "
            f"triplet_margin, neg_margin): the margin-relative columns "
            f"({', '.join(MARGIN_RELATIVE)}) are NaN; {judged}. Pass margin= if the loss has "
            "one under another name.",
            RuntimeWarning,
            stacklevel=2,
        )
    rank, world_size = _distributed()
    name = check_run_name(run) if run is not None else _default_run_name(loss_fn)
    if rank == 0:
        resume = _claim_run_name(run_path(logdir, name), resume)
    if world_size > 1:
        # Every rank must report the same run path; rank 0's name wins.
        shared = [name]
        dist.broadcast_object_list(shared, src=0)
        name = shared[0]
    watcher = Watcher(
        model=model,
        loss_fn=loss_fn,
        logdir=Path(logdir),
        name=name,
        margin_spec=margin_spec,
        distance=distance_spec,
        rank_every=rank_every,
        snapshot_every=snapshot_every,
        snapshot_size=snapshot_size,
        embedding=embedding or default_embedding,
        loss_value=loss_value or default_loss_value,
        resume=resume,
        commit_every=commit_every,
        commit_interval=float(commit_interval),
        on_collapse=on_collapse,
        cadence=Cadence(
            every,
            difficulty_every,
            overhead,
            _device_of(model),
            distributed=world_size > 1,
            # A collapse must still span two recorded steps of the detector's window.
            max_every=int(detector_config.window // 2),
        ),
        detector=CollapseDetector(
            detector_config,
            loss_family(loss_fn),
            loss_traits(loss_fn, distance_spec),
            distance=distance_spec.distance,
        ),
        config=dict(config or {}),
        sinks=sinks,
        probe=probe,
        probe_labels=probe_labels,
        probe_every=probe_every,
    )
    if isinstance(on_collapse, Rescue):
        on_collapse.attach(watcher)
    if dashboard and rank == 0:
        port = 8050 if dashboard is True else int(dashboard)
        try:
            _start_dashboard(Path(logdir), port)
        except Exception as error:  # a convenience: never lose the run to it
            print(
                f"collapsewatch: no dashboard ({error}); open one with: "
                f"{_reopen_command(Path(logdir))}"
            )
    return watcher
