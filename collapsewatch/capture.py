"""Capture: the hooks on the model and the loss, and the step record they build.

A *step* is one call of the loss while autograd is enabled (calls under ``torch.no_grad()``
or ``inference_mode``, e.g. validation, are not steps). A forward hook on the model keeps
the embeddings it produced since the previous step; hooks on the loss read its call (the
embeddings and labels, or anchor / positive / negative: :func:`adapters.parse_loss_call`),
its output and, for a loss that reports them (:class:`~collapsewatch.losses.ReportsStatistics`),
the statistics its own pass computed. Each recorded step becomes a :class:`StepRecord` of
device tensors, handed to the commit pipeline twice: when it starts (before the loss runs,
so a step whose loss raises is still recorded) and when the loss has returned.

Everything here runs in the training thread, inside the user's forward passes: no threads,
no store, no host sync. A failure to read something warns once and never raises into the
training step.
"""

from __future__ import annotations

import numbers
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from collapsewatch.adapters import DistanceSpec, LossCall, MarginSpec, find_labels, parse_loss_call
from collapsewatch.cadence import Cadence
from collapsewatch.columns import LABEL_COLUMNS
from collapsewatch.losses.base import ReportsStatistics
from collapsewatch.losses.functional import AnchorSampler, TripletStatistics, triplet_statistics
from collapsewatch.statistics import (
    embedding_sums,
    explicit_triplet_statistics,
    loss_changes,
    nonfinite_counts,
    probe_statistics,
    rank_step_sums,
    unlabelled_statistics,
)

EAGER_ELEMENTS = 1 << 18
"""Embeddings with more entries are reduced in their own step: the kernels then cost more
than launching them, and keeping a commit's worth of them would hold device memory."""


@dataclass
class StepRecord:
    """One recorded step, still on the device.

    The embedding part is taken before the loss runs, so a step whose loss raises (e.g. on
    NaN embeddings) is still recorded; the loss and its statistics are added after it.
    Small embeddings are kept (a copy) and reduced with the rest of their commit by
    :func:`collapsewatch.pipeline.stack_step_vectors`; large ones are reduced at once
    (``EAGER_ELEMENTS``).
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
    reduced: tuple[Tensor, Any] | None = None  # the step's pending all_reduce, under DDP
    # (4,) non-finite [losses, embedding entries] of the unrecorded steps before this one,
    # and [Σ |Δ loss|, number of Δ loss] over the loss calls since the previous record.
    skipped: Tensor | None = None
    # The spread of embeddings the loss made itself from unreadable arguments (no labels).
    unlabelled: TripletStatistics | None = None
    probe: Tensor | None = None  # (4,) statistics.probe_statistics, on probe steps
    plateau: float | Tensor | None = None  # the loss at zero distances for this call


@dataclass(frozen=True)
class CaptureSettings:
    """What the hooks read, record and how often (resolved from :class:`WatchOptions`)."""

    margin_spec: MarginSpec
    distance: DistanceSpec
    embedding: Callable[[Any], Tensor]
    loss_value: Callable[[Any], Any]
    rank_every: int
    snapshot_every: int
    snapshot_size: int
    probe: Any
    probe_labels: Tensor | None
    probe_every: int


_LIBRARY_DIRS = tuple(
    # Both are regular packages, loaded from files.
    str(Path(module.__file__).parent)  # type: ignore[arg-type]
    for module in (torch, sys.modules["collapsewatch"])
)


def caller_stacklevel() -> int:
    """The stacklevel that attributes a warning to the user's code calling the loss."""
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class WarnOnce:
    """``RuntimeWarning``s given at most once per key for one watcher, attributed to the
    user's code (training thread only)."""

    def __init__(self) -> None:
        self._given: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self._given:
            self._given.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=caller_stacklevel())


