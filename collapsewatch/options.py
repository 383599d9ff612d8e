"""The options of ``watch()``, checked once: :class:`WatchOptions`.

A :class:`~collapsewatch.watch.Watcher` is built only from a ``WatchOptions``, and a
``WatchOptions`` only exists validated (frozen, checked in ``__post_init__``), so a watcher
constructed directly gets the same clear errors as ``watch()``. What depends on the loss
(its margin, distance and family) is read by the watcher, from the loss.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from collapsewatch.adapters import default_embedding, default_loss_value
from collapsewatch.cadence import Every, check_interval, check_overhead
from collapsewatch.detect import DetectorConfig
from collapsewatch.losses.distances import Distance
from collapsewatch.rescue import Rescue
from collapsewatch.store import Event, check_run_name
from collapsewatch.trackers import Sink, make_sinks

OnCollapse = Literal["warn", "raise", "ignore", "rescue"] | Rescue | Callable[[Event], Any]


@dataclass(frozen=True)
class WatchOptions:
    """Every option of :func:`collapsewatch.watch` (see there for each), validated.

    ``__post_init__`` raises ``ValueError`` / ``TypeError`` naming the bad option, and fills
    in the defaults that depend on other options: ``logdir`` becomes a ``Path``, ``run`` is
    checked, ``commit_every=None`` becomes 1 when rescuing and 50 otherwise,
    ``embedding`` / ``loss_value`` / ``detector`` get their defaults. Two fields are derived
    and not given: ``action`` (``on_collapse``, with "rescue" made a :class:`Rescue` of
    ``optimizer`` and ``scheduler``) and ``sinks`` (the ``log_to`` trackers).
    """

    logdir: str | os.PathLike[str] = "runs"
    run: str | None = None
    margin: float | None = None
    every: Every = "auto"
    rank_every: int = 50
    snapshot_every: int = 100
    snapshot_size: int = 256
    embedding: Callable[[Any], Tensor] | None = None
    loss_value: Callable[[Any], Any] | None = None
    resume: bool = False
    config: Mapping[str, Any] | None = None
    distance: Distance | None = None
    commit_every: int | None = None
    commit_interval: float = 5.0
    on_collapse: OnCollapse = "warn"
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any | None = None
    detector: DetectorConfig | None = None
    dashboard: bool | int = False
    log_to: Any = None
    difficulty_every: Every = "auto"
    probe: Any = None
    probe_labels: Tensor | None = None
    probe_every: int = 50
    overhead: float = 0.03
    action: OnCollapse = field(init=False)
    sinks: tuple[Sink, ...] = field(init=False)

    def __post_init__(self) -> None:
        check_interval("every", self.every)
        check_interval("difficulty_every", self.difficulty_every)
        check_overhead(self.overhead)
        action = self.on_collapse
        if action == "rescue":
            if self.optimizer is None:
                raise ValueError(
                    "on_collapse='rescue' needs the run's optimizer: watch(..., optimizer=opt, "
                    "on_collapse='rescue')"
                )
            action = Rescue(self.optimizer, scheduler=self.scheduler)
        elif self.optimizer is not None or self.scheduler is not None:
            raise ValueError("optimizer= and scheduler= are for on_collapse='rescue'")
        commit_every = self.commit_every
        if commit_every is None:
            commit_every = 1 if isinstance(action, Rescue) else 50
        if not isinstance(commit_every, int) or commit_every < 1:
            raise ValueError(f"commit_every must be an integer ≥ 1, got {commit_every!r}")
        for option, value in {
            "rank_every": self.rank_every,
            "snapshot_every": self.snapshot_every,
            "snapshot_size": self.snapshot_size,
        }.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{option} must be an integer ≥ 0, got {value!r}")
        if not (self.commit_interval > 0):
            raise ValueError(f"commit_interval must be > 0 seconds, got {self.commit_interval!r}")
        if action not in ("warn", "raise", "ignore") and not callable(action):
            raise ValueError(
                f"on_collapse must be 'warn', 'raise', 'ignore', 'rescue', a Rescue or a "
                f"callable, got {action!r}"
            )
        _check_probe(self.probe, self.probe_labels, self.probe_every)
        filled = {
            "logdir": Path(self.logdir),
            "run": None if self.run is None else check_run_name(self.run),
            "commit_every": commit_every,
            "commit_interval": float(self.commit_interval),
            "embedding": self.embedding or default_embedding,
            "loss_value": self.loss_value or default_loss_value,
            "detector": self.detector or DetectorConfig(),
            "config": dict(self.config or {}),
            "action": action,
            "sinks": tuple(make_sinks(self.log_to)),
        }
        for name, normalised in filled.items():
            object.__setattr__(self, name, normalised)  # frozen: set once, here


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
