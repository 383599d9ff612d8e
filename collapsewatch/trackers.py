"""Send a run's metrics, events and embedding snapshots to the tracker the user already has.

``watch(..., log_to=...)`` turns each target into a *sink* (:func:`make_sinks`): a
TensorBoard ``SummaryWriter``, a Weights & Biases run, an MLflow run, or any callable
``(metrics, step)``. The watcher's background writer thread feeds every sink after each
commit of the run file, which stays the source of truth; :func:`replay` feeds a saved run
through the same sinks (``collapsewatch export``).

Metric names are the run's columns prefixed ``collapsewatch/``. A NaN value (a metric not
measured at that step, such as ``effective_rank`` between measurements) is left out rather
than logged. No tracker library is imported until a sink for it is made.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import pandas as pd

from collapsewatch.states import RunState
from collapsewatch.store import Event, RunReader, Snapshot

PREFIX = "collapsewatch/"
_MLFLOW_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_WANDB_LEVELS: dict[str, str] = {
    RunState.DIVERGED: "ERROR",
    RunState.COLLAPSED: "ERROR",
    RunState.WARNING: "WARN",
}


class SinkError(RuntimeError):
    """A ``log_to`` sink failed; the run file is not affected."""

    def __init__(self, kind: str, error: Exception) -> None:
        super().__init__(f"logging to {kind} failed: {error!r} (the run file is unaffected)")
        self.kind = kind


class Sink(Protocol):
    """Where ``watch(log_to=...)`` sends what it writes to the run file."""

    kind: str

    def log_metrics(self, frame: pd.DataFrame) -> None:
        """Log rows of metrics (columns ``step``, ``time`` and the metric columns)."""

    def log_events(self, events: Sequence[Event]) -> None:
        """Log detector events."""

    def log_snapshot(self, step: int, embeddings: np.ndarray, labels: np.ndarray | None) -> None:
        """Log a (n, D) embedding sample of step ``step`` with its (n,) labels or None."""

    def close(self) -> None:
        """Flush what was logged; the user's writer or run stays open."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module``, or raise an ImportError saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not installed; install it with: pip install 'collapsewatch[{extra}]'"
        ) from error


def metric_rows(frame: pd.DataFrame) -> Iterator[tuple[int, float, dict[str, float]]]:
    """``(step, time, {"collapsewatch/<column>": value})`` per row, NaN values left out."""
    names = [c for c in frame.columns if c not in ("step", "time")]
    values = frame[names].to_numpy(dtype="float64", na_value=np.nan)
    keys = [PREFIX + name for name in names]
    for step, time, row in zip(frame["step"].tolist(), frame["time"].tolist(), values, strict=True):
        metrics = {k: v for k, v in zip(keys, row.tolist(), strict=True) if not math.isnan(v)}
        yield int(step), float(time), metrics


def event_text(event: Event) -> str:
    """One event as a short Markdown paragraph."""
    text = f"**{event.kind}** at step {event.step} (state: {event.state}): {event.message}"
    return f"{text} {event.suggestion}" if event.suggestion else text


class TensorBoardSink:
    """Scalars, a text summary of the events and the projector, on a ``SummaryWriter``.

    Any object with ``add_scalar``, ``add_text``, ``add_embedding`` and ``flush`` works
    (``torch.utils.tensorboard`` or ``tensorboardX``). Wall times are the run's own.
    """

    kind = "tensorboard"

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log_metrics(self, frame: pd.DataFrame) -> None:
        # torch's SummaryWriter takes one event per step holding every scalar: what
        # add_scalar writes, merged. ~20 add_scalar calls a step kept this thread on the
        # interpreter lock long enough to slow the training step by ~15 % on a small model.
        file_writer = getattr(self.writer, "_get_file_writer", None)
        for step, time, metrics in metric_rows(frame):
            if file_writer is None:  # tensorboardX and other lookalikes
                for tag, value in metrics.items():
                    self.writer.add_scalar(tag, value, global_step=step, walltime=time)
                continue
            from tensorboard.compat.proto.summary_pb2 import Summary

            values = [Summary.Value(tag=tag, simple_value=value) for tag, value in metrics.items()]
            file_writer().add_summary(Summary(value=values), step, time)

    def log_events(self, events: Sequence[Event]) -> None:
        for event in events:
            self.writer.add_text(
                PREFIX + "events", event_text(event), global_step=event.step, walltime=event.time
            )

    def log_snapshot(self, step: int, embeddings: np.ndarray, labels: np.ndarray | None) -> None:
        self.writer.add_embedding(
            embeddings,
            metadata=None if labels is None else labels.tolist(),
            global_step=step,
            tag=PREFIX + "embeddings",
        )

    def close(self) -> None:
        self.writer.flush()


