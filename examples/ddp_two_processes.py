"""DistributedDataParallel: ``cw.watch`` on every rank, one run file for the job.

Two processes on one CPU (``torch.multiprocessing.spawn``, the gloo backend, a file store in a
temporary folder) train the digits MLP under DDP, each on its own half of the data. Every
rank calls ``cw.watch`` the same way; the statistics describe the global batch (one
all-reduce per recorded step) and rank 0 alone writes the run. Rank 0 then prints the run's
path, the world size it recorded and the detector's verdict.

    python examples/ddp_two_processes.py --steps 200             # plain batch-hard, lr 0.5
    python examples/ddp_two_processes.py --steps 200 --scaled    # scaled, lr 0.05

Under ``torchrun`` the same worker body applies: init the process group, wrap the model in
DDP, then ``with cw.watch(ddp_model, loss_fn, ...)`` on every rank.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors

WORLD_SIZE = 2


def worker(rank: int, store: str, args: argparse.Namespace) -> None:
    """One rank: join the group, train its shard under DDP with ``cw.watch`` attached."""
    # Two ranks share the machine's cores: one thread each avoids oversubscribing them.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.manual_seed(args.seed)  # DDP also broadcasts rank 0's weights at wrap time
        images, labels = load_digits_tensors()
        images, labels = images[rank::WORLD_SIZE], labels[rank::WORLD_SIZE]  # this rank's shard
        model = DistributedDataParallel(DigitsEmbedder())
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2, scaled=args.scaled)
        batches = torch.Generator().manual_seed(args.seed + rank)

        # Every rank calls watch() (it takes part in the all-reduce); only rank 0 writes.
        config = {"lr": args.lr, "scaled": args.scaled, "batch_size_per_rank": args.batch_size}
        with cw.watch(model, loss_fn, logdir=args.logdir, run=args.run, config=config) as w:
            for _ in range(args.steps):
                index = torch.randint(0, len(labels), (args.batch_size,), generator=batches)
                loss = loss_fn(model(images[index]), labels[index])
                optimizer.zero_grad()
                loss.backward()  # DDP averages the gradients across ranks here
                optimizer.step()

        if rank == 0:
            run = cw.load_run(w.path)
            print(f"run: {w.path} ({len(run.metrics)} steps)")
            print(f"world_size: {run.metadata['world_size']}")
            print(f"global batch: {int(run.metrics['batch_size'].iloc[-1])} embeddings/step")
            print(f"verdict: {cw.analyze(run).state}", flush=True)
    finally:
        dist.destroy_process_group()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--logdir", default="runs/examples", help="where the run file goes")
    parser.add_argument("--run", help="run name (default: ddp-digits-<date-time>)")
    parser.add_argument("--scaled", action="store_true", help="scaled batch-hard at lr 0.05")
    parser.add_argument("--batch-size", type=int, default=128, help="per rank (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.lr = 0.05 if args.scaled else 0.5
    # Chosen here, not in the workers, so that both ranks get the same name.
    args.run = args.run or f"ddp-digits-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(f"{tmp}/store", args), nprocs=WORLD_SIZE, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
