"""Rescue a collapsing run: restore its last healthy state, apply a remedy, go on.

``watch(model, loss_fn, optimizer=opt, on_collapse="rescue")`` (or ``on_collapse=Rescue(opt,
...)`` for other settings) keeps copies of the model's and the optimizer's state (and an LR
scheduler's) from recent steps at which the detector judged the run healthy. When the
detector confirms a collapse it restores the newest copy taken before the collapse began
(before the evidence's ``since_step``), applies the next remedy and records a ``rescued``
event saying what was done and which step was restored; training goes on from there. A
divergence (``diverged``: non-finite or exploding loss or embeddings) is rescued the same
way. The default remedies, each tried once, in order:

1. :func:`use_scaled_variant`: a collapsed bundled batch-hard loss switches to its scaled
   variant (Quaterion's fix: the loss can no longer sit at the margin with every distance
   at 0);
2. :func:`halve_learning_rate`: every parameter group's learning rate (and a scheduler's base
   rates) times 0.5.

A remedy that does not apply (the loss is not a bundled batch-hard one) is skipped. When they
are used up a ``rescue_failed`` event says so and later collapses are only warned about.

Where and when, so that nothing waits in the training step:

* Copies are taken right after ``optimizer.step()`` (a post-step hook), every
  ``checkpoint_every`` steps, into host memory (pinned, non-blocking on CUDA): the model's
  ``state_dict``, the optimizer's and the scheduler's. The first copy (before any training)
  is always kept, plus the ``keep`` most recent healthy ones: ``keep + 1`` copies of the
  parameters and the optimizer state (for SGD with momentum, 2 × the parameters' size each).
* Decisions are taken at those same steps, also right after ``optimizer.step()``, so the
  restored state is what the next forward pass sees. Under torch.distributed rank 0 (whose
  detector decides) broadcasts its decision and the step to restore at each of those steps
  (one small collective every ``checkpoint_every`` steps); every rank then restores its own
  copy of that step, identical across ranks because DDP keeps the parameters identical.
* A collapse is acted on at the first decision step after the detector saw it, so ``watch()``
  commits every recorded step in rescue mode (``commit_every=1`` unless given).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from collapsewatch.detect import RESCUE_FAILED, RESCUED
from collapsewatch.losses.base import TripletLoss
from collapsewatch.states import FAILED_STATES, RunState
from collapsewatch.store import Event


@dataclass
class RescueContext:
    """What a remedy may change: the run's modules and optimizer, after the restore."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any | None
    event: Event  # the collapse (or divergence) being rescued
    attempt: int  # 1 for the first rescue of the run


Remedy = Callable[[RescueContext], "str | None"]
"""A remedy changes the run and says what it did, or returns None where it does not apply."""


def use_scaled_variant(context: RescueContext) -> str | None:
    """Switch a bundled batch-hard loss to the scaled variant; None for any other loss, and
    for a divergence (the scale of the updates, not the plateau, is what went wrong)."""
    loss = context.loss_fn
    if context.event.kind != RunState.COLLAPSED:
        return None
    if isinstance(loss, TripletLoss) and loss.mining == "batch_hard" and not loss.scaled:
        loss.scaled = True
        return f"switched {type(loss).__name__} to the scaled variant (scaled=True)"
    return None


def halve_learning_rate(context: RescueContext) -> str:
    """Scale every parameter group's learning rate by 0.5, and a scheduler's base rates."""
    before = [group["lr"] for group in context.optimizer.param_groups]
    for group in context.optimizer.param_groups:
        group["lr"] = group["lr"] * 0.5
    base = getattr(context.scheduler, "base_lrs", None)
    if context.scheduler is not None and isinstance(base, list):
        context.scheduler.base_lrs = [rate * 0.5 for rate in base]
    after = [group["lr"] for group in context.optimizer.param_groups]
    rates = ", ".join(f"{a:.3g} → {b:.3g}" for a, b in zip(before, after, strict=True))
    return f"halved the learning rate ({rates})"


DEFAULT_REMEDIES: tuple[Remedy, ...] = (use_scaled_variant, halve_learning_rate)


class _Watched(Protocol):
    """What a Rescue needs of the watcher it is attached to."""

    model: torch.nn.Module
    loss_fn: torch.nn.Module
    rank: int
    world_size: int

    @property
    def step(self) -> int: ...

    @property
    def state(self) -> str: ...

    def note_event(self, event: Event) -> None: ...


