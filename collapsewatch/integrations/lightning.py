"""PyTorch Lightning: ``CollapseWatchCallback`` runs ``watch()`` for the length of ``fit``.

Lightning is optional: importing this module without it raises an ImportError that says so.
Under a DDP strategy every rank attaches the hooks and rank 0 writes the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package name
    try:
        # The same classes under the standalone package's name.
        from pytorch_lightning import LightningModule, Trainer  # type: ignore[assignment]
        from pytorch_lightning.callbacks import Callback  # type: ignore[assignment]
    except ImportError:
        raise ImportError(
            "collapsewatch.integrations.lightning needs PyTorch Lightning: pip install lightning"
        ) from None

from collapsewatch.watch import Watcher, watch


class CollapseWatchCallback(Callback):
    """Watch a LightningModule's embeddings and loss for collapse while it trains.

    Args:
        loss: the loss module, or the name of the LightningModule attribute holding it.
        model: the name of a submodule that produces the embeddings (e.g. ``"encoder"``);
            default the LightningModule itself (its ``forward``).
        **watch_options: passed to :func:`collapsewatch.watch` (``logdir``, ``run``,
            ``every``, ``on_collapse``, …). ``logdir`` defaults to
            ``<trainer.default_root_dir>/collapsewatch``. ``on_collapse="rescue"`` keeps and
            restores the trainer's first optimizer and its LR scheduler.

    Example::

        trainer = Trainer(callbacks=[CollapseWatchCallback("loss_fn", run="baseline")])
        trainer.fit(module)
    """

    def __init__(
        self,
        loss: str | torch.nn.Module = "loss_fn",
        *,
        model: str | None = None,
        **watch_options: Any,
    ) -> None:
        super().__init__()
        self.loss = loss
        self.model = model
        self.watch_options = watch_options
        self.watcher: Watcher | None = None

    @property
    def path(self) -> Path | None:
        """The run file being written, once training has started."""
        return None if self.watcher is None else self.watcher.path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loss = getattr(pl_module, self.loss) if isinstance(self.loss, str) else self.loss
        if not isinstance(loss, torch.nn.Module):
            raise TypeError(
                f"CollapseWatchCallback: {self.loss!r} is not a loss module on "
                f"{type(pl_module).__name__}; pass the module or the attribute name"
            )
        model = pl_module if self.model is None else getattr(pl_module, self.model)
        options = {"logdir": Path(trainer.default_root_dir) / "collapsewatch", **self.watch_options}
        if self.watcher is not None:
            # A later fit() with this callback continues the same run after its last step.
            options.update(logdir=self.watcher.logdir, run=self.watcher.name, resume=True)
        if options.get("on_collapse") == "rescue" and "optimizer" not in options:
            # The rescue keeps and restores the trainer's own optimizer (and scheduler).
            options["optimizer"] = trainer.optimizers[0]
            schedulers = trainer.lr_scheduler_configs
            options.setdefault("scheduler", schedulers[0].scheduler if schedulers else None)
        self.watcher = watch(model, loss, **options)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.watcher is not None:
            self.watcher.close("finished")

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self.watcher is not None:
            self.watcher.close("failed")