class Capture:
    """The three hooks of one watcher and the records they build (training thread only).

    Args:
        model, loss_fn: the watched modules.
        settings: what to read and how often.
        cadence: which steps are recorded and count difficulties.
        rank: this process's rank (snapshots and the probe are rank 0's).
        step: the first step's number (after a resume: after the stored ones).
        dim: the embedding dimension, if known (a resumed run's).
        warn: the watcher's once-per-key warnings.
        before_call: run at every loss call before anything else (acting on collapse).
        started, finished: given each record when it starts and once its loss returned.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: torch.nn.Module,
        settings: CaptureSettings,
        cadence: Cadence,
        *,
        rank: int,
        step: int,
        dim: int | None,
        warn: WarnOnce,
        before_call: Callable[[], None],
        started: Callable[[StepRecord], None],
        finished: Callable[[StepRecord], None],
    ) -> None:
        self.model, self.loss_fn, self.settings, self.cadence = model, loss_fn, settings, cadence
        self.rank = rank
        self.step = step  # loss calls seen so far: the next step's number
        self.dim = dim  # the embedding dimension, fixed by the first recorded step
        self._warn = warn
        self._before_call, self._started, self._finished = before_call, started, finished
        self._current: StepRecord | None = None
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
        # The loss values since the last recorded step (its own first): their consecutive
        # changes are summed at the next recorded step, in one go (no kernel per call).
        self._losses: list[Tensor] = []
        self._recording = False  # whether the current loss call is a recorded step
        self._call_plateau: float | Tensor | None = None  # the recorded call's plateau
        self._last_rank_step: int | None = None
        self._last_snapshot_step: int | None = None
        self._last_probe_step: int | None = None
        # A loss that reports its own statistics (the bundled ones, or any loss following
        # the ReportsStatistics protocol) is switched per recorded step and read.
        self._reporter = loss_fn if isinstance(loss_fn, ReportsStatistics) else None
        # What remove() puts back: the hooks switch both per recorded step.
        self._original_switches = (
            None
            if self._reporter is None
            else (self._reporter.statistics, self._reporter.difficulty)
        )
        self._anchor_sampler = AnchorSampler()  # a foreign loss's difficulty counts
        self._handles = [
            model.register_forward_hook(self._model_hook),
            loss_fn.register_forward_pre_hook(self._loss_pre_hook, with_kwargs=True),
            loss_fn.register_forward_hook(self._loss_hook, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Remove the hooks and put the loss's statistics switches back as they were."""
        for handle in self._handles:
            handle.remove()
        if self._reporter is not None and self._original_switches is not None:
            self._reporter.statistics, self._reporter.difficulty = self._original_switches

    # ----------------------------------------------------------------------------- hooks
    def _model_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if self._in_loss:
            if self._deferred is None:
                return
            into: list[Tensor] | None = self._inside
        elif self.cadence.records(self.step):
            into = self._captured
        else:
            into = None
        try:
            embeddings = self.settings.embedding(output)
            if not (isinstance(embeddings, Tensor) and embeddings.dim() == 2):
                shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else None
                raise TypeError(
                    f"watch() needs (N, D) embeddings from the model, got "
                    f"{type(embeddings).__name__} of shape {shape}; pass embedding= to pick "
                    "or reshape them"
                )
        except Exception as error:  # a monitor must not break the user's forward pass
            self._warn(
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
        self._before_call()
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
            self._call_plateau = self.settings.margin_spec.plateau_of_call(args, kwargs)
        if not self._recording:
            if self._reporter is not None:
                # Statistics cost a sort for batch-hard: compute them only when recorded.
                self._reporter.statistics = False
            return
        self._difficulty = self.cadence.counts_difficulty(step)
        if self._reporter is not None:
            self._reporter.statistics = True
            self._reporter.difficulty = self._difficulty
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
                loss = self._read_loss(output)
                self._count_skipped(loss, [])
            # Kept for the next recorded step; an unknown value breaks the chain of calls.
            if loss is None:
                self._losses.clear()
            else:
                self._losses.append(loss)
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
            self._attach_skipped(record)
            call = record.call
            record.triplet = self._triplet_statistics(call, self._difficulty) or record.unlabelled
            if self.cadence.wants_measurement and call is not None and call.is_labelled:
                self.cadence.measure(
                    lambda: self._labelled_statistics(call, with_difficulty=False),
                    lambda: self._labelled_statistics(call, with_difficulty=True),
                )
            record.call = None  # do not keep the loss's inputs (and their graph) alive
            self._finished(record)

    def _read_loss(self, output: Any) -> Tensor | None:
        try:
            value = self.settings.loss_value(output)
        except Exception as error:  # a bad picker must not break the training step
            value, reason = None, f"loss_value raised {error!r}"
        else:
            reason = f"its output is a {type(output).__name__}"
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = torch.tensor(float(value), dtype=torch.float64)
        if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
            # One number per step: the mean of an unreduced (reduction="none") loss.
            return value.detach() if value.dim() == 0 else value.detach().mean()
        self._warn(
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
            self._warn("skipped", f"watch(): cannot count non-finite values: {error!r}")

    def _attach_skipped(self, record: StepRecord) -> None:
        """Give a recorded step what the calls since the previous one left: their non-finite
        counts, and the changes between consecutive loss values (every call, recorded or
        not: the plateau band's noise), this step's loss included."""
        earlier, self._losses = self._losses, []
        changes = None
        if record.loss is not None:
            self._losses = [record.loss]
            try:
                changes = loss_changes([*earlier, record.loss])
            except Exception as error:  # a monitor must not break the user's training step
                self._warn("loss change", f"watch(): cannot measure the loss's change: {error!r}")
        counts, self._skipped = self._skipped, None
        if counts is None and changes is None:
            return
        kept = record.embeddings if record.embeddings is not None else record.sums
        assert kept is not None  # _start_record keeps the embeddings or their sums
        device = kept.device
        none = torch.zeros(2, dtype=torch.float64, device=device)
        record.skipped = torch.cat(
            [
                none if counts is None else counts.to(device),
                none if changes is None else changes.to(device),
            ]
        )

    def _start_record(
        self, step: int, call: LossCall | None, captured: list[Tensor]
    ) -> StepRecord | None:
        settings = self.settings
        if captured:
            embeddings = captured[0] if len(captured) == 1 else torch.cat(captured)
        elif call is not None:
            embeddings = call.all_embeddings()
        else:
            self._warn(
                "signature",
                f"watch(): {type(self.loss_fn).__name__} was called with arguments it does not "
                "recognise and the model produced no embeddings; this step is not recorded",
            )
            return None
        if self.dim is None:
            self.dim = embeddings.shape[1]
        elif embeddings.shape[1] != self.dim:
            self._warn(
                "dim",
                f"watch(): embedding dimension changed from {self.dim} to "
                f"{embeddings.shape[1]}; such steps are not recorded",
            )
            return None
        if call is None:
            self._warn(
                "signature",
                f"watch(): {type(self.loss_fn).__name__} is not called as (embeddings, "
                "labels), and no labels can be read from its call: the "
                "embeddings the model made during the call are recorded (their spread under "
                f"the {settings.distance.distance} distance, variance, direction spread, rank), "
                "but no triplet difficulty and no label columns "
                f"({', '.join(LABEL_COLUMNS)})",
            )
        elif not call.is_labelled:
            self._warn(
                "labels",
                f"watch(): {type(self.loss_fn).__name__} is called with (anchor, positive, "
                f"negative) and no labels: {', '.join(LABEL_COLUMNS)} are NaN, the spread is "
                "judged over all pairs and dimensional collapse against the embedding "
                "dimension, not the classes",
            )
        labels = call.labels if call is not None else None
        if labels is not None and labels.shape[0] != embeddings.shape[0]:
            labels = None  # rows the labels do not describe (e.g. several model calls)
        gram = None  # on rank steps: the Gram and the label-aware geometry sums
        if _due(step, self._last_rank_step, settings.rank_every):
            self._last_rank_step = step
            gram = rank_step_sums(embeddings, labels)
        snapshot = None
        if self.rank == 0 and _due(step, self._last_snapshot_step, settings.snapshot_every):
            self._last_snapshot_step = step
            # A copy: the writer reads it later, after the loop may have reused the memory.
            rows = embeddings[: settings.snapshot_size].detach().float().clone()
            sample = None if labels is None else labels[: settings.snapshot_size].clone()
            snapshot = (rows, sample)
        kept: Tensor | None = embeddings.detach().clone()
        sums = None
        if embeddings.numel() > EAGER_ELEMENTS:
            kept, sums = None, embedding_sums(embeddings)
        record = StepRecord(step, time.time(), call, kept, sums, gram, snapshot)
        record.plateau = self._call_plateau
        if (
            self.rank == 0
            and settings.probe is not None
            and _due(step, self._last_probe_step, settings.probe_every)
        ):
            self._last_probe_step = step
            record.probe = self._run_probe()
        if call is None:
            record.unlabelled = unlabelled_statistics(embeddings, settings.distance.distance)
        self._started(record)
        return record

    def _run_probe(self) -> Tensor | None:
        """The probe batch through the model in eval mode under no_grad (dropout and
        batch-norm updates off), on the unwrapped module: no DDP hooks, no recompilation."""
        module = unwrap_model(self.model)
        training = module.training
        try:
            module.eval()
            with torch.no_grad():
                batch = on_device(self.settings.probe, device_of(module))
                embeddings = self.settings.embedding(module(batch))
                labels = self.settings.probe_labels
                if labels is not None:
                    labels = labels.to(embeddings.device)
                return probe_statistics(embeddings, labels, self.settings.distance.distance)
        except Exception as error:  # a monitor must not break the training step
            self._warn(
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
        if self._reporter is not None:
            return self._reporter.last_stats
        if call is None:
            return None
        if call.is_labelled:
            return self._labelled_statistics(call, with_difficulty=difficulty)
        return explicit_triplet_statistics(
            *call.triplet(),
            self._margin_or_any,
            self.settings.distance.distance,
        )

    def _labelled_statistics(self, call: LossCall, with_difficulty: bool) -> TripletStatistics:
        """A foreign loss's statistics of an (embeddings, labels) call; also what the
        difficulty interval is timed with."""
        embeddings = call.embeddings
        assert embeddings is not None and call.labels is not None
        if self.settings.distance.normalize:
            embeddings = torch.nn.functional.normalize(embeddings.float(), dim=1)
        return triplet_statistics(
            embeddings,
            call.labels,
            self._margin_or_any,
            distance=self.settings.distance.distance,
            with_difficulty=with_difficulty,
            anchor_sampler=self._anchor_sampler,
        )

    @property
    def _margin_or_any(self) -> float:
        # Without a margin any m will do: derive_metrics keeps only the columns that do not
        # depend on it (frac_hard, hardest-pair means, distances).
        margin = self.settings.margin_spec.margin
        return 1.0 if margin is None else margin


def _due(step: int, last: int | None, every: int) -> bool:
    return every > 0 and (last is None or step - last >= every)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside ``torch.compile`` (``_orig_mod``) and DDP/DataParallel
    (``module``) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        elif isinstance(compiled := getattr(model, "_orig_mod", None), torch.nn.Module):
            model = compiled
        else:
            return model


def on_device(batch: Any, device: torch.device) -> Any:
    """A model input (a tensor, or a mapping or sequence of them, e.g. tokenizer features)
    moved to ``device``; anything else as it is."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: on_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(on_device(v, device) for v in batch)
    return batch


def device_of(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device
