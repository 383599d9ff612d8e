"""``watch(model, loss_fn)``: record collapse statistics from an existing training loop.

A thin façade over one module per job, along the data flow:

* :mod:`collapsewatch.options`: the options, validated once (:class:`WatchOptions`);
* :mod:`collapsewatch.capture`: the hooks on the model and the loss, which build a record of
  device tensors per recorded step (training thread, no store);
* :mod:`collapsewatch.pipeline`: the records stacked, reduced across ranks and copied to the
  host without waiting, then turned into metrics, judged by the detector and written to the
  run file by a background thread (its docstring says which thread owns what);
* :mod:`collapsewatch.dashboard_process`: the dashboard child process of ``dashboard=``.

:class:`Watcher` wires them for one run: it claims or resumes the run's name, opens the run
file, and acts on collapse (warn, raise, rescue or call back) in the training thread.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import secrets
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from collapsewatch._version import __version__
from collapsewatch.adapters import (
    LOOKED_UP_MARGINS,
    DistanceSpec,
    MarginSpec,
    find_distance,
    find_margin,
    loss_family,
    loss_traits,
)
from collapsewatch.cadence import Cadence, Every
from collapsewatch.capture import (
    Capture,
    CaptureSettings,
    StepRecord,
    WarnOnce,
    caller_stacklevel,
    device_of,
    unwrap_model,
)
from collapsewatch.columns import MARGIN_RELATIVE
from collapsewatch.dashboard_process import reopen_command, start_dashboard, stop_dashboards
from collapsewatch.detect import CollapseDetector, DetectorConfig
from collapsewatch.losses.distances import Distance
from collapsewatch.options import OnCollapse, WatchOptions
from collapsewatch.pipeline import CommitPipeline
from collapsewatch.rescue import Rescue
from collapsewatch.store import (
    Event,
    RunFileError,
    RunReader,
    RunStorageError,
    RunSummary,
    RunWriter,
    load_run,
    run_path,
)
from collapsewatch.trackers import SinkError

__all__ = ["CollapseError", "CollapseWarning", "OnCollapse", "WatchOptions", "Watcher", "watch"]


class CollapseError(RuntimeError):
    """Raised from the training loop by ``watch(..., on_collapse="raise")``."""

    def __init__(self, event: Event) -> None:
        super().__init__(f"{event.message} {event.suggestion}".strip())
        self.event = event


class CollapseWarning(UserWarning):
    """Emitted once per collapse onset by ``watch(..., on_collapse="warn")``."""


_OPEN_WATCHERS: weakref.WeakSet[Watcher] = weakref.WeakSet()


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_run_name(loss_fn: torch.nn.Module) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{type(loss_fn).__name__.lower()}-{secrets.token_hex(2)}"


def _check_modules(model: object, loss_fn: object) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loss_fn, torch.nn.Module):
        raise TypeError(
            f"loss_fn must be a torch.nn.Module (hooks attach to modules), got "
            f"{type(loss_fn).__name__}; wrap a plain function in an nn.Module"
        )


class Watcher:
    """The hooks and recorder that :func:`watch` attaches; see there for the options.

    ``Watcher(model, loss_fn, WatchOptions(...))`` is what ``watch(model, loss_fn, ...)``
    does: the options are validated when the ``WatchOptions`` is made, the modules here.
    Construction attaches the hooks, opens (or resumes) the run file and starts the writer
    thread; under torch.distributed every rank must construct it (one collective each for
    the run's name and first step).
    """

    def __init__(
        self, model: torch.nn.Module, loss_fn: torch.nn.Module, options: WatchOptions
    ) -> None:
        _check_modules(model, loss_fn)
        if not isinstance(options, WatchOptions):
            raise TypeError(
                f"options must be a collapsewatch.WatchOptions, got {type(options).__name__}; "
                "build one with WatchOptions(...) or call watch(model, loss_fn, ...)"
            )
        self.model, self.loss_fn, self.options = model, loss_fn, options
        self.rank, self.world_size = _distributed()
        self.margin_spec = find_margin(loss_fn, options.margin)
        self.distance = find_distance(loss_fn, options.distance)
        _warn_if_margin_free(loss_fn, self.margin_spec, self.distance)
        self.margin = self.margin_spec.margin
        self.logdir = Path(options.logdir)
        self.name = self._claim_name()
        self.path = run_path(self.logdir, self.name)
        self.on_collapse: OnCollapse = options.action
        self.sinks = list(options.sinks)
        self.config: Mapping[str, Any] = options.config or {}
        detector_config = options.detector
        assert detector_config is not None  # WatchOptions fills it in
        self.detector = CollapseDetector(
            detector_config,
            loss_family(loss_fn),
            loss_traits(loss_fn, self.distance),
            distance=self.distance.distance,
        )
        self.cadence = Cadence(
            options.every,
            options.difficulty_every,
            options.overhead,
            device_of(model),
            distributed=self.world_size > 1,
            # A collapse must still span two recorded steps of the detector's window.
            max_every=int(detector_config.window // 2),
        )
        self.closed = False
        self._warn = WarnOnce()
        step, dim, writer = 0, None, None
        if self.rank == 0:
            if self.resume:
                step, dim = self._replay_existing()
            writer = RunWriter(self.path, self._metadata(), resume=self.resume)
        self._pipeline = CommitPipeline(
            self.detector,
            self.cadence,
            self.margin_spec,
            self.sinks,
            writer,
            name=self.name,
            world_size=self.world_size,
            commit_every=options.commit_every,  # type: ignore[arg-type]  # filled in: an int
            commit_interval=options.commit_interval,
        )
        if self.world_size > 1:
            # Ranks must agree on which calls are recorded steps (one collective each).
            shared = [step]
            dist.broadcast_object_list(shared, src=0)
            step = shared[0]
        settings = CaptureSettings(
            margin_spec=self.margin_spec,
            distance=self.distance,
            embedding=options.embedding,  # type: ignore[arg-type]  # filled in: a callable
            loss_value=options.loss_value,  # type: ignore[arg-type]  # filled in: a callable
            rank_every=options.rank_every,
            snapshot_every=options.snapshot_every,
            snapshot_size=options.snapshot_size,
            probe=options.probe,
            probe_labels=options.probe_labels,
            probe_every=options.probe_every,
        )
        self._capture = Capture(
            model,
            loss_fn,
            settings,
            self.cadence,
            rank=self.rank,
            step=step,
            dim=dim,
            warn=self._warn,
            before_call=self._act_on_events,
            started=self._pipeline.started,
            finished=self._step_finished,
        )
        _OPEN_WATCHERS.add(self)
        if isinstance(self.on_collapse, Rescue):
            self.on_collapse.attach(self)
        if options.dashboard and self.rank == 0:
            self._start_dashboard(options.dashboard)

    # ------------------------------------------------------------------- the run
    @property
    def resume(self) -> bool:
        """Whether this watcher continues an existing run (decided on rank 0)."""
        return self._resume

    def _claim_name(self) -> str:
        """The run's name: the given one or a unique timestamped one; rank 0 claims its file
        (``_claim_run_name``) and its name wins on every rank."""
        name = self.options.run or _default_run_name(self.loss_fn)
        self._resume = self.options.resume
        if self.rank == 0:
            self._resume = _claim_run_name(run_path(self.logdir, name), self.options.resume)
        if self.world_size > 1:
            # Every rank must report the same run path; rank 0's name wins.
            shared = [name]
            dist.broadcast_object_list(shared, src=0)
            name = shared[0]
        return name

    def _replay_existing(self) -> tuple[int, int | None]:
        """Resume: feed the stored steps to the detector (as ``analyze`` would); the next
        step's number (after the loss calls the run has seen: the last *recorded* step is
        earlier when the last calls were not recorded) and the embedding dimension."""
        run = load_run(self.path)
        self.detector.replay(run.metrics)
        calls = run.metadata.get("loss_calls")
        after_rows = -1 if self.detector.last_step is None else self.detector.last_step
        # A killed run may have committed rows after its last count: never number backwards.
        step = max(after_rows + 1, calls if isinstance(calls, int) else 0)
        dim = run.metadata.get("embedding_dim")
        return step, int(dim) if dim is not None else None

    def _metadata(self) -> dict[str, Any]:
        options = self.options
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
            "rank_every": options.rank_every,
            "probe_every": options.probe_every if options.probe is not None else None,
            "detector": dataclasses.asdict(self.detector.config),
            "log_to": [sink.kind for sink in self.sinks],
        }

    def _start_dashboard(self, dashboard: bool | int) -> None:
        try:
            start_dashboard(self.logdir, 8050 if dashboard is True else int(dashboard))
        except Exception as error:  # a convenience: never lose the run to it
            print(
                f"collapsewatch: no dashboard ({error}); open one with: "
                f"{reopen_command(self.logdir)}"
            )

    # ----------------------------------------------------------- training thread
    @property
    def step(self) -> int:
        """Loss calls seen so far: the next step's number."""
        return self._capture.step

    @property
    def state(self) -> str:
        """The detector's state as of the last steps written (rank 0)."""
        return self.detector.state

    @property
    def latest_metrics(self) -> dict[str, Any] | None:
        """The last row written to the run (rank 0), for integrations that report it."""
        return self._pipeline.latest_metrics

    def _step_finished(self, record: StepRecord) -> None:
        self._pipeline.finished(record, loss_calls=self._capture.step, dim=self._capture.dim)

    def flush(self, wait: bool = False) -> None:
        """Send the recorded steps to the writer now (non-blocking on the device); with
        ``wait``, return once they are written (``latest_metrics`` and ``state`` include them)."""
        self._pipeline.flush(loss_calls=self._capture.step, dim=self._capture.dim, wait=wait)

    def _act_on_events(self, closing: bool = False) -> None:
        """Warn about the writer's failures and act on collapse onsets (training thread)."""
        errors = self._pipeline.errors
        while errors:
            error = errors.popleft()
            if isinstance(error, SinkError):
                self._warn(f"log_to {error.kind}", f"watch(): {error}")
            elif isinstance(error, RunStorageError):
                self._warn(
                    "storage",
                    f"watch(): {error}. Training goes on; the recorded steps are kept in "
                    "memory (up to a bound) and written once the file can be written again.",
                )
            else:
                self._warn("writer", f"watch(): writing run {str(self.path)!r} failed: {error!r}")
        actions = self._pipeline.actions
        while actions:
            event = actions.popleft()
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
                    stacklevel=caller_stacklevel(),
                )

    def add_traits(self, traits: set[str]) -> None:
        """Tell the advice what the run already does (``detect.Remedy.unless`` names, e.g.
        "group_by_label" from a trainer's settings); stored with the next commit."""
        self.detector.add_traits(traits)

    def note_event(self, event: Event) -> None:
        """Record ``event`` (made in the training thread) with the next commit."""
        self._pipeline.noted.append(event)

    # ------------------------------------------------------------------ life cycle
    def close(self, status: str = "finished") -> None:
        """Remove every hook, write what is left and close the run. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._capture.remove()
        if isinstance(self.on_collapse, Rescue):
            self.on_collapse.detach()
        self._pipeline.close(status, loss_calls=self._capture.step, dim=self._capture.dim)
        self._act_on_events(closing=True)
        _OPEN_WATCHERS.discard(self)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.close("finished" if exc_type is None else "failed")


def _warn_if_margin_free(
    loss_fn: torch.nn.Module, margin_spec: MarginSpec, distance_spec: DistanceSpec
) -> None:
    """Say which columns and rules a loss without a margin leaves out."""
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
            stacklevel=caller_stacklevel(),
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
            f"watch(): {type(loss_fn).__name__} has no margin (looked for "
            f"{', '.join(LOOKED_UP_MARGINS)}): the margin-relative columns "
            f"({', '.join(MARGIN_RELATIVE)}) are NaN; {judged}. Pass margin= if the loss has "
            "one under another name.",
            RuntimeWarning,
            stacklevel=caller_stacklevel(),
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


@atexit.register
def _shutdown() -> None:
    for watcher in list(_OPEN_WATCHERS):
        watcher.close("interrupted")
    stop_dashboards()


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
    _check_modules(model, loss_fn)  # before the options: the first thing a call gets wrong
    options = WatchOptions(
        logdir=logdir,
        run=run,
        margin=margin,
        every=every,
        rank_every=rank_every,
        snapshot_every=snapshot_every,
        snapshot_size=snapshot_size,
        embedding=embedding,
        loss_value=loss_value,
        resume=resume,
        config=config,
        distance=distance,
        commit_every=commit_every,
        commit_interval=commit_interval,
        on_collapse=on_collapse,
        optimizer=optimizer,
        scheduler=scheduler,
        detector=detector,
        dashboard=dashboard,
        log_to=log_to,
        difficulty_every=difficulty_every,
        probe=probe,
        probe_labels=probe_labels,
        probe_every=probe_every,
        overhead=overhead,
    )
    return Watcher(model, loss_fn, options)
