"""What ``watch()`` and the bundled losses' statistics cost a training step.

Setup (issue 11): the digits MLP (64 → 256 → 256 → 32, L2-normalised, ``DigitsEmbedder``)
on scikit-learn's digits, SGD (momentum 0.9), one fixed random batch per size, margin 0.2.
Losses: bundled batch-hard, bundled batch-all, and a foreign one, pytorch-metric-learning's
``TripletMarginLoss`` on ``BatchHardMiner`` triplets. For each loss and batch size the
variants run in interleaved blocks (ABC…ABC…) so that drift in the machine's speed hits all
alike; a variant's time is the median over blocks of the block's mean step time (recorded
and skipped steps together, so ``every`` is amortised), and overheads are ratios to the
plain variant of the same run:

* ``plain``: the loss alone (bundled: ``statistics=False``);
* ``stats on``: the bundled loss computing its statistics on every call, unwatched;
* ``every=1``, ``every=K``: watched, recording every step / every K-th step.

    python benchmarks/bench_watch.py                          # GPU if available, else CPU
    python benchmarks/bench_watch.py --device cpu --threads 1 --json watch.json
    python benchmarks/bench_watch.py --device cuda --sizes 256 2048 16384
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{model}, {torch.get_num_threads()} torch thread(s)"


class PMLBatchHard(torch.nn.Module):
    """pytorch-metric-learning's TripletMarginLoss on BatchHardMiner triplets."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        self.loss = losses.TripletMarginLoss(margin=margin)
        self.miner = miners.BatchHardMiner()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


LOSSES: dict[str, Callable[[bool], torch.nn.Module]] = {
    "batch-hard": lambda stats: cw.losses.BatchHardTripletLoss(0.2, statistics=stats),
    "batch-all": lambda stats: cw.losses.BatchAllTripletLoss(0.2, statistics=stats),
    "PML TripletMarginLoss + BatchHardMiner": lambda stats: PMLBatchHard(0.2),
}


_RUN_NUMBERS = itertools.count()


def time_block(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Mean seconds per step over ``steps`` consecutive steps (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(steps):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps
    begin = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - begin) / steps


def measure(
    loss_name: str,
    batch_size: int,
    device: torch.device,
    *,
    every: int,
    blocks: int,
    steps: int,
    logdir: str,
) -> dict[str, float]:
    """Median block-mean step time (ms) of every variant, measured interleaved."""
    images, digits = load_digits_tensors()
    index = torch.randint(0, len(images), (batch_size,), generator=torch.Generator().manual_seed(0))
    x, y = images[index].to(device), digits[index].to(device)
    torch.manual_seed(0)
    model = DigitsEmbedder().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    plain_loss = LOSSES[loss_name](False).to(device)
    bundled = isinstance(plain_loss, cw.losses.TripletLoss)

    def step_with(loss_fn: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def watched(interval: int) -> Callable[[int], float]:
        def run(block: int) -> float:
            with cw.watch(
                model,
                plain_loss,
                logdir=logdir,
                run=f"run-{next(_RUN_NUMBERS)}",
                every=interval,
                on_collapse="ignore",
            ):
                return time_block(step_with(plain_loss), steps, device)

        return run

    variants: dict[str, Callable[[int], float]] = {
        "plain": lambda block: time_block(step_with(plain_loss), steps, device)
    }
    if bundled:
        stats_loss = LOSSES[loss_name](True).to(device)
        variants["stats on"] = lambda block: time_block(step_with(stats_loss), steps, device)
    variants["every=1"] = watched(1)
    variants[f"every={every}"] = watched(every)
    for run in variants.values():  # warm-up: allocator, kernels, first-call costs
        run(-1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for block in range(blocks):
        for name, run in variants.items():
            times[name].append(run(block))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--every", type=int, default=10, help="the interval to compare")
    parser.add_argument("--blocks", type=int, default=5, help="blocks per variant")
    parser.add_argument(
        "--budget-s", type=float, default=4.0, help="seconds per block, capping its steps"
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    print(f"device: {device_name(device)} · torch {torch.__version__}")
    print(f"| loss | B | plain (ms) | stats on | every=1 | every={args.every} |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as logdir:
        for batch_size in args.sizes:
            for loss_name in args.losses:
                probe = measure(
                    loss_name, batch_size, device, every=1, blocks=1, steps=2, logdir=logdir
                )
                # Whole multiples of `every` per block, as many as the budget allows.
                steps = max(1, int(args.budget_s / (probe["every=1"] / 1e3) / args.every))
                steps *= args.every
                ms = measure(
                    loss_name,
                    batch_size,
                    device,
                    every=args.every,
                    blocks=args.blocks,
                    steps=steps,
                    logdir=logdir,
                )
                plain = ms["plain"]
                cells = [
                    "—" if name not in ms else f"{ms[name]:.2f} ({ms[name] / plain - 1:+.0%})"
                    for name in ("stats on", "every=1", f"every={args.every}")
                ]
                print(f"| {loss_name} | {batch_size} | {plain:.2f} | " + " | ".join(cells) + " |")
                results.append(
                    {"loss": loss_name, "batch_size": batch_size, "steps": steps, "ms": ms}
                )
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "blocks": args.blocks,
        "every": args.every,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
