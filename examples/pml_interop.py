"""Watch a pytorch-metric-learning loss: ``cw.watch`` needs nothing loss-specific.

``TripletMarginLoss`` (margin 0.2, its default L2-normalised Euclidean distance) trains the
digits MLP, optionally on the triplets a ``TripletMarginMiner`` picks. ``watch()`` reads the
margin and the distance from the loss object and computes the easy / semi-hard / hard
fractions itself, over every valid triplet of the batch (not only the mined ones).

    pip install pytorch-metric-learning
    python examples/pml_interop.py
    python examples/pml_interop.py --miner semihard --steps 300

Without pytorch-metric-learning it prints how to install it and exits with status 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import collapsewatch as cw

# The digits data and MLP of collapsewatch's demo: this example is about the loss.
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--logdir", default="runs/examples", help="where the run file goes")
    parser.add_argument("--run", help="run name (default: a timestamped name)")
    parser.add_argument(
        "--miner",
        choices=["none", "semihard", "hard", "all"],
        default="none",
        help="mine triplets with TripletMarginMiner first (default: none, every triplet)",
    )
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from pytorch_metric_learning import losses, miners
    except ImportError:
        print(
            "skipping: this example needs pytorch-metric-learning (pip install "
            "pytorch-metric-learning)"
        )
        return 0

    torch.manual_seed(args.seed)
    images, labels = load_digits_tensors()
    model = DigitsEmbedder()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = losses.TripletMarginLoss(margin=0.2)
    miner = None
    if args.miner != "none":
        miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets=args.miner)
    batches = torch.Generator().manual_seed(args.seed)

    config = {"loss": "pml.TripletMarginLoss", "miner": args.miner, "lr": args.lr}
    with cw.watch(model, loss_fn, logdir=args.logdir, run=args.run, config=config) as w:
        for _ in range(args.steps):
            index = torch.randint(0, len(labels), (args.batch_size,), generator=batches)
            embeddings, y = model(images[index]), labels[index]
            # The miner is not a step: only loss_fn's calls are, whatever they are given.
            triplets = miner(embeddings, y) if miner is not None else None
            loss = loss_fn(embeddings, y, triplets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    run = cw.load_run(w.path)
    last = run.metrics.iloc[-1]
    print(f"run: {w.path} ({len(run.metrics)} steps, margin {run.metadata['margin']})")
    print(
        f"last step: loss {last.loss:.4f}, easy {last.frac_easy:.1%}, "
        f"semi-hard {last.frac_semihard:.1%}, hard {last.frac_hard:.1%}"
    )
    print(f"verdict: {cw.analyze(run).state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
