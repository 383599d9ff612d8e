"""Optuna: prune a sweep's trials at the onset of collapse.

A hyperparameter sweep over learning rates, margins and mining strategies for a triplet loss
spends much of its time on trials that collapsed early and then sit on the margin plateau
for the rest of their budget. :func:`watch_trial` runs :func:`collapsewatch.watch` for one
trial and raises ``optuna.TrialPruned`` from the training loop as soon as the detector
confirms a collapse, so Optuna (with any sampler) moves on; every trial, pruned or not,
gets its verdict as user attributes::

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-3, 1.0, log=True)
        model, loss_fn = ..., cw.losses.BatchHardTripletLoss(margin=0.2)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        with watch_trial(trial, model, loss_fn, logdir="sweep"):
            for x, y in batches:
                loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        return evaluate(model)

Optuna is optional: importing this module without it raises an ImportError that says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

try:
    import optuna
except ImportError:
    raise ImportError(
        "collapsewatch.integrations.optuna needs Optuna: pip install 'collapsewatch[optuna]'"
    ) from None

from collapsewatch.detect import analyze
from collapsewatch.store import Event, json_safe
from collapsewatch.watch import Watcher, watch

ATTRIBUTE_PREFIX = "collapsewatch_"
"""User attributes of a trial: ``collapsewatch_state``, ``collapsewatch_onset_step``,
``collapsewatch_run`` (the run file's path), ``collapsewatch_last_step`` and, for a pruned
trial, ``collapsewatch_pruned_at_step`` (the first training step that did not run)."""

PRUNE_COMMIT_EVERY = 1
"""``commit_every`` a watched trial uses unless told otherwise: the detector sees a step once
it is committed, so committing every recorded step prunes within one recording interval of
the onset instead of up to 50 of them. ``every="auto"`` counts the commit's cost in its
budget, so the interval grows to pay for it."""


class _PruneOnCollapse:
    """The ``on_collapse`` action of a watched trial: raise ``TrialPruned`` from the next loss
    call; at ``close()`` (no training step left to stop) only remember the event."""

    def __init__(self) -> None:
        self.watcher: Watcher | None = None
        self.event: Event | None = None
        self.pruned_at_step: int | None = None

    def __call__(self, event: Event) -> None:
        if self.event is None:
            self.event = event
        if self.watcher is not None and not self.watcher.closed:
            # Acted on before the call being made is counted: step watcher.step never runs.
            self.pruned_at_step = self.watcher.step
            raise optuna.TrialPruned(_reason(event))


def _reason(event: Event) -> str:
    return f"collapsewatch: {event.message}"


def _record_verdict(trial: optuna.Trial, watcher: Watcher, pruned_at_step: int | None) -> None:
    verdict = analyze(watcher.path)
    attributes = {
        "state": verdict.state,
        "onset_step": verdict.onset_step,
        "last_step": verdict.last_step,
        "run": str(watcher.path),
        "pruned_at_step": pruned_at_step,
    }
    for name, value in attributes.items():
        trial.set_user_attr(ATTRIBUTE_PREFIX + name, json_safe(value))


@contextmanager
def watch_trial(
    trial: optuna.Trial,
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    *,
    prune: bool = True,
    **watch_options: Any,
) -> Iterator[Watcher]:
    """Watch one Optuna trial's training; prune it at a confirmed collapse.

    Args:
        trial: the trial being evaluated (any sampler; pruning needs no pruner).
        model, loss_fn: as for :func:`collapsewatch.watch`.
        prune: raise ``optuna.TrialPruned`` from the training loop once a collapse is
            confirmed (the run is closed with status "pruned"); False only records the
            verdict.
        **watch_options: passed to :func:`collapsewatch.watch`. Defaults: ``run`` is
            ``<study name>-trial-<number>``, ``config`` the trial's parameters,
            ``commit_every`` ``PRUNE_COMMIT_EVERY``. ``on_collapse`` is this function's.

    Yields the :class:`~collapsewatch.Watcher`. Whatever the outcome, the trial gets the
    verdict as user attributes (``ATTRIBUTE_PREFIX``). A collapse confirmed only while the run
    closes prunes the trial after its last step.
    """
    if "on_collapse" in watch_options:
        raise ValueError(
            "watch_trial() sets on_collapse itself (it prunes the trial); pass prune=False to "
            "only record the verdict"
        )
    study = getattr(trial, "study", None)
    study_name = getattr(study, "study_name", None) or "study"
    watch_options.setdefault("run", f"{study_name}-trial-{trial.number}")
    watch_options.setdefault("config", {**trial.params, "optuna_trial": trial.number})
    watch_options.setdefault("commit_every", PRUNE_COMMIT_EVERY)
    action = _PruneOnCollapse()
    watcher = watch(model, loss_fn, on_collapse=action if prune else "ignore", **watch_options)
    action.watcher = watcher
    try:
        yield watcher
    except optuna.TrialPruned:
        watcher.close("pruned")
        _record_verdict(trial, watcher, action.pruned_at_step)
        raise
    except BaseException:
        watcher.close("failed")
        _record_verdict(trial, watcher, None)
        raise
    watcher.close("finished")
    if prune and action.event is not None:
        # Confirmed only by the last commit: nothing left to stop, but the trial collapsed.
        _record_verdict(trial, watcher, watcher.step)
        raise optuna.TrialPruned(_reason(action.event))
    _record_verdict(trial, watcher, None)
