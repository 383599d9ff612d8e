"""Calibration of the collapse detector beyond digits: verdicts against an independent truth.

Small MLP embedders (in → 128 → 128 → [1 →] 32, L2-normalised output) are trained with the
bundled triplet losses on scikit-learn data sets under ``watch()``; each run's final
detector state (the live verdict, replayed by ``analyze`` from the run file) is compared
with a ground truth measured on a held-out split with clean labels, which the detector
never sees. The rule, fixed before any run (docs/detector.md, "Calibration"):

* **complete collapse**: the held-out mean pairwise distance after the last step is below
  0.1 × the largest held-out mean pairwise distance measured during the run (every 25
  steps, and at step 0);
* **dimensional collapse**: C ≥ 5 classes and the held-out embeddings (centred) need at
  most (C − 1)/2 principal components to explain 90 % of their variance;
* otherwise healthy. kNN accuracy (k = 5, scikit-learn ``KNeighborsClassifier`` fitted on
  the training split's embeddings with clean labels, scored on the held-out split) is
  reported beside it.

A false alarm is a healthy run whose detector state at the end is "warning" or
"collapsed"; a miss is a collapsed run the detector leaves "healthy".

    python benchmarks/calibrate_detector.py                 # prints the Markdown table
    python benchmarks/calibrate_detector.py --write-doc     # and puts it in docs/detector.md
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import MinMaxScaler, StandardScaler
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import collapsewatch as cw
from collapsewatch.losses import BatchAllTripletLoss, BatchHardTripletLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_regimes import SPARSE_INTERVALS, same_verdict

DOC = Path(__file__).resolve().parents[1] / "docs" / "detector.md"
START, END = "<!-- calibration:start -->", "<!-- calibration:end -->"
EVAL_EVERY = 25
COMPLETE_FRACTION = 0.1  # held-out distance / its peak below this: complete collapse
VARIANCE_SHARE = 0.9  # principal components that explain this share of the variance


def _digits() -> tuple[np.ndarray, np.ndarray]:
    return datasets.load_digits(return_X_y=True)


def _mixture() -> tuple[np.ndarray, np.ndarray]:
    # A high-dimensional Gaussian mixture: 20 classes in 100 features, 30 of them informative.
    return datasets.make_classification(
        n_samples=3000,
        n_features=100,
        n_informative=30,
        n_redundant=10,
        n_classes=20,
        n_clusters_per_class=1,
        class_sep=2.0,
        random_state=0,
    )


def _blobs() -> tuple[np.ndarray, np.ndarray]:
    return datasets.make_blobs(
        n_samples=1600, n_features=64, centers=8, cluster_std=4.0, random_state=0
    )


DATASETS = {
    "digits": _digits,
    "wine": lambda: datasets.load_wine(return_X_y=True),
    "breast-cancer": lambda: datasets.load_breast_cancer(return_X_y=True),
    "mixture-20": _mixture,
    "blobs-8": _blobs,
}


@dataclass(frozen=True)
class Config:
    """One training configuration, run once per seed."""

    name: str
    dataset: str
    mining: str = "batch_hard"
    scaled: bool = True
    lr: float = 0.05
    noise: float = 0.0  # share of training labels replaced by a random other class
    bottleneck: bool = False  # a 1-unit layer before the 32-d output
    unit_range: bool = False  # features min-max scaled to [0, 1] (as the demo's digits / 16)

    def loss(self) -> nn.Module:
        if self.mining == "batch_all":
            return BatchAllTripletLoss(margin=0.2, scaled=self.scaled)
        return BatchHardTripletLoss(margin=0.2, scaled=self.scaled)


# Batch-all through a 1-unit layer: a partial collapse onto a curve (plain batch-hard or the
# scaled loss through it collapse completely, which the plateau rule already catches).
BOTTLENECK = {"bottleneck": True, "mining": "batch_all", "scaled": False}
CONFIGS = (
    Config("digits scaled", "digits"),
    Config("digits batch-all lr 0.5", "digits", mining="batch_all", scaled=False, lr=0.5),
    Config("digits batch-hard lr 0.5", "digits", scaled=False, lr=0.5, unit_range=True),
    Config("digits 1-unit bottleneck", "digits", **BOTTLENECK),
    Config("digits 35 % noise", "digits", noise=0.35),
    Config("wine scaled", "wine"),
    Config("wine batch-hard lr 0.5", "wine", scaled=False, lr=0.5, unit_range=True),
    Config("wine 35 % noise", "wine", noise=0.35),
    Config("breast-cancer batch-hard", "breast-cancer", scaled=False),
    Config(
        "breast-cancer batch-hard lr 0.5", "breast-cancer", scaled=False, lr=0.5, unit_range=True
    ),
    Config("breast-cancer 1-unit bottleneck", "breast-cancer", **BOTTLENECK),
    Config("breast-cancer 35 % noise", "breast-cancer", noise=0.35),
    Config("mixture-20 scaled", "mixture-20"),
    Config("mixture-20 40 % noise", "mixture-20", noise=0.4),
    Config("mixture-20 batch-hard lr 0.5", "mixture-20", scaled=False, lr=0.5, unit_range=True),
    Config("mixture-20 1-unit bottleneck", "mixture-20", **BOTTLENECK),
    Config("blobs-8 batch-all", "blobs-8", mining="batch_all", scaled=False, lr=0.1),
    Config("blobs-8 1-unit bottleneck", "blobs-8", **BOTTLENECK),
)


class Embedder(nn.Module):
    """MLP in → 128 → 128 → [1 →] 32 with L2-normalised output: (N, in) → (N, 32)."""

    def __init__(self, features: int, bottleneck: bool) -> None:
        super().__init__()
        width = 1 if bottleneck else 128
        self.layers = nn.Sequential(
            nn.Linear(features, 128),
            nn.ReLU(),
            nn.Linear(128, width),
            nn.ReLU() if not bottleneck else nn.Identity(),
            nn.Linear(width, 32),
        )

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(self.layers(x), dim=1)


def noisy(labels: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``labels`` with ``share`` of them replaced by a uniformly drawn *other* class."""
    classes = np.unique(labels)
    flip = rng.random(len(labels)) < share
    shift = rng.integers(1, len(classes), size=len(labels))
    index = np.searchsorted(classes, labels)
    return np.where(flip, classes[(index + shift) % len(classes)], labels)


