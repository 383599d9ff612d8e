"""sentence-transformers and the HF ``Trainer``: ``CollapseWatchCallback`` runs ``watch()``
for the length of ``train()``.

One line attaches it::

    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset,
                                         loss=loss, callbacks=[CollapseWatchCallback()])

With a ``SentenceTransformerTrainer`` the loss is ``trainer.loss`` and the model the one that
loss embeds with; the margin (``triplet_margin``), the distance (``distance_metric``) and the
embedding (the model's ``"sentence_embedding"``) are read from them. With the plain HF
``Trainer`` the loss is the one submodule of ``trainer.model`` whose class name ends in
``Loss``, unless ``loss=`` names it.

At every trainer log the collapse metrics of the latest recorded step are added to the
``logs`` as ``collapsewatch/<column>``, so they reach every ``report_to`` integration.
``transformers`` is required (``pip install sentence-transformers``, which brings it);
sentence-transformers itself only for its models and losses.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import torch

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
    from transformers.trainer_callback import CallbackHandler
except ImportError:
    raise ImportError(
        "collapsewatch.integrations.sentence_transformers needs transformers: "
        "pip install sentence-transformers (or pip install transformers for the HF Trainer)"
    ) from None

from collapsewatch.adapters import find_margin
from collapsewatch.states import RunState
from collapsewatch.store import Event
from collapsewatch.watch import CollapseWarning, Watcher, watch

PREFIX = "collapsewatch/"
# Numeric codes for trackers that plot numbers only; "empty" (nothing judged yet) is -1.
STATE_CODES: dict[str, int] = {
    RunState.EMPTY: -1,
    RunState.HEALTHY: 0,
    RunState.WARNING: 1,
    RunState.COLLAPSED: 2,
    RunState.DIVERGED: 3,
}
EMBEDDING_KEY = "sentence_embedding"
LABEL_KEYS = ("labels", "label", "label_ids")  # what the HF Trainer's batches call labels


def _is_sentence_transformers(module: torch.nn.Module) -> bool:
    return type(module).__module__.split(".")[0] == "sentence_transformers"


def _calling(cls: type) -> Any:
    """The nearest ``self`` of type ``cls`` up the call stack, or None.

    Callbacks are not given their trainer; ``train()`` is on the stack whenever one is called.
    """
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, cls):
            return candidate
        frame = frame.f_back
    return None


def _model(trainer: Trainer) -> torch.nn.Module:
    """The model a trainer trains (a Trainer is never built without one)."""
    if trainer.model is None:
        raise ValueError("CollapseWatchCallback: the trainer has no model")
    return trainer.model


class CollapseWatchCallback(TrainerCallback):
    """Watch a (Sentence Transformer) trainer's embeddings and loss for collapse.

    Args:
        loss: the loss to watch: None for the trainer's own (``SentenceTransformerTrainer``'s
            ``loss``, or the one ``…Loss`` submodule of the HF ``Trainer``'s model), a loss
            module, or a name: a key of a multi-dataset loss dict, or an attribute of the
            trainer or of its model.
        model: the module that produces the embeddings: None for the model the loss embeds
            with (its ``model`` or ``sentence_embedder``), else the trainer's model; a
            module; or the name of a submodule of the trainer's model.
        eval_probe: True: the first batch of the trainer's ``eval_dataset`` is the held-out
            probe (``watch(probe=...)``: evaluated in eval mode under ``no_grad`` every
            ``probe_every`` steps, its integer ``label`` column as ``probe_labels``); the
            name of one of a dict of eval datasets picks that one. With a
            ``SentenceTransformerTrainer`` the probe is the batch's first text column; with
            the plain HF ``Trainer`` the batch without its labels must be what the watched
            model takes as its one argument. Size it with ``per_device_eval_batch_size``.
        on_collapse: "stop" ends training (``control.should_training_stop``) at the first
            collapse, with a :class:`~collapsewatch.CollapseWarning`; "rescue" restores the
            last healthy state of the model and the trainer's optimizer and scheduler and
            applies a remedy (:class:`collapsewatch.Rescue`); "warn", "raise", "ignore" or a
            callable are passed to :func:`collapsewatch.watch`.
        **watch_options: passed to :func:`collapsewatch.watch` (``run``, ``every``,
            ``margin``, ``distance``, ``embedding``, …); they override what the callback
            reads from the loss and model. ``logdir`` defaults to
            ``<args.output_dir>/collapsewatch``. A later ``train()`` resumes the ``run``
            named here.
    """

    def __init__(
        self,
        loss: str | torch.nn.Module | None = None,
        *,
        model: str | torch.nn.Module | None = None,
        eval_probe: bool | str = False,
        on_collapse: Any = "warn",
        **watch_options: Any,
    ) -> None:
        if eval_probe and "probe" in watch_options:
            raise ValueError("CollapseWatchCallback: pass either eval_probe= or probe=, not both")
        self.loss = loss
        self.model = model
        self.eval_probe = eval_probe
        self.on_collapse = on_collapse
        self.watch_options = watch_options
        self.watcher: Watcher | None = None
        self.collapse: Event | None = None  # the collapse that stopped training, if any

    @property
    def path(self) -> Path | None:
        """The run file being written, once training has started."""
        return None if self.watcher is None else self.watcher.path

    # ------------------------------------------------------------------- discovery
    def _find_loss(self, trainer: Trainer) -> torch.nn.Module:
        own = getattr(trainer, "loss", None)
        if isinstance(self.loss, torch.nn.Module):
            return self.loss
        if isinstance(self.loss, str):
            if isinstance(own, dict) and self.loss in own:
                return own[self.loss]
            for owner in (trainer, trainer.model):
                found = getattr(owner, self.loss, None)
                if isinstance(found, torch.nn.Module):
                    return found
            raise ValueError(
                f"CollapseWatchCallback: no loss module {self.loss!r} on the trainer, its "
                "model or its loss dict; pass the loss module itself"
            )
        if isinstance(own, dict):
            distinct = list({id(loss): loss for loss in own.values()}.values())
            if len(distinct) == 1:
                return distinct[0]
            raise ValueError(
                f"the trainer has one loss per dataset ({', '.join(map(repr, own))}); pick "
                "the one to watch: CollapseWatchCallback(loss='<dataset name>')"
            )
        if isinstance(own, torch.nn.Module):
            return own
        losses = [
            module
            for name, module in _model(trainer).named_modules()
            if name and type(module).__name__.endswith("Loss")
        ]
        if len(losses) != 1:
            found = ", ".join(type(m).__name__ for m in losses) or "none"
            raise ValueError(
                f"CollapseWatchCallback: cannot tell which loss {type(trainer.model).__name__} "
                f"trains with (…Loss submodules: {found}); pass it: "
                "CollapseWatchCallback(loss=loss_module) or loss='attribute name'"
            )
        return losses[0]

    def _find_model(self, trainer: Trainer, loss: torch.nn.Module) -> torch.nn.Module:
        if isinstance(self.model, torch.nn.Module):
            return self.model
        if isinstance(self.model, str):
            return _model(trainer).get_submodule(self.model)
        for name in ("model", "sentence_embedder"):
            # sentence-transformers losses embed their inputs with the model they hold.
            embedder = getattr(loss, name, None)
            if isinstance(embedder, torch.nn.Module):
                return embedder
        return _model(trainer)

    def _eval_batch(self, trainer: Trainer) -> tuple[Any, torch.Tensor | None]:
        """The first batch of the trainer's eval dataset as the watched model takes it, and
        its (N,) integer labels (None if it has none)."""
        datasets = trainer.eval_dataset
        name = self.eval_probe if isinstance(self.eval_probe, str) else None
        if datasets is None:
            raise ValueError(
                "CollapseWatchCallback(eval_probe=...) needs the trainer's eval_dataset"
            )
        if isinstance(datasets, dict) and name not in datasets:
            if name is not None or len(datasets) != 1:
                raise ValueError(
                    f"CollapseWatchCallback(eval_probe={self.eval_probe!r}): the trainer's eval "
                    f"datasets are {', '.join(map(repr, datasets))}; name one: "
                    "eval_probe='<name>'"
                )
            name = next(iter(datasets))
        # Building the loader sets accelerate's even_batches for evaluation: put it back.
        even_batches = trainer.accelerator.even_batches
        try:
            batch = dict(next(iter(trainer.get_eval_dataloader(name))))
        finally:
            trainer.accelerator.even_batches = even_batches
        batch.pop("dataset_name", None)
        collect = getattr(trainer, "collect_features", None)
        if callable(collect):  # SentenceTransformerTrainer: one features dict per text column
            features, labels = collect(batch)
            inputs = features[0]
        else:  # the HF Trainer: the model's inputs, the labels apart
            labels = next((batch.pop(key) for key in LABEL_KEYS if key in batch), None)
            inputs = batch
        rows = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        integer = isinstance(labels, torch.Tensor) and not labels.is_floating_point()
        if not (integer and labels.shape == (rows,)):
            labels = None  # e.g. similarity scores: no classes to take the kNN accuracy over
        return inputs, labels

    def _options(self, loss: torch.nn.Module, model: torch.nn.Module) -> dict[str, Any]:
        """watch()'s margin, distance and embedding as read from the loss and model, with
        where they came from in the run's config; explicit watch options win."""
        # watch() reads the margin and distance itself (collapsewatch.adapters); they are
        # looked up here only to say in the run's config where they came from.
        found: dict[str, Any] = {}
        margin = find_margin(loss, self.watch_options.get("margin"))
        key = EMBEDDING_KEY if _is_sentence_transformers(model) else None
        if key is not None:
            found["embedding"] = operator.itemgetter(key)
        metric = getattr(loss, "distance_metric", None)
        if isinstance(metric, functools.partial):
            metric = metric.func
        config = {
            "integration": "sentence_transformers",
            "margin_attribute": margin.source or None,
            "distance_metric": getattr(metric, "__name__", None),
            "embedding_key": key,
            **dict(self.watch_options.get("config") or {}),
        }
        return {**found, **self.watch_options, "config": config}

    # ------------------------------------------------------------------- callbacks
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        trainer = _calling(Trainer)
        handler = _calling(CallbackHandler)
        if trainer is None or handler is None:
            raise RuntimeError(
                "CollapseWatchCallback runs inside a transformers Trainer: pass it to "
                "Trainer(callbacks=[...]) or trainer.add_callback()"
            )
        # HF calls callbacks in list order and puts the report_to ones first: move this
        # one ahead so that they see the metrics it adds to the logs.
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        loss = self._find_loss(trainer)
        model = self._find_model(trainer, loss)
        options = {
            # TrainingArguments replaces a None output_dir with "trainer_output".
            "logdir": Path(args.output_dir) / "collapsewatch",  # type: ignore[arg-type]
            **self._options(loss, model),
            "on_collapse": self._stop if self.on_collapse == "stop" else self.on_collapse,
        }
        if self.eval_probe:
            options["probe"], options["probe_labels"] = self._eval_batch(trainer)
        if self.watcher is not None and "run" in self.watch_options:
            # Another train() with this callback continues the run it named.
            options.setdefault("resume", True)
        if self.on_collapse == "rescue" and "optimizer" not in options:
            # The trainer's own optimizer (unwrapped from accelerate's, whose step calls it)
            # and scheduler are kept and restored.
            optimizer = kwargs.get("optimizer")
            options["optimizer"] = getattr(optimizer, "optimizer", optimizer)
            options.setdefault("scheduler", kwargs.get("lr_scheduler"))
        self.collapse = None
        self.watcher = watch(model, loss, **options)
        if str(getattr(args, "batch_sampler", "")).lower().endswith("group_by_label"):
            # The advice must not tell this run to do what it does.
            self.watcher.add_traits({"group_by_label"})

    def _stop(self, event: Event) -> None:
        if self.collapse is None:
            self.collapse = event
            warnings.warn(
                f"{event.message} Stopping training. {event.suggestion}".strip(),
                CollapseWarning,
                stacklevel=2,
            )

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.collapse is not None:
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.watcher is None or self.watcher.closed or logs is None:
            return
        # The trainer has just synchronised the device to log its loss: waiting for the
        # watcher to write the steps recorded so far costs little and makes logs current.
        self.watcher.flush(wait=True)
        row = self.watcher.latest_metrics
        if row is None:
            return
        # Every log gets the latest recorded values, whether or not a step was recorded since
        # the previous log; collapsewatch/step says which step they were measured at.
        metrics = {
            PREFIX + name: float(value)
            for name, value in row.items()
            if name not in ("step", "time") and not math.isnan(value)
        }
        metrics[PREFIX + "step"] = int(row["step"])
        metrics[PREFIX + "state"] = STATE_CODES[self.watcher.state]
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            # Trainer.log stored a copy of these logs just before calling the callbacks.
            state.log_history[-1].update(metrics)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.watcher is not None:
            self.watcher.close("finished")