class WandbSink:
    """History rows against a ``collapsewatch/step`` axis, alerts, and embedding Tables.

    The rows go in through ``run.log`` without ``step=``: the watcher's thread writes after
    the training loop has moved on, and W&B drops a step older than its current one, so the
    charts use their own step metric instead (W&B's way of logging out of order).
    """

    kind = "wandb"

    def __init__(self, run: Any) -> None:
        self.run = run
        self._axis_defined = False

    def _log(self, step: int, values: dict[str, Any]) -> None:
        if not self._axis_defined:
            self.run.define_metric(PREFIX + "step")
            self.run.define_metric(PREFIX + "*", step_metric=PREFIX + "step")
            self._axis_defined = True
        self.run.log({PREFIX + "step": step, **values})

    def log_metrics(self, frame: pd.DataFrame) -> None:
        for step, _, metrics in metric_rows(frame):
            self._log(step, metrics)

    def log_events(self, events: Sequence[Event]) -> None:
        for event in events:
            self.run.alert(
                title=f"collapsewatch: {event.kind} at step {event.step}",
                text=event_text(event),
                level=_WANDB_LEVELS.get(event.state, "INFO"),
            )
            self.run.summary[PREFIX + "state"] = event.state

    def log_snapshot(self, step: int, embeddings: np.ndarray, labels: np.ndarray | None) -> None:
        wandb = require("wandb", "wandb")
        # One numeric column per dimension: what W&B's 2D projection panel projects.
        columns = [f"d{i}" for i in range(embeddings.shape[1])]
        rows = embeddings.tolist()
        if labels is not None:
            columns = ["label", *columns]
            rows = [[label, *row] for label, row in zip(labels.tolist(), rows, strict=True)]
        self._log(step, {PREFIX + "embeddings": wandb.Table(columns=columns, data=rows)})

    def close(self) -> None:
        """Nothing to flush: the run's own service writes it; ``finish()`` stays the user's."""


class MlflowSink:
    """Metrics by ``log_batch`` with the run's steps and times, events as run tags.

    Each event sets ``collapsewatch/event/<step>/<kind>`` and ``collapsewatch/state``.
    MLflow has no embedding view: snapshots stay in the run file.
    """

    kind = "mlflow"

    def __init__(self, run_id: str) -> None:
        require("mlflow", "mlflow")
        from mlflow import MlflowClient

        self.run_id = run_id
        # Bound to the tracking URI in force now: the writer thread logs later.
        self.client = MlflowClient()

    def log_metrics(self, frame: pd.DataFrame) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(key, value, round(time * 1000), step)
            for step, time, values in metric_rows(frame)
            for key, value in values.items()
        ]
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _MLFLOW_BATCH])

    def log_events(self, events: Sequence[Event]) -> None:
        for event in events:
            key = f"{PREFIX}event/{event.step}/{event.kind}"
            self.client.set_tag(self.run_id, key, event_text(event))
            self.client.set_tag(self.run_id, PREFIX + "state", event.state)

    def log_snapshot(self, step: int, embeddings: np.ndarray, labels: np.ndarray | None) -> None:
        """Not logged (see the class docstring)."""

    def close(self) -> None:
        """Nothing to flush: every call above is written when it returns."""


