"""What ``watch()`` and the bundled losses' statistics cost a training step.

Setup (issue 11): the digits MLP (64 → 256 → 256 → 32, L2-normalised, ``DigitsEmbedder``)
on scikit-learn's digits, SGD (momentum 0.9), one fixed random batch per size, margin 0.2.
Losses: bundled batch-hard, bundled batch-all, and a foreign one, pytorch-metric-learning's
``TripletMarginLoss`` on ``BatchHardMiner`` triplets. For each loss and batch size the
variants run in interleaved blocks (ABC…ABC…) so that drift in the machine's speed hits all
alike; a variant's time is the median over blocks of the block's mean step time (recorded
and skipped steps together, so ``every`` is amortised), and overheads are ratios to the
plain variant of the same run:

* ``plain``: the loss alone (bundled: ``statistics=False``, the default);
* ``stats on``: the bundled loss computing its statistics on every call, unwatched;
* ``watched``: ``watch()`` at its defaults: recording and difficulty intervals chosen by
  ``"auto"`` for ``overhead=0.03`` (shown in the last two columns);
* ``watched, every=1``: every step recorded, difficulty counts at the "auto" interval;
* ``watched, counts every step``: ``every=1, difficulty_every=1``, every statistic on
  every step.

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

        self.margin = margin  # what watch() reads; the wrapped loss holds it too
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


VARIANTS = ("stats on", "watched", "watched, every=1", "watched, counts every step")


def measure(
    loss_name: str,
    batch_size: int,
    device: torch.device,
    *,
    blocks: int,
    steps: int,
    logdir: str,
) -> tuple[dict[str, float], dict[str, tuple[int | None, int | None]]]:
    """Median block-mean step time (ms) of every variant, measured interleaved, and the
    recording and difficulty intervals each watched variant chose.

    Each variant trains its own copy of the same model with its own loss, optimiser and (if
    watched) one ``watch()`` for all its blocks, so the calibration of the "auto" intervals
    happens once, in the warm-up block, as in a real run.
    """
    images, digits = load_digits_tensors()
    index = torch.randint(0, len(images), (batch_size,), generator=torch.Generator().manual_seed(0))
    x, y = images[index].to(device), digits[index].to(device)

    def trainer(loss_fn: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[], None]]:
        torch.manual_seed(0)
        model = DigitsEmbedder().to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return model, step

    watchers: dict[str, cw.Watcher] = {}
    variants: dict[str, Callable[[], None]] = {"plain": trainer(LOSSES[loss_name](False))[1]}
    if isinstance(LOSSES[loss_name](False), cw.losses.TripletLoss):
        variants["stats on"] = trainer(LOSSES[loss_name](True))[1]
    options = {
        "watched": {},
        "watched, every=1": {"every": 1},
        "watched, counts every step": {"every": 1, "difficulty_every": 1},
    }
    for name, watch_options in options.items():
        loss_fn = LOSSES[loss_name](False)
        model, step = trainer(loss_fn)
        watchers[name] = cw.watch(
            model,
            loss_fn,
            logdir=logdir,
            run=f"run-{next(_RUN_NUMBERS)}",
            on_collapse="ignore",
            **watch_options,
        )
        variants[name] = step
    try:
        for step in variants.values():  # warm-up: allocator, kernels, the interval's choice
            time_block(step, max(steps, 60), device)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(blocks):
            for name, step in variants.items():
                times[name].append(time_block(step, steps, device))
    finally:
        for watcher in watchers.values():
            watcher.close()
    intervals = {name: (w.cadence.every, w.cadence.interval) for name, w in watchers.items()}
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, intervals


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--blocks", type=int, default=7, help="blocks per variant")
    parser.add_argument(
        "--budget-s", type=float, default=2.0, help="seconds per block, capping its steps"
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = []
    names = list(VARIANTS)
    print(f"device: {device_name(device)} · torch {torch.__version__}")
    print("| loss | B | plain (ms) | " + " | ".join(names) + " | every | difficulty_every |")
    print("|---|---:|---:|" + "---:|" * len(names) + "---:|---:|")
    with tempfile.TemporaryDirectory() as logdir:
        for batch_size in args.sizes:
            for loss_name in args.losses:
                probe, _ = measure(loss_name, batch_size, device, blocks=1, steps=2, logdir=logdir)
                # As many steps per block as the budget allows.
                slowest = max(probe.values()) / 1e3
                steps = max(10, int(args.budget_s / slowest))
                ms, intervals = measure(
                    loss_name,
                    batch_size,
                    device,
                    blocks=args.blocks,
                    steps=steps,
                    logdir=logdir,
                )
                plain = ms["plain"]
                cells = [
                    "—" if name not in ms else f"{ms[name]:.2f} ({ms[name] / plain - 1:+.0%})"
                    for name in names
                ]
                chosen = intervals["watched"]
                print(
                    f"| {loss_name} | {batch_size} | {plain:.2f} | "
                    + " | ".join(cells)
                    + f" | {chosen[0]} | {chosen[1]} |",
                    flush=True,
                )
                results.append(
                    {
                        "loss": loss_name,
                        "batch_size": batch_size,
                        "steps": steps,
                        "ms": ms,
                        "every, difficulty_every": intervals,
                    }
                )
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "blocks": args.blocks,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