def _to_host(value: Any) -> Any:
    """A copy of a (nested) state dict with every tensor in host memory (pinned and
    non-blocking from CUDA, so the training thread does not wait for the device)."""
    if isinstance(value, Tensor):
        if value.device.type == "cuda":
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return host.copy_(value.detach(), non_blocking=True)
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _to_host(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_host(item) for item in value)
    return copy.deepcopy(value)


@dataclass
class _Checkpoint:
    step: int  # the step whose forward pass will see this state
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None


class Rescue:
    """``on_collapse=Rescue(optimizer)``: restore the last healthy state and apply a remedy.

    Args:
        optimizer: the run's optimizer (its state is kept and restored with the model's).
        scheduler: an LR scheduler to keep and restore too (its base rates are halved with
            the optimizer's).
        remedies: tried in order, one per rescue; default :data:`DEFAULT_REMEDIES`. A remedy
            that returns None does not apply and the next one is tried.
        checkpoint_every: take copies and decisions every this many steps.
        keep: how many recent healthy copies to keep besides the first.
        patience: steps a rescued run has to leave the collapsed state (the detector needs
            ``recovery_window`` steps, 20 by default, to call it recovered); a run still
            collapsed after them is rescued again with the next remedy.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        scheduler: Any | None = None,
        remedies: Sequence[Remedy] = DEFAULT_REMEDIES,
        checkpoint_every: int = 10,
        keep: int = 5,
        patience: int = 50,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Rescue needs the run's torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
            raise ValueError(f"checkpoint_every must be an integer ≥ 1, got {checkpoint_every!r}")
        if not (isinstance(keep, int) and keep >= 1):
            raise ValueError(f"keep must be an integer ≥ 1, got {keep!r}")
        if not remedies or not all(callable(r) for r in remedies):
            raise ValueError("remedies must be a non-empty sequence of callables")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.remedies = list(remedies)
        self.checkpoint_every = checkpoint_every
        self.keep = keep
        self.patience = patience
        self.attempts = 0
        self.gave_up = False
        self._watcher: _Watched | None = None
        self._first: _Checkpoint | None = None
        self._recent: list[_Checkpoint] = []
        self._pending: Event | None = None  # a collapse seen, not yet acted on (rank 0)
        self._last: tuple[int, Event] | None = None  # the latest rescue's step and collapse
        self._handle: Any = None

    # ------------------------------------------------------------------ wiring
    def attach(self, watcher: _Watched) -> None:
        """Start keeping copies for ``watcher``'s run (``watch()`` calls this)."""
        self._watcher = watcher
        self._handle = self.optimizer.register_step_post_hook(self._after_step)
        self._first = self._take(watcher.step)

    def detach(self) -> None:
        """Stop (``Watcher.close`` calls this); the copies are dropped."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._first, self._recent = None, []

    def __call__(self, event: Event) -> None:
        """The ``on_collapse`` action: remember the event; it is acted on right after the next
        decision step's ``optimizer.step()``."""
        if self._pending is None and not self.gave_up:
            self._pending = event

    @property
    def checkpoint_bytes(self) -> int:
        """Host memory held by the copies now."""
        copies = [c for c in (self._first, *self._recent) if c is not None]
        return sum(_size(c.model) + _size(c.optimizer) for c in copies)

    # ------------------------------------------------------------------ training thread
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        watcher = self._watcher
        if watcher is None:
            return
        step = watcher.step  # the next forward pass's step
        if step % self.checkpoint_every:
            return
        rescue, restore_to, healthy = self._decide(watcher, step)
        if rescue:
            self._rescue(watcher, step, restore_to)
        elif healthy:
            self._recent.append(self._take(step))
            del self._recent[: -self.keep]

    def _decide(self, watcher: _Watched, step: int) -> tuple[bool, int, bool]:
        """(rescue now, the step to restore, whether the run is healthy), from rank 0."""
        state = watcher.state
        if state not in FAILED_STATES:
            self._last = None  # the rescue worked (or the run recovered on its own)
        elif self._pending is None and self._last is not None and not self.gave_up:
            rescued_at, collapse = self._last
            if step - rescued_at >= self.patience:
                self._pending = collapse  # the rescue did not take: try the next remedy
        event = self._pending
        healthy = state in (RunState.HEALTHY, RunState.EMPTY)
        restore_to = self._restore_point(event) if event is not None else -1
        decision = (event is not None, restore_to, healthy)
        if watcher.world_size > 1:
            shared = torch.tensor([float(v) for v in decision], dtype=torch.float64)
            if dist.get_backend() == "nccl":
                shared = shared.cuda()
            dist.broadcast(shared, src=0)
            decision = (bool(shared[0]), int(shared[1]), bool(shared[2]))
        return decision

    def _restore_point(self, event: Event) -> int:
        """The newest healthy copy taken before the collapse began, else the first."""
        since = event.evidence.get("since_step")
        began = since if isinstance(since, int | float) and math.isfinite(since) else event.step
        before = [c.step for c in self._recent if c.step <= began]
        assert self._first is not None
        return max(before) if before else self._first.step

    def _rescue(self, watcher: _Watched, step: int, restore_to: int) -> None:
        event = self._pending or Event(step, RunState.COLLAPSED, RunState.COLLAPSED, "(rank 0)")
        self._pending = None
        if not self.remedies:
            # Restoring once more without a change would only repeat the collapse.
            self.gave_up = True
            message = self._give_up(step, event) + "."
            self._note(watcher, step, RESCUE_FAILED, message, event, {})
            return
        self._restore(watcher, restore_to)
        self.attempts += 1
        self._last = (step, event)
        context = RescueContext(
            watcher.model, watcher.loss_fn, self.optimizer, self.scheduler, event, self.attempts
        )
        done = None
        while self.remedies and done is None:
            done = self.remedies.pop(0)(context)
        evidence = {"restored_step": restore_to, "attempt": self.attempts}
        if done is None:
            self.gave_up = True
            message = self._give_up(step, event) + " that applies to this run."
            self._note(watcher, step, RESCUE_FAILED, message, event, evidence)
            return
        message = (
            f"Rescued at step {step}: restored the state of step {restore_to} (the last healthy "
            f"copy before the {_what(event)} at step {event.step}) and {done}."
        )
        self._note(watcher, step, RESCUED, message, event, {**evidence, "remedy": done})

    def _restore(self, watcher: _Watched, restore_to: int) -> None:
        checkpoint = next(
            (c for c in (self._first, *self._recent) if c is not None and c.step == restore_to),
            None,
        )
        if checkpoint is None:  # cannot happen: ranks take the same copies at the same steps
            raise RuntimeError(f"Rescue: no copy of step {restore_to} on rank {watcher.rank}")
        watcher.model.load_state_dict(checkpoint.model)
        # Copies again: the optimizer and the scheduler may keep the tensors they are given
        # and update them in place, and this copy may have to be restored a second time.
        self.optimizer.load_state_dict(_to_host(checkpoint.optimizer))
        if self.scheduler is not None and checkpoint.scheduler is not None:
            self.scheduler.load_state_dict(_to_host(checkpoint.scheduler))
        # Copies newer than the restored one describe the abandoned trajectory.
        self._recent = [c for c in self._recent if c.step <= restore_to]

    def _give_up(self, step: int, event: Event) -> str:
        return (
            f"Gave up rescuing at step {step}: the run is still {event.kind} (since step "
            f"{event.step}) after {self.attempts} rescue(s) and no remedy is left"
        )

    @staticmethod
    def _note(
        watcher: _Watched,
        step: int,
        kind: str,
        message: str,
        event: Event,
        evidence: dict[str, Any],
    ) -> None:
        if watcher.rank == 0:  # rank 0 writes the run
            evidence = {**evidence, "collapse_step": event.step}
            suggestion = event.suggestion if kind == RESCUE_FAILED else ""
            watcher.note_event(Event(step, kind, watcher.state, message, suggestion, evidence))

    def _take(self, step: int) -> _Checkpoint:
        assert self._watcher is not None
        scheduler = None if self.scheduler is None else _to_host(self.scheduler.state_dict())
        return _Checkpoint(
            step=step,
            model=_to_host(self._watcher.model.state_dict()),
            optimizer=_to_host(self.optimizer.state_dict()),
            scheduler=scheduler,
        )


def _what(event: Event) -> str:
    return "divergence" if event.kind == RunState.DIVERGED else "collapse"


def _size(state: Any) -> int:
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_size(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_size(v) for v in state)
    return 0
