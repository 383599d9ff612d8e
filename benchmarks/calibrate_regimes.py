"""The detector against an independent truth, across regimes rather than data sets.

Each run trains a small MLP embedder on a scikit-learn data set under ``watch()`` (every=1)
and, every ``PROBE_EVERY`` steps, measures the truth on a held-out split with its own code
(never collapsewatch's): the model in eval mode under no_grad, the held-out embeddings'
mean pairwise distance (under the loss's distance) and 5-NN accuracy (fitted on a training
split's embeddings). The truth (revised once, see below):

* **collapsed** at a probe step when the held-out spread is below 0.1 × its largest value so
  far, or, at the last ``CONFIRM_PROBES`` probes, the 5-NN accuracy is below chance + 0.25 ×
  (raw-input 5-NN − chance) (a model that never separated anything); non-finite held-out
  embeddings are **diverged** (failed, like the detector's "collapsed" and "diverged");
* a **collapse** begins with ``CONFIRM_PROBES`` collapsed probes in a row and ends with
  ``RECOVERY_PROBES`` that are not: each probe stands for the ``PROBE_EVERY`` steps around
  it, so a stretch of them stands for the detector's ``window`` (and ``recovery_window``)
  of 20 training steps; its **onset** is the first probe of that stretch;
* the run is **collapsed at its end** if its last collapse has not ended, **recovered** if it
  has, otherwise healthy.

Revised once: the first rule probed every 10 steps and asked for three collapsed probes in a
row at the end (or anywhere, for a collapse that recovered), which stands for 30 steps, half
again the detector's 20, and counted a single clear probe as a recovery. docs/detector.md
gives both tables.

A **false alarm** is a run healthy at its end (by the truth) whose detector state at the end
is "warning" or "collapsed", or a run never collapsed by the truth with a collapse event; a
**miss** is a run collapsed at its end that the detector leaves "healthy", or a collapse the
detector never reports. The onset is **on time** when the detector's first collapse comes
at most max(50, 10 % of the run) steps after the truth onset and at most 20 before.

    python benchmarks/calibrate_regimes.py                # the Markdown table
    python benchmarks/calibrate_regimes.py --write-doc    # and put it in docs/detector.md
    python benchmarks/calibrate_regimes.py --only many-classes --seeds 1
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import collapsewatch as cw
from collapsewatch.detect import thin
from collapsewatch.losses import BatchAllTripletLoss, BatchHardTripletLoss

DOC = Path(__file__).resolve().parents[1] / "docs" / "detector.md"
START, END = "<!-- regimes:start -->", "<!-- regimes:end -->"
PROBE_EVERY = 5
# Probes in a row that begin (end) a collapse: together they stand for the detector's
# window (recovery_window) of training steps.
CONFIRM_PROBES = math.ceil(cw.DetectorConfig().window / PROBE_EVERY)
RECOVERY_PROBES = math.ceil(cw.DetectorConfig().recovery_window / PROBE_EVERY)
SPREAD_FRACTION = 0.1
KNN_SHARE = 0.25
SPARSE_INTERVALS = (4, 10)  # the recorded rows thinned to these intervals and replayed


class SupervisedInfoNCE(nn.Module):
    """A margin-free supervised contrastive loss (SupCon-style) with a temperature: each
    row against every other row of the batch, same-label rows as positives. ``normalize``:
    it L2-normalises the embeddings itself (the model's output is raw)."""

    def __init__(self, temperature: float = 0.1, normalize: bool = True) -> None:
        super().__init__()
        self.temperature, self.normalize = temperature, normalize

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        z = F.normalize(embeddings, dim=1) if self.normalize else embeddings
        logits = z @ z.T / self.temperature
        eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(eye, -torch.inf)
        positive = (labels[:, None] == labels[None, :]) & ~eye
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        per_row = -(log_prob.masked_fill(~positive, 0).sum(1)) / positive.sum(1).clamp_min(1)
        return per_row[positive.any(1)].mean()


class Embedder(nn.Module):
    def __init__(self, inputs: int, dim: int, normalize: bool, init_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(inputs, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim)
        )
        self.normalize = normalize
        with torch.no_grad():
            self.body[-1].weight.mul_(init_scale)
            self.body[-1].bias.mul_(init_scale)

    def forward(self, x: Tensor) -> Tensor:
        z = self.body(x)
        return F.normalize(z, dim=1) if self.normalize else z


@dataclass
class Regime:
    """One kind of run: the data, the model, the loss and the schedule of the lr."""

    name: str
    what: str
    expect: str  # what the regime is built to do: "collapse", "healthy", "recover", "diverge"
    loss: Callable[[], nn.Module]
    lr: float | Callable[[int], float]
    steps: int = 400
    classes: int = 10
    per_class: int = 8  # P×K batches: `classes_per_batch` classes × per_class rows
    classes_per_batch: int = 16
    dim: int = 32
    normalize: bool = True
    init_scale: float = 1.0
    distance: str = "euclidean"
    switch: Callable[[int, nn.Module], None] | None = None  # a change mid-run
    features: int = 64
    options: dict = field(default_factory=dict)


def _data(regime: Regime, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if regime.classes == 10 and regime.features == 64:
        x, y = datasets.load_digits(return_X_y=True)
    else:
        x, y = datasets.make_classification(
            n_samples=max(60 * regime.classes, 3000),
            n_features=regime.features,
            n_informative=min(regime.features, 40),
            n_redundant=0,
            n_classes=regime.classes,
            n_clusters_per_class=1,
            class_sep=2.0,
            random_state=seed,
        )
    return StandardScaler().fit_transform(x).astype(np.float32), y


def _batches(labels: np.ndarray, regime: Regime, rng: np.random.Generator):
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    classes = np.array(sorted(by_class))
    while True:
        chosen = rng.choice(
            classes, size=min(regime.classes_per_batch, len(classes)), replace=False
        )
        yield np.concatenate([rng.choice(by_class[c], regime.per_class) for c in chosen])


def _truth_probe(model: nn.Module, train: Tensor, train_y: np.ndarray, held: Tensor,
                 held_y: np.ndarray, distance: str) -> tuple[float, float, float]:  # fmt: skip
    """The held-out mean pairwise distance, 5-NN accuracy and mean distance between rows of
    different classes (shown beside the truth, not part of it: unlike the mean over all
    pairs it does not depend on how many rows of a class a batch holds)."""
    model.eval()
    with torch.no_grad():
        fitted, probe = model(train), model(held)
    model.train()
    if not (torch.isfinite(fitted).all() and torch.isfinite(probe).all()):
        return math.nan, math.nan, math.nan  # diverged: no geometry left to judge
    if distance == "cosine":
        unit = F.normalize(probe, dim=1)
        pairs = 1 - unit @ unit.T
    else:
        pairs = torch.cdist(probe, probe)
    labels = torch.from_numpy(held_y)
    between = pairs[labels[:, None] != labels[None, :]]
    knn = KNeighborsClassifier(5).fit(fitted.numpy(), train_y)
    return float(pairs.mean()), float(knn.score(probe.numpy(), held_y)), float(between.mean())


@dataclass
class Outcome:
    regime: Regime
    seed: int
    truth_end: bool
    truth_onset: int | None
    truth_ever: bool
    state: str
    onset: int | None
    ever_collapsed: bool
    final_knn: float
    raw_knn: float
    chance: float
    seconds: float
    diverged: bool = False  # non-finite held-out embeddings at some probe
    # The recorded rows thinned to every 4th / 10th step and replayed: the same end state and
    # an onset within one interval of the dense one.
    interval_agrees: tuple[bool, ...] = ()
    # (step, held-out spread / its peak so far, between-class spread / its peak so far)
    probe_ratios: tuple[tuple[int, float, float], ...] = ()

    FAILED = ("collapsed", "diverged")

    @property
    def truth(self) -> str:
        if self.diverged:
            return "diverged"
        return "collapsed" if self.truth_end else "recovered" if self.truth_ever else "healthy"

    @property
    def false_alarm(self) -> bool:
        healthy_end = not self.truth_end and self.state in ("warning", *self.FAILED)
        return healthy_end or (not self.truth_ever and self.ever_collapsed)

    @property
    def miss(self) -> bool:
        return (self.truth_end and self.state not in self.FAILED) or (
            self.truth_ever and not self.ever_collapsed
        )

    @property
    def delay(self) -> int | None:
        if self.onset is None or self.truth_onset is None:
            return None
        return self.onset - self.truth_onset

    @property
    def on_time(self) -> bool:
        if self.delay is None:
            return not (self.truth_ever and not self.ever_collapsed)
        return -20 <= self.delay <= max(50, self.regime.steps // 10)


def run(regime: Regime, seed: int, logdir: Path) -> Outcome:
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = _data(regime, seed)
    x_train, x_held, y_train, y_held = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    chance = float(np.bincount(y_held).max() / len(y_held))
    raw_knn = float(KNeighborsClassifier(5).fit(x_train, y_train).score(x_held, y_held))
    train_t, held_t = torch.from_numpy(x_train), torch.from_numpy(x_held)
    fit_rows = rng.choice(len(x_train), size=min(len(x_train), 1500), replace=False)
    model = Embedder(x.shape[1], regime.dim, regime.normalize, regime.init_scale)
    loss_fn = regime.loss()
    lr_of = regime.lr if callable(regime.lr) else (lambda step, lr=regime.lr: lr)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr_of(0), momentum=0.9)
    batches = _batches(y_train, regime, rng)
    labels = torch.from_numpy(y_train)
    probes: list[tuple[int, float, float, float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cw.watch(model, loss_fn, logdir=logdir, run=f"{regime.name}-{seed}", every=1,
                      on_collapse="ignore", **regime.options) as watcher:  # fmt: skip
            for step in range(regime.steps):
                if step % PROBE_EVERY == 0:
                    spread, knn, between = _truth_probe(
                        model, train_t[fit_rows], y_train[fit_rows], held_t, y_held,
                        regime.distance,
                    )  # fmt: skip
                    probes.append((step, spread, knn, between))
                if regime.switch is not None:
                    regime.switch(step, loss_fn)
                for group in optimizer.param_groups:
                    group["lr"] = lr_of(step)
                rows = next(batches)
                loss = loss_fn(model(train_t[rows]), labels[rows])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    collapsed_at: list[tuple[int, bool]] = []
    peak = 0.0
    diverged = any(math.isnan(spread) for _, spread, _, _ in probes)
    ratios, peak_between = [], 0.0
    for i, (step, spread, knn, between) in enumerate(probes):
        if math.isnan(spread):  # diverged: counted as failed, like the detector's states
            collapsed_at.append((step, True))
            continue
        peak, peak_between = max(peak, spread), max(peak_between, between)
        ratios.append((step, spread / peak, between / peak_between))
        # kNN near chance says "never separated" only from the last probes on: at random
        # initialisation, with many classes, every model is near chance.
        low_knn = i >= len(probes) - CONFIRM_PROBES and knn < chance + KNN_SHARE * (
            raw_knn - chance
        )
        collapsed_at.append((step, spread < SPREAD_FRACTION * peak or low_knn))
    onsets, truth_end = truth_collapses(collapsed_at)
    truth_ever = bool(onsets)
    truth_onset = onsets[-1] if truth_end else onsets[0] if onsets else None
    recorded = cw.load_run(watcher.path)
    verdict = cw.analyze(recorded)
    interval_agrees = tuple(same_verdict(recorded, every) for every in SPARSE_INTERVALS)
    failed_once = verdict.collapsed or verdict.diverged_step is not None
    onset = verdict.onset_step if verdict.onset_step is not None else verdict.diverged_step
    state = str(verdict.state)
    return Outcome(
        regime, seed, truth_end, truth_onset, truth_ever, state, onset, failed_once,
        probes[-1][2], raw_knn, chance, time.perf_counter() - started, diverged,
        interval_agrees, tuple(ratios),
    )  # fmt: skip


def truth_collapses(collapsed_at: list[tuple[int, bool]]) -> tuple[list[int], bool]:
    """The onsets of the collapses in (probe step, collapsed) pairs, and whether the last one
    lasts to the end: a collapse begins with ``CONFIRM_PROBES`` collapsed probes in a row
    (its onset, the first of them) and ends with ``RECOVERY_PROBES`` in a row that are not."""
    onsets: list[int] = []
    collapsed, stretch = False, []
    for step, flag in collapsed_at:
        stretch = [] if flag == collapsed else [*stretch, step]
        if len(stretch) == (RECOVERY_PROBES if collapsed else CONFIRM_PROBES):
            collapsed = flag
            if collapsed:
                onsets.append(stretch[0])
            stretch = []
    return onsets, collapsed


def same_verdict(run: cw.Run, every: int) -> bool:
    """Whether a run's rows thinned to every ``every``-th step read as the dense rows do: the
    same state and the first collapse (or divergence) within one interval. A recording
    cannot see past its last row ``L``: its state is compared with the dense one as of
    ``L``, unless the dense run changed state within one interval of ``L`` (the thinned
    rows may see that change up to an interval earlier or later)."""
    thinned = thin(run.metrics, every)
    last = int(thinned["step"].max())
    dense = cw.analyze(run.metrics)
    at_last = cw.analyze(run.metrics[run.metrics["step"] <= last])
    sparse = cw.analyze(thinned)

    def onset(verdict: cw.Verdict) -> int | None:
        return verdict.onset_step if verdict.onset_step is not None else verdict.diverged_step

    near_end = any(abs(event.step - last) <= every for event in dense.events)
    if at_last.state != sparse.state and not near_end:
        return False
    first, later = onset(dense), onset(sparse)
    if first is None or later is None:
        return first is later or (later is None and first > last - every)
    return abs(later - first) <= every


def _scaled_from(step_at: int, lr_after: float | None = None):
    def switch(step: int, loss_fn: nn.Module) -> None:
        if step == step_at:
            loss_fn.scaled = True

    return switch


def _jump(before: float, after: float, at: int) -> Callable[[int], float]:
    return lambda step: before if step < at else after


def _warmup(peak: float, over: int) -> Callable[[int], float]:
    return lambda step: peak * min(1.0, (step + 1) / over)


REGIMES = [
    Regime("many-classes", "100 classes, unnormalised, margin 1, batch-hard, lr 0.5",
           "collapse", lambda: BatchHardTripletLoss(margin=1.0), 0.5, classes=100,
           features=100, normalize=False, classes_per_batch=32, per_class=4),
    Regime("many-classes-healthy", "100 classes, normalised, margin 0.2, scaled batch-hard, "
           "lr 0.05", "healthy", lambda: BatchHardTripletLoss(margin=0.2, scaled=True), 0.05,
           classes=100, features=100, classes_per_batch=32, per_class=4),
    Regime("batch-32", "P×K = 4×8, batch-hard, lr 0.5", "collapse",
           lambda: BatchHardTripletLoss(margin=0.2), 0.5, classes_per_batch=4, per_class=8),
    Regime("batch-32-many-classes", "P×K = 8×4 on 100 classes, unnormalised, margin 1, "
           "batch-hard, lr 0.2", "collapse", lambda: BatchHardTripletLoss(margin=1.0), 0.2,
           classes=100, features=100, normalize=False, classes_per_batch=8, per_class=4),
    Regime("batch-32-healthy", "P×K = 4×8, batch-hard scaled, lr 0.05", "healthy",
           lambda: BatchHardTripletLoss(margin=0.2, scaled=True), 0.05, classes_per_batch=4,
           per_class=8),
    Regime("batch-1024", "P×K = 32×32 on 100 classes, batch-hard, lr 0.5", "collapse",
           lambda: BatchHardTripletLoss(margin=0.2), 0.5, classes=100, features=100,
           classes_per_batch=32, per_class=32, steps=250),
    Regime("batch-1024-healthy", "P×K = 32×32 on 100 classes, scaled batch-hard, lr 0.05",
           "healthy", lambda: BatchHardTripletLoss(margin=0.2, scaled=True), 0.05, classes=100,
           features=100, classes_per_batch=32, per_class=32, steps=250),
    Regime("cosine-512", "512-d, cosine distance, batch-hard, lr 2", "collapse",
           lambda: BatchHardTripletLoss(margin=0.2, distance="cosine"), 2.0, dim=512,
           distance="cosine", normalize=False),
    Regime("cosine-512-healthy", "512-d, cosine distance, batch-all, lr 0.05", "healthy",
           lambda: BatchAllTripletLoss(margin=0.2, distance="cosine"), 0.05, dim=512,
           distance="cosine", normalize=False),
    Regime("margin-free-inside", "margin-free InfoNCE normalising inside, lr 5", "collapse",
           lambda: SupervisedInfoNCE(0.5, normalize=True), 5.0, normalize=False,
           distance="cosine"),
    Regime("margin-free-outside", "margin-free InfoNCE on normalised output, lr 0.05",
           "healthy", lambda: SupervisedInfoNCE(0.1, normalize=False), 0.05),
    Regime("late-collapse", "healthy 300 steps (lr 0.02), then lr 5", "collapse",
           lambda: BatchHardTripletLoss(margin=0.2), _jump(0.02, 5.0, 300), steps=600),
    Regime("recovers", "batch-hard lr 2, scaled from step 200", "recover",
           lambda: BatchHardTripletLoss(margin=0.2), 2.0, switch=_scaled_from(200), steps=500),
    Regime("trap-zero-loss", "batch-all, margin 0.05: loss exactly 0, all easy", "healthy",
           lambda: BatchAllTripletLoss(margin=0.05), 0.05, steps=300),
    Regime("warmup-tiny-init", "tiny init (×1e-3), unnormalised, batch-hard, lr warm-up to "
           "0.05", "healthy", lambda: BatchHardTripletLoss(margin=0.2), _warmup(0.05, 200),
           normalize=False, init_scale=1e-3),
    Regime("diverges", "tiny init (×1e-3), unnormalised, batch-all, lr warm-up to 0.05: "
           "nothing bounds the norms", "diverge", lambda: BatchAllTripletLoss(margin=0.2),
           _warmup(0.05, 200), normalize=False, init_scale=1e-3),
    Regime("trap-slow", "batch-hard, lr 0.002: slow, near the margin", "healthy",
           lambda: BatchHardTripletLoss(margin=0.2), 0.002, steps=400),
]  # fmt: skip


def table(outcomes: list[Outcome]) -> str:
    lines = [
        "| regime | what | seeds | truth at end | detector at end | false alarms | misses | "
        "onset − truth (steps) | held-out 5-NN (raw, chance) | same at every 4, 10 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_name: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        by_name.setdefault(outcome.regime.name, []).append(outcome)
    for name, group in by_name.items():
        regime = group[0].regime
        truth = ", ".join(o.truth for o in group)
        states = ", ".join(
            o.state + (" (had collapsed)" if o.ever_collapsed and o.state == "healthy" else "")
            for o in group
        )
        delays = ", ".join("–" if o.delay is None else f"{o.delay:+d}" for o in group)
        knn = ", ".join(f"{o.final_knn:.2f}" for o in group)
        lines.append(
            f"| {name} | {regime.what} | {len(group)} | {truth} | {states} | "
            f"{sum(o.false_alarm for o in group)} | {sum(o.miss for o in group)} | {delays} | "
            f"{knn} ({group[0].raw_knn:.2f}, {group[0].chance:.2f}) | "
            f"{', '.join('yes' if all(o.interval_agrees) else 'no' for o in group)} |"
        )
    total = len(outcomes)
    alarms = sum(o.false_alarm for o in outcomes)
    misses = sum(o.miss for o in outcomes)
    late = sum(not o.on_time for o in outcomes)
    lines.append("")
    lines.append(
        f"{total} runs. False alarms: {alarms}; misses: {misses}; onsets outside "
        f"[−20, max(50, 10 % of the run)] steps of the truth: {late}; runs whose rows "
        f"thinned to every {' and '.join(map(str, SPARSE_INTERVALS))} steps read "
        f"differently: {sum(not all(o.interval_agrees) for o in outcomes)}."
    )
    return "\n".join(lines)


def _logdir(keep: Path | None) -> contextlib.AbstractContextManager[str]:
    """The folder for the run files: ``keep`` (created) to inspect them, else a temporary one."""
    if keep is None:
        return tempfile.TemporaryDirectory()
    keep.mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(keep))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2, help="seeds per regime")
    parser.add_argument("--only", nargs="*", help="regime names (default: all)")
    parser.add_argument("--write-doc", action="store_true", help="update docs/detector.md")
    parser.add_argument(
        "--logdir", type=Path, help="keep the run files here (default: a temporary folder)"
    )
    parser.add_argument(
        "--probes",
        type=int,
        metavar="STEP",
        help="also print each run's held-out spread / peak (over all pairs; between classes) "
        "at every probe up to STEP",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    chosen = [r for r in REGIMES if not args.only or r.name in args.only]
    outcomes = []
    with _logdir(args.logdir) as logdir:
        for regime in chosen:
            for seed in range(args.seeds):
                outcome = run(regime, seed, Path(logdir))
                outcomes.append(outcome)
                print(
                    f"{regime.name} seed {seed}: truth {outcome.truth} (onset "
                    f"{outcome.truth_onset}), detector {outcome.state} (onset "
                    f"{outcome.onset}), 5-NN {outcome.final_knn:.2f}, {outcome.seconds:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                if args.probes is not None:
                    shown = [
                        f"{step}: {spread:.3f} ({between:.3f})"
                        for step, spread, between in outcome.probe_ratios
                        if step <= args.probes
                    ]
                    print("  held-out spread / peak:", ", ".join(shown), file=sys.stderr)
    text = table(outcomes)
    print(text)
    if args.write_doc:
        doc = DOC.read_text()
        head, rest = doc.split(START)
        _, tail = rest.split(END)
        device = (
            f"a {'CUDA GPU' if torch.cuda.is_available() else 'CPU'}, torch {torch.__version__}"
        )
        DOC.write_text(f"{head}{START}\n{text}\n\nMeasured on {device}, one thread.\n{END}{tail}")


if __name__ == "__main__":
    main()
