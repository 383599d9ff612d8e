"""What ``watch(log_to=SummaryWriter)`` adds to a training step, against ``watch()`` alone.

Setup: the digits demo's MLP (64 → 256 → 256 → 32, L2-normalised), batch 256, batch-hard
triplet loss (margin 0.2), SGD, on the CPU with one torch thread, so that the watcher's
background thread (metrics, detector, run file and now TensorBoard) competes with training
for the only core torch uses. Each block opens a fresh watcher (and, for ``log_to``, a fresh
``SummaryWriter``) and times its steps; with ``commit_every=50`` several commits, each with
its ~1,000 ``add_scalar`` calls, fall inside a block. Plain, watched and watched-with-log_to
blocks alternate (ABCABC…) so that drift in the machine's speed hits all alike; each figure
is the median of the per-block mean step times.

    python benchmarks/bench_log_to.py
    python benchmarks/bench_log_to.py --blocks 3 --steps 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import collapsewatch as cw
from benchmarks.bench_watch import device_name
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors, random_batches


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6, help="blocks per variant")
    parser.add_argument("--steps", type=int, default=200, help="steps per block")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    torch.manual_seed(0)
    images, labels = load_digits_tensors()
    model = DigitsEmbedder()
    loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = random_batches(len(labels), 256, torch.Generator().manual_seed(0))

    def step() -> None:
        index = next(batches)
        loss = loss_fn(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def block(logdir: str, run: str | None, log_to: bool) -> float:
        """Mean seconds per step over one block: plain (run None), watched, or with log_to."""
        writer = SummaryWriter(Path(logdir) / f"tb-{run}") if log_to else None
        watching = (
            cw.watch(model, loss_fn, logdir=logdir, run=run, on_collapse="ignore", log_to=writer)
            if run is not None
            else nullcontext()
        )
        with watching:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds = (time.perf_counter() - start) / args.steps
        if writer is not None:
            writer.close()
        return seconds

    for _ in range(20):  # warm-up
        step()
    times: dict[str, list[float]] = {"plain": [], "watch": [], "log_to": []}
    with tempfile.TemporaryDirectory() as logdir:
        for i in range(args.blocks):
            times["plain"].append(block(logdir, None, log_to=False))
            times["watch"].append(block(logdir, f"watch-{i}", log_to=False))
            times["log_to"].append(block(logdir, f"log-to-{i}", log_to=True))
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    spread = {name: (min(v) * 1e3, max(v) * 1e3) for name, v in times.items()}
    result = {
        "device": device_name(torch.device("cpu")),
        "torch": torch.__version__,
        "steps_per_block": args.steps,
        "blocks": args.blocks,
        "median_ms": ms,
        "blocks_ms": {name: [t * 1e3 for t in values] for name, values in times.items()},
        "log_to_vs_watch_percent": (ms["log_to"] / ms["watch"] - 1) * 100,
    }
    print(f"device: {result['device']} · torch {result['torch']}")
    print("| step | median (ms) | blocks min–max (ms) | vs watch() |")
    print("|---|---|---|---|")
    for name, label in (
        ("plain", "no watch()"),
        ("watch", "watch()"),
        ("log_to", "watch(log_to=SummaryWriter)"),
    ):
        low, high = spread[name]
        change = (ms[name] / ms["watch"] - 1) * 100
        print(f"| {label} | {ms[name]:.2f} | {low:.2f}–{high:.2f} | {change:+.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
