"""PyTorch Lightning: add ``CollapseWatchCallback`` to the Trainer and nothing else changes.

A minimal LightningModule (the digits MLP with batch-hard triplet loss) trained by a CPU
Trainer. The callback attaches ``cw.watch`` when ``fit`` starts and closes the run when it
ends; it is told which attribute holds the loss (``"loss_fn"``). Validation calls of the
loss run without gradients and are not recorded as steps.

    pip install lightning
    python examples/lightning_callback.py --steps 200
    python examples/lightning_callback.py --steps 200 --scaled     # the healthy variant

Without Lightning it prints how to install it and exits with status 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torch import Tensor

import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors

try:
    import lightning.pytorch as pl

    from collapsewatch.integrations.lightning import CollapseWatchCallback
except ImportError:  # main() says how to install it instead of a traceback
    pl = None

if pl is not None:  # the module below needs Lightning

    class DigitsTriplets(pl.LightningModule):
        """The digits MLP trained with batch-hard triplet loss (demo setup)."""

        def __init__(self, lr: float, scaled: bool) -> None:
            super().__init__()
            self.encoder = DigitsEmbedder()
            self.loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2, scaled=scaled)
            self.lr = lr

        def forward(self, x: Tensor) -> Tensor:
            return self.encoder(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            loss = self.loss_fn(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--logdir", default="runs/examples", help="where the run file goes")
    parser.add_argument("--run", help="run name (default: a timestamped name)")
    parser.add_argument("--scaled", action="store_true", help="scaled batch-hard at lr 0.05")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if pl is None:
        print("skipping: this example needs PyTorch Lightning (pip install lightning)")
        return 0

    pl.seed_everything(args.seed, verbose=False)
    images, labels = load_digits_tensors()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels),
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,  # a 5-sample last batch has few valid triplets
    )
    module = DigitsTriplets(lr=0.05 if args.scaled else 0.5, scaled=args.scaled)

    callback = CollapseWatchCallback("loss_fn", logdir=args.logdir, run=args.run)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)

    run = cw.load_run(callback.path)
    print(f"run: {callback.path} ({len(run.metrics)} steps)")
    print(f"verdict: {cw.analyze(run).state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
