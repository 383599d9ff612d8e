"""What ``watch()`` costs a training step: the same loop with and without it.

Setup (issue 3): seed 002's EmbeddingNet (28×28 single-channel inputs, 50-D output), batch
512, 10 classes, exact batch-all loss (margin 0.2), Adam. Inputs are random tensors: the
step time does not depend on the pixels. ``watch()`` runs at its defaults (every step
recorded, rank every 50, snapshots every 100, commit every 50 steps or 5 s).

Plain and watched loops alternate in blocks (ABAB…) so that drift in the machine's speed
hits both alike; the overhead is the ratio of the medians of the per-block mean step times.

    python benchmarks/bench_watch.py                  # GPU if available, else CPU
    python benchmarks/bench_watch.py --device cpu --blocks 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for examples/
import collapsewatch as cw
from examples.mnist_triplet import EmbeddingNet


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
    return f"{model}, {torch.get_num_threads()} threads"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(step, steps: int, device: torch.device) -> float:
    """Mean seconds per step over ``steps`` consecutive steps."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=6, help="blocks per variant")
    parser.add_argument("--steps", type=int, default=None, help="steps per block")
    parser.add_argument(
        "--check-finite",
        action="store_true",
        help="keep the loss's NaN check (one host sync per step on GPU)",
    )
    parser.add_argument("--json", type=Path, help="write the raw results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    steps = args.steps or (200 if device.type == "cuda" else 15)

    torch.manual_seed(0)
    model = EmbeddingNet(out_dim=50).to(device)
    loss_fn = cw.losses.BatchAllTripletLoss(margin=0.2, check_finite=args.check_finite)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(args.batch_size, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)

    def step() -> None:
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):  # warm-up: allocator, kernels, autotuning
        step()
    plain, watched = [], []
    with tempfile.TemporaryDirectory() as logdir:
        for block in range(args.blocks):
            plain.append(time_block(step, steps, device))
            with cw.watch(
                model, loss_fn, logdir=logdir, run=f"bench-{block}", on_collapse="ignore"
            ):
                watched.append(time_block(step, steps, device))
    plain_ms = statistics.median(plain) * 1e3
    watched_ms = statistics.median(watched) * 1e3
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "steps_per_block": steps,
        "blocks": args.blocks,
        "check_finite": args.check_finite,
        "plain_ms": plain_ms,
        "watched_ms": watched_ms,
        "overhead_percent": (watched_ms / plain_ms - 1) * 100,
        "plain_blocks_ms": [t * 1e3 for t in plain],
        "watched_blocks_ms": [t * 1e3 for t in watched],
    }
    print(f"device: {result['device']} · torch {result['torch']}")
    print("| step | plain (ms) | with watch() (ms) | overhead |")
    print("|---|---|---|---|")
    print(
        f"| EmbeddingNet, batch {args.batch_size}, batch-all, Adam | {plain_ms:.2f} | "
        f"{watched_ms:.2f} | {result['overhead_percent']:+.1f} % |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