class CallbackSink:
    """Calls ``fn(metrics, step)`` once per recorded step; events go to ``on_collapse``."""

    kind = "callable"

    def __init__(self, fn: Callable[[dict[str, float], int], Any]) -> None:
        self.fn = fn

    def log_metrics(self, frame: pd.DataFrame) -> None:
        for step, _, metrics in metric_rows(frame):
            self.fn(metrics, step)

    def log_events(self, events: Sequence[Event]) -> None:
        """Not passed on: ``watch(on_collapse=fn)`` is the callable for events."""

    def log_snapshot(self, step: int, embeddings: np.ndarray, labels: np.ndarray | None) -> None:
        """Not passed on: the callable takes scalars only."""

    def close(self) -> None:
        """Nothing to flush."""


def _root_module(target: Any) -> str:
    name = target.__name__ if isinstance(target, ModuleType) else type(target).__module__
    return name.split(".")[0]


def _make_sink(target: Any) -> Sink:
    root = _root_module(target)
    if isinstance(target, ModuleType) and root == "mlflow":
        active = target.active_run()
        if active is None:
            raise ValueError("log_to=mlflow needs an active run: call mlflow.start_run() first")
        return MlflowSink(active.info.run_id)
    if isinstance(target, ModuleType) and root == "wandb":
        if target.run is None:
            raise ValueError("log_to=wandb needs a run: call wandb.init() first")
        return WandbSink(target.run)
    if all(hasattr(target, m) for m in ("add_scalar", "add_text", "add_embedding", "flush")):
        return TensorBoardSink(target)
    if root == "wandb" and all(hasattr(target, m) for m in ("log", "alert", "define_metric")):
        return WandbSink(target)
    run_id = getattr(getattr(target, "info", None), "run_id", None)
    if root == "mlflow" and isinstance(run_id, str):
        return MlflowSink(run_id)
    if callable(target) and not isinstance(target, ModuleType):
        return CallbackSink(target)
    raise TypeError(
        f"log_to does not support {type(target).__module__}.{type(target).__qualname__}; "
        "pass a torch.utils.tensorboard.SummaryWriter, a wandb run, an mlflow run (or the "
        "mlflow module), a callable (metrics: dict, step: int), or a list of these"
    )


def make_sinks(log_to: Any) -> list[Sink]:
    """The sinks for ``watch(log_to=...)``: None, one target, or a list or tuple of them."""
    if log_to is None:
        return []
    targets = list(log_to) if isinstance(log_to, list | tuple) else [log_to]
    return [_make_sink(target) for target in targets]


def events_of(frame: pd.DataFrame) -> list[Event]:
    """The :class:`Event` objects of a stored events frame (``RunReader.events()``)."""
    return [
        Event(e.step, e.kind, e.state, e.message, e.suggestion, e.evidence, e.time)
        for e in frame.itertuples(index=False)
    ]


def feed(
    sink: Sink, frame: pd.DataFrame, events: Sequence[Event], snapshots: Sequence[Snapshot]
) -> None:
    """Send one batch of what the run file got (metrics, events, snapshots) to ``sink``."""
    sink.log_metrics(frame)
    sink.log_events(events)
    for snapshot in snapshots:
        sink.log_snapshot(snapshot.step, snapshot.embeddings, snapshot.labels)


def replay(path: str | Path, sinks: Sequence[Sink]) -> None:
    """Send a saved run through ``sinks`` as one batch, then close them.

    :func:`feed` is what the watcher's writer thread calls live, so an exported run shows
    in a tracker as the run logged while it trained does.
    """
    with RunReader(path) as reader, reader.consistent():
        frame, events = reader.metrics(), events_of(reader.events())
        snapshots = [reader.snapshot(step) for step in reader.snapshot_steps()]
    for sink in sinks:
        feed(sink, frame, events, snapshots)
        sink.close()
