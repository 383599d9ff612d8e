"""Watch a triplet-loss training loop collapse, then fix it with one flag.

The collapsewatch demo's setup as a template to copy: scikit-learn's 8×8 digits (bundled,
nothing to download), an MLP with L2-normalised 32-D output, random batches of 256, SGD with
momentum 0.9, batch-hard triplet loss with margin 0.2. At lr 0.5 plain batch-hard maps every
digit to one point within ~30 steps and the loss sits at the margin; ``--scaled`` switches to
the scaled variant at lr 0.05, which trains normally. The only collapsewatch lines are the
``cw.watch(...)`` context manager and the verdict at the end.

    python examples/digits_collapse.py             # collapses: a CollapseWarning, "collapsed"
    python examples/digits_collapse.py --scaled    # stays "healthy"
    collapsewatch analyze runs/examples/digits-batch-hard-<date-time>.cwrun   # the printed path
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

import collapsewatch as cw


# Defined here rather than imported from collapsewatch.demo so that the template shows every
# piece you would replace with your own; it is the same network as demo.DigitsEmbedder.
class Embedder(nn.Module):
    """MLP 64 → 256 → 256 → ``dim``; the output is L2-normalised, so distances lie in [0, 2]."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.layers(x), dim=1)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--logdir", default="runs/examples", help="where the run file goes")
    parser.add_argument("--run", help="run name (default: digits-<loss>-<date-time>)")
    parser.add_argument("--scaled", action="store_true", help="scaled batch-hard: the fix")
    parser.add_argument("--lr", type=float, help="learning rate (default 0.5, or 0.05 scaled)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lr = args.lr if args.lr is not None else (0.05 if args.scaled else 0.5)
    # A fresh name per invocation: watch() refuses to overwrite an existing run file.
    variant = "batch-hard-scaled" if args.scaled else "batch-hard"
    run = args.run or f"digits-{variant}-{time.strftime('%Y%m%d-%H%M%S')}"

    torch.manual_seed(args.seed)
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x / 16.0, dtype=torch.float32)  # pixel values 0..16 → [0, 1]
    labels = torch.tensor(y)
    model = Embedder()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2, scaled=args.scaled)
    batches = torch.Generator().manual_seed(args.seed)

    config = {"lr": lr, "scaled": args.scaled, "batch_size": args.batch_size, "seed": args.seed}
    with cw.watch(model, loss_fn, logdir=args.logdir, run=run, config=config) as w:
        for _ in range(args.steps):
            index = torch.randint(0, len(labels), (args.batch_size,), generator=batches)
            loss = loss_fn(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    verdict = cw.analyze(w.path)
    print(f"run: {w.path}")
    print(f"final loss: {loss.item():.4f} (margin 0.2)")
    onset = f" (collapse flagged at step {verdict.onset_step})" if verdict.collapsed else ""
    print(f"verdict: {verdict.state}{onset}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