def mean_pairwise_distance(z: Tensor) -> float:
    n = z.shape[0]
    return float(torch.cdist(z, z).sum() / (n * (n - 1)))


def components_for(z: np.ndarray, share: float) -> int:
    """Principal components of the centred rows ``z`` needed to explain ``share`` of the
    variance."""
    variances = np.linalg.svd(z - z.mean(axis=0), compute_uv=False) ** 2
    return int(np.searchsorted(np.cumsum(variances) / variances.sum(), share) + 1)


@dataclass(frozen=True)
class Outcome:
    truth: str  # "healthy", "collapsed" or "dimensional"
    state: str  # the detector's state after the last step
    events: tuple[str, ...]
    knn: float
    components: int
    distance_ratio: float
    batch_rank: float
    classes: int
    # The recorded rows thinned to every 4th / 10th step and replayed: the same end state and
    # an onset within one interval of the every-step one.
    interval_agrees: tuple[bool, ...]


def run(config: Config, seed: int, steps: int, logdir: Path) -> Outcome:
    x, y = DATASETS[config.dataset]()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=seed
    )
    scaler = (MinMaxScaler() if config.unit_range else StandardScaler()).fit(x_train)
    x_train = torch.tensor(scaler.transform(x_train), dtype=torch.float32)
    x_test = torch.tensor(scaler.transform(x_test), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    train_labels = torch.tensor(noisy(y_train, config.noise, rng) if config.noise else y_train)
    torch.manual_seed(seed)
    model = Embedder(x.shape[1], config.bottleneck)
    loss_fn = config.loss()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)

    def embed(rows: Tensor) -> Tensor:
        model.eval()
        with torch.no_grad():  # not a training step: watch() does not record it
            out = model(rows)
        model.train()
        return out

    distances = [mean_pairwise_distance(embed(x_test))]
    name = f"{config.name.replace(' ', '-').replace('%', 'pc')}-{seed}"
    watcher = cw.watch(
        model,
        loss_fn,
        logdir=logdir,
        run=name,
        # Every step, so that the table does not depend on this machine's timings (which
        # "auto" reads); the replays below thin the rows to what sparser recordings hold.
        every=1,
        rank_every=10,
        snapshot_every=0,
        on_collapse="ignore",
    )
    with watcher:
        for step in range(1, steps + 1):
            index = torch.randint(0, len(train_labels), (128,), generator=generator)
            loss = loss_fn(model(x_train[index]), train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % EVAL_EVERY == 0:
                distances.append(mean_pairwise_distance(embed(x_test)))
    test = embed(x_test)
    knn = KNeighborsClassifier(n_neighbors=5).fit(embed(x_train).numpy(), y_train)
    classes = len(np.unique(y))
    components = components_for(test.numpy().astype(np.float64), VARIANCE_SHARE)
    ratio = distances[-1] / max(distances)
    if ratio < COMPLETE_FRACTION:
        truth = "collapsed"
    elif classes >= 5 and components <= (classes - 1) / 2:
        truth = "dimensional"
    else:
        truth = "healthy"
    recorded = cw.load_run(watcher.path)
    verdict = cw.analyze(recorded)
    ranks = recorded.metrics["effective_rank"].dropna()
    interval_agrees = tuple(same_verdict(recorded, every) for every in SPARSE_INTERVALS)
    return Outcome(
        truth=truth,
        state=verdict.state,
        events=tuple(e.kind for e in verdict.events),
        knn=float(knn.score(test.numpy(), y_test)),
        components=components,
        distance_ratio=ratio,
        batch_rank=float(ranks.iloc[-1]),
        classes=classes,
        interval_agrees=interval_agrees,
    )


def _span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return (
        format(low, fmt) if format(low, fmt) == format(high, fmt) else (f"{low:{fmt}}–{high:{fmt}}")
    )


def table(results: dict[Config, list[Outcome]]) -> tuple[str, int, int]:
    """The Markdown table and the false-alarm and miss counts."""
    lines = [
        "| run | C | truth (per seed) | detector at the end | false alarms | misses "
        "| kNN acc. | held-out PCs for 90 % | held-out dist. / peak | last batch eff. rank "
        f"| same at every {', '.join(map(str, SPARSE_INTERVALS))} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    false_alarms = misses = 0
    for config, outcomes in results.items():
        flagged = [o.state != "healthy" for o in outcomes]
        healthy = [o.truth == "healthy" for o in outcomes]
        fa = sum(f and h for f, h in zip(flagged, healthy, strict=True))
        miss = sum(not f and not h for f, h in zip(flagged, healthy, strict=True))
        false_alarms, misses = false_alarms + fa, misses + miss
        lines.append(
            f"| {config.name} | {outcomes[0].classes} "
            f"| {', '.join(o.truth for o in outcomes)} "
            f"| {', '.join(o.state for o in outcomes)} | {fa} | {miss} "
            f"| {_span([o.knn for o in outcomes], '.2f')} "
            f"| {_span([o.components for o in outcomes], 'd')} "
            f"| {_span([o.distance_ratio for o in outcomes], '.2g')} "
            f"| {_span([o.batch_rank for o in outcomes], '.2f')} "
            f"| {', '.join('yes' if all(o.interval_agrees) else 'no' for o in outcomes)} |"
        )
    runs = sum(len(o) for o in results.values())
    differ = sum(not all(o.interval_agrees) for group in results.values() for o in group)
    lines.append(
        f"| **all {runs} runs** | | | | **{false_alarms}** | **{misses}** | | | | "
        f"| **{differ}** read differently |"
    )
    return "\n".join(lines), false_alarms, misses


def _logdir(keep: Path | None) -> contextlib.AbstractContextManager[str]:
    """The folder for the run files: ``keep`` (created) to inspect them, else a temporary one."""
    if keep is None:
        return tempfile.TemporaryDirectory()
    keep.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(keep))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", help="run only the configurations whose name contains this")
    parser.add_argument("--write-doc", action="store_true", help="update docs/detector.md")
    parser.add_argument(
        "--logdir", type=Path, help="keep the run files here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a fair share of a small shared machine
    configs = [c for c in CONFIGS if args.only is None or args.only in c.name]
    results: dict[Config, list[Outcome]] = {}
    start = time.perf_counter()
    with _logdir(args.logdir) as logdir, warnings.catch_warnings():
        warnings.simplefilter("ignore", cw.CollapseWarning)
        for config in configs:
            results[config] = [
                run(config, seed, args.steps, Path(logdir)) for seed in range(args.seeds)
            ]
            print(
                f"{config.name}: {[o.truth for o in results[config]]} "
                f"{[o.state for o in results[config]]} {[o.events for o in results[config]]}",
                file=sys.stderr,
                flush=True,
            )
    text, false_alarms, misses = table(results)
    elapsed = time.perf_counter() - start
    footer = (
        f"\n\n{sum(map(len, results.values()))} runs of {args.steps} steps, seeds 0–"
        f"{args.seeds - 1}, {elapsed / 60:.1f} min on one CPU thread "
        f"(`python benchmarks/calibrate_detector.py`)."
    )
    print(text + footer)
    if args.write_doc:
        doc = DOC.read_text()
        head, rest = doc.split(START)
        _, tail = rest.split(END)
        DOC.write_text(f"{head}{START}\n{text}{footer}\n{END}{tail}")
    return 1 if false_alarms or misses else 0


if __name__ == "__main__":
    raise SystemExit(main())
