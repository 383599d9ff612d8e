"""The demo: two triplet-loss runs on scikit-learn's 8×8 digits, one of which collapses.

Real data with nothing to download: scikit-learn ships the 1,797 handwritten digits. Both
runs train the same MLP (64 → 256 → 256 → 32, L2-normalised output) with SGD (momentum
0.9) on random batches of 256, margin 0.2:

* ``batch-hard``: plain batch-hard at lr 0.5 — collapses within a few dozen steps and stays
  collapsed for the demo's 600 steps (runs escape on their own after 800–1,200 steps);
* ``batch-hard-scaled``: the scaled variant at lr 0.05 — trains to zero loss.
"""

from __future__ import annotations

import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from collapsewatch.losses import BatchAllTripletLoss, BatchHardTripletLoss, TripletLoss
from collapsewatch.store import Event
from collapsewatch.watch import CollapseWarning, Watcher, watch


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as (1797, 64) float32 in [0, 1] and (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return torch.tensor(images / 16.0, dtype=torch.float32), torch.tensor(labels)


class DigitsEmbedder(nn.Module):
    """MLP 64 → 256 → 256 → ``dim`` with L2-normalised output: (N, 64) → (N, dim)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, dim)
        )

    def forward(self, images: Tensor) -> Tensor:
        return nn.functional.normalize(self.layers(images), dim=1)


def random_batches(
    num_samples: int, batch_size: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Endless random index batches (with replacement across batches)."""
    while True:
        yield torch.randint(0, num_samples, (batch_size,), generator=generator)


@dataclass(frozen=True)
class DigitsRun:
    """One demo run: the loss, its variant and the learning rate."""

    name: str
    mining: str = "batch_hard"
    scaled: bool = False
    lr: float = 0.5
    margin: float = 0.2
    batch_size: int = 256

    def loss(self) -> TripletLoss:
        loss_class = BatchHardTripletLoss if self.mining == "batch_hard" else BatchAllTripletLoss
        return loss_class(margin=self.margin, scaled=self.scaled)


DEMO_RUNS = (
    DigitsRun("batch-hard", scaled=False, lr=0.5),
    DigitsRun("batch-hard-scaled", scaled=True, lr=0.05),
)


@dataclass
class DigitsTrainer:
    """A run being trained: model, loss, optimiser and its ``watch()`` hooks."""

    spec: DigitsRun
    watcher: Watcher
    model: DigitsEmbedder
    loss_fn: TripletLoss
    optimizer: torch.optim.Optimizer
    batches: Iterator[Tensor]
    data: tuple[Tensor, Tensor]
    losses: list[float] = field(default_factory=list)

    def step(self) -> Tensor:
        images, labels = self.data
        index = next(self.batches)
        loss = self.loss_fn(self.model(images[index]), labels[index])
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss


def start_run(
    spec: DigitsRun,
    *,
    logdir: str | Path,
    run: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    data: tuple[Tensor, Tensor] | None = None,
    **watch_options: Any,
) -> DigitsTrainer:
    """Build the model and optimiser for ``spec`` and attach ``watch()`` to them."""
    torch.manual_seed(seed)
    images, labels = data if data is not None else load_digits_tensors()
    images, labels = images.to(device), labels.to(device)
    model = DigitsEmbedder().to(device)
    loss_fn = spec.loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    batches = (b.to(device) for b in random_batches(len(labels), spec.batch_size, generator))
    watcher = watch(
        model,
        loss_fn,
        logdir=logdir,
        run=run or spec.name,
        config={
            "dataset": "sklearn-digits",
            **{k: getattr(spec, k) for k in spec.__dataclass_fields__},
        },
        **watch_options,
    )
    return DigitsTrainer(spec, watcher, model, loss_fn, optimizer, batches, (images, labels))


def train(trainer: DigitsTrainer, steps: int) -> Path:
    """Train for ``steps`` steps, close the run and return its path."""
    with trainer.watcher:
        for _ in range(steps):
            trainer.step()
    return trainer.watcher.path


def run_demo(
    *,
    steps: int = 600,
    logdir: str | Path = "runs/demo",
    device: str = "cpu",
    runs: Sequence[DigitsRun] = DEMO_RUNS,
    dashboard: int | None = 8050,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> list[Path]:
    """Train ``runs`` side by side (one step of each in turn) and return their run paths.

    Each run gets its own progress bar; the detector's collapse warning is printed as
    soon as a run collapses. With ``dashboard`` set, the dashboard for ``logdir`` is served
    from a child process on that port while the runs train.
    """
    logdir = Path(logdir)
    data = load_digits_tensors()
    stamp = _unique_suffix(logdir, runs)

    def announce(event: Event) -> None:
        say(f"\n⚠ {event.message}\n  {event.suggestion}")

    trainers = [
        start_run(
            spec,
            logdir=logdir,
            run=f"{spec.name}{stamp}",
            device=device,
            seed=0,
            data=data,
            on_collapse=announce,
            dashboard=(dashboard or False) if i == 0 else False,
        )
        for i, spec in enumerate(runs)
    ]
    if dashboard:
        # The first run's watch() started it; wait until it answers so the URL works.
        url = f"http://127.0.0.1:{dashboard}/"
        if _wait_until_serving(url):
            say(f"dashboard ready: {url} — open it to watch the runs train")
        else:
            say(f"the dashboard at {url} did not answer yet; the runs train anyway")
    bars = [
        tqdm(total=steps, desc=t.spec.name, position=i, disable=not progress, leave=True)
        for i, t in enumerate(trainers)
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CollapseWarning)
            for _ in range(steps):
                for trainer, bar in zip(trainers, bars, strict=True):
                    loss = trainer.step()
                    bar.update()
                    if bar.n % 25 == 0:
                        bar.set_postfix(loss=f"{loss.item():.4f}", state=trainer.watcher.state)
    finally:
        for trainer, bar in zip(trainers, bars, strict=True):
            bar.close()
            trainer.watcher.close()
    return [t.watcher.path for t in trainers]


def _wait_until_serving(url: str, timeout: float = 60.0) -> bool:
    """Poll ``url`` until it answers (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.25)
    return False


def _unique_suffix(logdir: Path, runs: Sequence[DigitsRun]) -> str:
    """ "" the first time, then "-2", "-3", … so repeated demos never overwrite a run."""
    suffix, n = "", 1
    while any((logdir / f"{spec.name}{suffix}.cwrun").exists() for spec in runs):
        n += 1
        suffix = f"-{n}"
    return suffix
