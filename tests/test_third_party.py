"""watch() on the training code people already run: a siamese-triplet loop, pytorch-metric-
learning losses with and without a margin, losses that run the model themselves, loss
outputs it cannot read; run names, resuming and empty runs.

Each collapsing configuration must be flagged collapsed at the onset of the equivalent
bundled-loss run (±10 steps), each healthy one must stay healthy, and no column may be all
NaN without a warning that says why.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import collapsewatch as cw
from collapsewatch.cli import main as cli_main
from collapsewatch.columns import LABEL_COLUMNS, MARGIN_RELATIVE, PROBE_COLUMNS
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors
from collapsewatch.losses import functional
from tests import reference
from tests.siamese_triplet import (
    EmbeddingNet,
    HardestNegativeTripletSelector,
    OnlineTripletLoss,
    RandomNegativeTripletSelector,
)

pytestmark = pytest.mark.slow

IMAGES, LABELS = load_digits_tensors()
ONSET_TOLERANCE = 10
TRIPLET_COLUMNS = ("frac_hard", "hardest_positive_mean", "hardest_negative_mean")


def balanced_batches(seed: int, per_class: int, rows: int = len(LABELS)):
    """Batches of ``per_class`` samples of each of the 10 digits (siamese-triplet's
    BalancedBatchSampler), drawn from the first ``rows`` digits."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        index = []
        for digit in range(10):
            pool = (digit == LABELS[:rows]).nonzero().flatten()
            index.append(pool[torch.randperm(len(pool), generator=generator)[:per_class]])
        index = torch.cat(index)
        yield IMAGES[index], LABELS[index]


Step = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Trained:
    path: Path
    warnings: list[str]
    losses: list[float]
    net: torch.nn.Module

    @property
    def verdict(self) -> cw.Verdict:
        return cw.analyze(self.path)

    @property
    def metrics(self):
        return cw.load_run(self.path).metrics

    @property
    def metadata(self) -> dict:
        return cw.load_run(self.path).metadata


def train(
    tmp_path: Path,
    name: str,
    loss_fn: torch.nn.Module,
    step: Step,
    *,
    lr: float,
    steps: int,
    per_class: int,
    seed: int = 0,
    rows: int = len(LABELS),
    **watch_options,
) -> Trained:
    """Train a digits embedder for ``steps`` steps on the first ``rows`` digits under
    watch(); ``step`` returns the loss to minimise. Every warning watch() gives is kept."""
    torch.manual_seed(seed)
    net = DigitsEmbedder()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    batches = balanced_batches(seed, per_class, rows)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cw.watch(
            net,
            loss_fn,
            logdir=tmp_path,
            run=name,
            on_collapse="ignore",
            **{"every": 1, **watch_options},
        ) as watcher:
            for _ in range(steps):
                x, y = next(batches)
                loss = step(net, x, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    trained = Trained(watcher.path, messages, losses, net)
    assert_nan_columns_explained(trained)
    return trained


def assert_nan_columns_explained(trained: Trained) -> None:
    """No all-NaN column without the warning that explains it."""
    said = " ".join(trained.warnings)
    explanations = {
        "no margin": {
            "margin",
            "loss_margin_ratio",
            "loss_margin_ratio_step_change",
            *MARGIN_RELATIVE,
        },
        "cannot read a loss value": {"loss", "loss_margin_ratio", "loss_margin_ratio_step_change"},
        "embedding statistics only": {
            *TRIPLET_COLUMNS,
            *MARGIN_RELATIVE,
            *LABEL_COLUMNS,
            "num_valid_triplets",
        },
        "and no labels": set(LABEL_COLUMNS),
    }
    allowed = set().union(*(cols for key, cols in explanations.items() if key in said))
    if trained.metadata.get("probe_every") is None:
        allowed |= set(PROBE_COLUMNS)  # no probe given: nothing to explain
    metrics = trained.metrics
    all_nan = {c for c in metrics.columns if len(metrics) and metrics[c].isna().all()}
    assert all_nan <= allowed, (all_nan - allowed, trained.warnings)


def bundled_step(loss_fn):
    return lambda net, x, y: loss_fn(net(x), y)


def assert_healthy(run: Trained) -> None:
    """Judged healthy, and really training: the embeddings spread out instead of shrinking."""
    assert run.verdict.state == "healthy" and not run.verdict.collapsed, run.verdict.events
    distance = run.metrics["mean_pairwise_distance"]
    assert distance.iloc[-5:].mean() > distance.iloc[0]


def assert_same_onset(run: Trained, bundled: Trained) -> None:
    assert bundled.verdict.state == "collapsed"
    assert run.verdict.state == "collapsed", run.verdict.events
    assert abs(run.verdict.onset_step - bundled.verdict.onset_step) <= ONSET_TOLERANCE


# --------------------------------------------------------------------- siamese-triplet
def siamese_step(loss_fn):
    def step(net, x, y):
        # Three model calls per step (the batch embedded in parts), as loops that run out
        # of memory do; the loss returns (loss, n_triplets).
        embeddings = torch.cat([net(part) for part in x.chunk(3)])
        loss, _ = loss_fn(embeddings, y)
        return loss

    return step


def siamese_loss(margin=0.2):
    return OnlineTripletLoss(margin, HardestNegativeTripletSelector(margin))


def test_siamese_triplet_loop_collapse_is_flagged_at_the_bundled_onset(tmp_path):
    options = {"lr": 0.5, "steps": 90, "per_class": 10, "distance": "squared_euclidean"}
    loss_fn = siamese_loss()
    siamese = train(tmp_path, "siamese", loss_fn, siamese_step(loss_fn), **options)
    bundled_loss = cw.losses.BatchHardTripletLoss(distance="squared_euclidean")
    bundled = train(tmp_path, "bundled", bundled_loss, bundled_step(bundled_loss), **options)
    assert siamese.warnings == []  # the tuple's loss was read: nothing to complain about
    assert siamese.metrics["loss"].tolist() == pytest.approx(siamese.losses, rel=1e-6)
    assert_same_onset(siamese, bundled)
    assert siamese.verdict.collapsed_at_end
    run = cw.load_run(siamese.path)
    assert run.metadata["loss_family"] == "siamese"
    assert "SemihardNegativeTripletSelector" in siamese.verdict.events[-1].suggestion
    assert "scaled=True" not in siamese.verdict.events[-1].suggestion


def test_siamese_triplet_loop_with_the_advised_selector_is_healthy(tmp_path):
    np.random.seed(0)  # the repository's random selector draws from NumPy's global state
    options = {"lr": 0.5, "steps": 90, "per_class": 10, "distance": "squared_euclidean"}
    loss_fn = OnlineTripletLoss(0.2, RandomNegativeTripletSelector(0.2))
    healthy = train(tmp_path, "siamese-healthy", loss_fn, siamese_step(loss_fn), **options)
    assert_healthy(healthy)


def test_siamese_statistics_match_an_explicit_reference(tmp_path):
    """Squared-Euclidean statistics of the step's concatenated embeddings, step by step."""
    torch.manual_seed(0)
    net, loss_fn = DigitsEmbedder(), siamese_loss()
    batches = [next(balanced_batches(i, 4)) for i in range(3)]
    with cw.watch(net, loss_fn, logdir=tmp_path, distance="squared_euclidean", every=1) as w:
        for x, y in batches:
            siamese_step(loss_fn)(net, x, y).backward()
    for row, (x, y) in zip(w and cw.load_run(w.path).metrics.itertuples(), batches, strict=True):
        with torch.no_grad():
            z = net(x).double()
        want = reference.statistics(z, y, 0.2, "batch_all", False, "squared_euclidean")
        assert row.frac_hard == pytest.approx(want["frac_hard"], rel=1e-4)
        assert row.mean_pairwise_distance == pytest.approx(want["mean_pairwise_distance"], 1e-4)


# ---------------------------------------------------------------- pytorch-metric-learning
def pml_batch_hard():
    from pytorch_metric_learning import losses, miners

    loss_fn, miner = losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()
    return loss_fn, lambda net, x, y: loss_fn(z := net(x), y, miner(z, y))


def test_pml_triplet_margin_loss_with_batch_hard_miner(tmp_path):
    options = {"lr": 0.5, "steps": 80, "per_class": 10}
    loss_fn, step = pml_batch_hard()
    pml = train(tmp_path, "pml", loss_fn, step, **options)
    bundled_loss = cw.losses.BatchHardTripletLoss()
    bundled = train(tmp_path, "bundled", bundled_loss, bundled_step(bundled_loss), **options)
    assert pml.warnings == []
    assert_same_onset(pml, bundled)
    assert "TripletMarginMiner" in pml.verdict.events[-1].suggestion
    # The advice, taken: semi-hard mining at the same learning rate.
    from pytorch_metric_learning import losses, miners

    loss_fn = losses.TripletMarginLoss(margin=0.2)
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    healthy = train(
        tmp_path,
        "pml-healthy",
        loss_fn,
        lambda net, x, y: loss_fn(z := net(x), y, miner(z, y)),
        **options,
    )
    assert_healthy(healthy)


def test_pml_ntxent_is_watched_as_in_batch_negatives(tmp_path):
    from pytorch_metric_learning import losses, miners

    # NTXent resists collapse on its own; keeping only the hardest pairs breaks it.
    options = {"lr": 0.5, "steps": 60, "per_class": 10}
    ntxent, miner = losses.NTXentLoss(temperature=0.07), miners.BatchHardMiner()
    collapsing = train(
        tmp_path, "ntxent", ntxent, lambda net, x, y: ntxent(z := net(x), y, miner(z, y)), **options
    )
    bundled_loss = cw.losses.BatchHardTripletLoss()
    bundled = train(tmp_path, "bundled", bundled_loss, bundled_step(bundled_loss), **options)
    (warning,) = collapsing.warnings  # what is judged, and by what
    assert "NTXentLoss compares each anchor with the batch's other rows" in warning
    assert "loss_margin_ratio is the loss over ln(in-batch candidates)" in warning
    assert "measured by the cosine distance" in warning
    assert_same_onset(collapsing, bundled)
    metrics, run = collapsing.metrics, cw.load_run(collapsing.path)
    assert run.metadata["margin"] is None and run.metadata["distance"] == "cosine"
    # BatchHardMiner keeps one positive and one negative per anchor: identical embeddings
    # cost ln 2 at every step, the plateau the collapsed loss sits on.
    ratio = metrics["loss_margin_ratio"].to_numpy()
    assert ratio == pytest.approx((metrics["loss"] / math.log(2)).to_numpy(), rel=1e-6)
    assert ratio[-10:] == pytest.approx(1.0, abs=1e-3)
    # frac_hard needs no margin: known on every step the difficulty interval picks.
    known = metrics.loc[metrics["frac_hard"].notna(), "step"].tolist()
    interval = run.metadata["difficulty_every"]
    assert known[:8] == list(range(8)) and all(
        b - a >= interval for a, b in itertools.pairwise(known[8:])
    )
    for event in collapsing.verdict.events:  # never a margin that the loss does not have
        assert "margin" not in event.message
        assert "scaled=True" not in event.suggestion
    ntxent = losses.NTXentLoss(temperature=0.07)
    healthy = train(tmp_path, "ntxent-healthy", ntxent, bundled_step(ntxent), lr=0.05, steps=60,
                    per_class=4)  # fmt: skip
    assert_healthy(healthy)


def _identical_rows(rows: int) -> torch.Tensor:
    """``rows`` copies of one random embedding: every pair's similarity is the same."""
    return torch.randn(1, 8, generator=torch.Generator().manual_seed(rows)).repeat(rows, 1)


LABEL_SETS = [
    [0, 0, 1, 1, 2, 2],
    [0, 0, 0, 1, 2, 2, 2, 2, 3],  # classes of 3, 1, 4, 1 rows
    [5, 5, 5, 5, 1],
    (torch.arange(40) * 7 % 9).tolist(),
]


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("labels", LABEL_SETS)
@pytest.mark.parametrize(
    "miner", [None, "BatchHardMiner", "MultiSimilarityMiner", "TripletMarginMiner"]
)
def test_the_in_batch_plateau_is_the_real_loss_of_identical_embeddings(name, labels, miner):
    """ln(candidates) per call, from the labels (and a miner's pairs) against the PML loss
    itself evaluated on identical embeddings: NTXent averages ln(1 + the anchor's negatives)
    over positive pairs, SupCon ln(the anchor's positives + negatives) over anchors."""
    from pytorch_metric_learning import losses, miners

    loss_fn = getattr(losses, name)()
    spec = cw.adapters.find_margin(loss_fn, None)
    assert spec.in_batch and spec.margin is None and spec.plateau is None
    labels = torch.tensor(labels)
    mined = None
    if miner is not None:
        spread = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(1))
        mined = getattr(miners, miner)()(spread, labels)
    embeddings = _identical_rows(len(labels))
    want = loss_fn(embeddings, labels, mined).item()
    assert want > 0
    positional = spec.plateau_of_call((embeddings, labels, mined), {})
    call = {"embeddings": embeddings, "labels": labels, "indices_tuple": mined}
    keywords = spec.plateau_of_call((), call)
    assert float(positional) == pytest.approx(want, rel=1e-6)
    assert float(keywords) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_an_in_batch_call_without_a_plateau(name):
    from pytorch_metric_learning import losses, reducers

    loss_fn = getattr(losses, name)()
    spec = cw.adapters.find_margin(loss_fn, None)
    for labels in ([0, 1, 2, 3], [0, 0, 0]):  # no positive pair, or no negative: loss 0
        labels = torch.tensor(labels)
        embeddings = _identical_rows(len(labels))
        assert loss_fn(embeddings, labels).item() == 0.0
        assert math.isnan(spec.plateau_of_call((embeddings, labels), {}))
    # Against reference embeddings, or reduced otherwise: nothing is assumed.
    embeddings, labels = _identical_rows(6), torch.tensor([0, 0, 1, 1, 2, 2])
    against = {"ref_emb": embeddings, "ref_labels": labels}
    assert spec.plateau_of_call((embeddings, labels), against) is None
    custom = getattr(losses, name)(reducer=reducers.SumReducer())
    assert not cw.adapters.find_margin(custom, None).in_batch


@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
@pytest.mark.parametrize("expected", ["collapsed", "healthy"])
def test_pml_in_batch_negatives_verdict_against_held_out_truth(tmp_path, name, expected):
    """Collapsed: the batch-hard miner at lr 0.5; healthy: all pairs at lr 0.02. Trained on
    the first 1500 digits; the truth from the other 297 in eval mode: their mean cosine
    distance and 5-NN accuracy."""
    from pytorch_metric_learning import losses, miners
    from sklearn.neighbors import KNeighborsClassifier

    loss_fn, rows = getattr(losses, name)(), 1500
    if expected == "collapsed":
        miner = miners.BatchHardMiner()
        step = lambda net, x, y: loss_fn(z := net(x), y, miner(z, y))  # noqa: E731
        options = {"lr": 0.5, "steps": 60, "per_class": 10}
    else:
        step, options = bundled_step(loss_fn), {"lr": 0.02, "steps": 80, "per_class": 6}
    trained = train(tmp_path, name, loss_fn, step, rows=rows, **options)
    trained.net.eval()
    with torch.no_grad():
        fitted, held_out = trained.net(IMAGES[:rows]), trained.net(IMAGES[rows:])
    cosine = (1 - held_out @ held_out.T).mean().item()
    knn = KNeighborsClassifier(5).fit(fitted.numpy(), LABELS[:rows].numpy())
    accuracy = knn.score(held_out.numpy(), LABELS[rows:].numpy())
    verdict = trained.verdict
    assert verdict.state == expected, verdict.events
    if expected == "collapsed":
        assert cosine < 0.01  # the held-out digits are one point
        assert trained.metrics["loss_margin_ratio"].iloc[-1] == pytest.approx(1.0, abs=1e-3)
        assert "loss/plateau has been 1.000" in verdict.events[-1].message
    else:
        assert cosine > 0.5 and accuracy > 0.8 and verdict.events == ()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("name", ["NTXentLoss", "SupConLoss"])
def test_self_supervised_pairs_plateau_at_ln_of_their_candidates(name, symmetric):
    """SelfSupervisedLoss (SimCLR / CLIP-style pairs): ln(2N − 1) symmetric, ln N against the
    reference rows, equal to the loss itself on identical embeddings; measured by cosine."""
    from pytorch_metric_learning import losses

    loss_fn = losses.SelfSupervisedLoss(getattr(losses, name)(), symmetric=symmetric)
    spec = cw.adapters.find_margin(loss_fn, None)
    assert spec.in_batch and cw.adapters.find_distance(loss_fn, None).distance == "cosine"
    for rows in (2, 8):
        embeddings = _identical_rows(rows)
        want = loss_fn(embeddings, embeddings.clone()).item()
        assert want == pytest.approx(math.log(2 * rows - 1 if symmetric else rows), rel=1e-6)
        assert spec.plateau_of_call((embeddings, embeddings.clone()), {}) == pytest.approx(want)
    assert spec.plateau_of_call((_identical_rows(3), _identical_rows(4)), {}) is None


@pytest.mark.parametrize(("lr", "expected"), [(2.0, "collapsed"), (0.05, "healthy")])
def test_self_supervised_ntxent_verdict_against_held_out_truth(tmp_path, lr, expected):
    """SimCLR on digits: two noisy views of 64 of the first 1500 digits per step; the truth
    from the other 297 in eval mode (their mean cosine distance)."""
    from pytorch_metric_learning import losses

    torch.manual_seed(0)
    net, views = DigitsEmbedder(), torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = losses.SelfSupervisedLoss(losses.NTXentLoss(temperature=0.07))
    with (
        pytest.warns(RuntimeWarning) as caught,
        cw.watch(net, loss_fn, logdir=tmp_path, every=1, on_collapse="ignore") as watcher,
    ):
        for _ in range(60):
            x = IMAGES[torch.randint(0, 1500, (64,), generator=views)]
            first = net(x + 0.2 * torch.randn(x.shape, generator=views))
            second = net(x + 0.2 * torch.randn(x.shape, generator=views))
            loss = loss_fn(first, second)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    # Called as (embeddings, ref_emb), not with the model's inputs: said as such, once.
    said = [str(w.message) for w in caught if "(embeddings, labels)" in str(w.message)]
    assert len(said) == 1 and "SelfSupervisedLoss is not called as (embeddings," in said[0]
    assert not any("model's inputs" in str(w.message) for w in caught)
    metrics = cw.load_run(watcher.path).metrics
    assert (metrics["batch_size"] == 128).all()  # both views are measured
    assert metrics["loss_margin_ratio"].to_numpy() == pytest.approx(
        (metrics["loss"] / math.log(127)).to_numpy(), rel=1e-6
    )
    net.eval()
    with torch.no_grad():
        held_out = net(IMAGES[1500:])
    cosine = (1 - held_out @ held_out.T).mean().item()
    verdict = cw.analyze(watcher.path)
    assert verdict.state == expected, verdict.events
    if expected == "collapsed":
        assert cosine < 0.01 and metrics["loss_margin_ratio"].iloc[-1] == pytest.approx(1, abs=1e-3)
    else:
        assert cosine > 0.5 and verdict.events == ()


# ------------------------------------------------------------- losses that run the model
class EmbeddingTripletLoss(torch.nn.Module):
    """A loss called as ``loss(features, labels)`` that embeds the features itself, like
    sentence-transformers' triplet losses."""

    def __init__(self, model: torch.nn.Module, margin: float = 0.2) -> None:
        super().__init__()
        self.model, self.triplet_margin = model, margin

    def forward(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        embeddings = self.model(features["pixels"])
        return functional.batch_hard_triplet_loss(embeddings, labels, self.triplet_margin)


def test_embeddings_made_inside_the_loss_belong_to_its_step(tmp_path):
    torch.manual_seed(0)
    net = DigitsEmbedder()
    loss_fn = EmbeddingTripletLoss(net, margin=0.3)
    batches = [next(balanced_batches(i, 5)) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with cw.watch(net, loss_fn, logdir=tmp_path, every=1) as w:
            for x, y in batches:
                loss_fn({"pixels": x}, y).backward()  # no optimiser step: embeddings known
    run = cw.load_run(w.path)
    assert list(run.metrics["step"]) == [0, 1, 2, 3]
    assert run.metadata["margin"] == 0.3 and run.metadata["margin_source"].endswith(
        "triplet_margin"
    )
    for row, (x, y) in zip(run.metrics.itertuples(), batches, strict=True):
        with torch.no_grad():
            z = net(x).double()
        want = reference.statistics(z, y, 0.3, "batch_all", False, "euclidean")
        want_loss = reference.batch_hard(z, y, 0.3, False, "euclidean").item()
        assert row.loss == pytest.approx(want_loss, rel=1e-5)
        for name in ("frac_hard", "frac_semihard", "mean_pairwise_distance"):
            assert getattr(row, name) == pytest.approx(want[name], rel=1e-4, abs=1e-9), name


def test_a_loss_that_runs_the_model_collapses_at_the_bundled_onset(tmp_path):
    options = {"lr": 0.5, "steps": 60, "per_class": 10}
    holder = {}

    def inside_step(net, x, y):
        loss_fn = holder.setdefault("loss", EmbeddingTripletLoss(net))
        return loss_fn({"pixels": x}, y)

    # The loss wraps the model, so it is built once the model exists; watch() needs it first.
    torch.manual_seed(0)
    bundled_loss = cw.losses.BatchHardTripletLoss()
    bundled = train(tmp_path, "bundled", bundled_loss, bundled_step(bundled_loss), **options)

    class Late(torch.nn.Module):  # forwards to the loss made in the first step
        triplet_margin = 0.2

        def forward(self, features, labels):
            return holder["loss"](features, labels)

    late = Late()

    def step(net, x, y):
        holder.setdefault("loss", EmbeddingTripletLoss(net))
        return late({"pixels": x}, y)

    inside = train(tmp_path, "inside", late, step, **options)
    assert inside.warnings == []
    assert inside.verdict.onset_step == bundled.verdict.onset_step  # the very same loss
    assert inside.metrics["loss"].tolist() == pytest.approx(bundled.metrics["loss"].tolist())


# ---------------------------------------------------------------- what cannot be read
def test_a_loop_where_nothing_can_be_recorded_says_so_once(tmp_path):
    class Opaque(torch.nn.Module):
        margin = 0.2

        def forward(self, token_ids):
            return token_ids.float().mean().requires_grad_()

    net, loss_fn = DigitsEmbedder(), Opaque()
    with (
        pytest.warns(RuntimeWarning, match="not recorded") as caught,
        cw.watch(net, loss_fn, logdir=tmp_path, run="opaque", every=1) as w,
    ):
        for _ in range(5):
            loss_fn(torch.arange(4))
    assert len([c for c in caught if "not recorded" in str(c.message)]) == 1
    assert cw.analyze(w.path).state == "empty"


@dataclasses.dataclass
class LossOutput:
    value: torch.Tensor


class WrappedOutputLoss(torch.nn.Module):
    margin = 0.2

    def forward(self, embeddings, labels):
        return LossOutput(functional.batch_hard_triplet_loss(embeddings, labels, self.margin))


def test_an_unreadable_loss_value_warns_and_collapse_is_still_judged(tmp_path):
    loss_fn = WrappedOutputLoss()
    options = {"lr": 0.5, "steps": 60, "per_class": 10}

    def step(net, x, y):
        return loss_fn(net(x), y).value

    blind = train(tmp_path, "blind", loss_fn, step, **options)
    assert len(blind.warnings) == 1
    assert "WrappedOutputLoss" in blind.warnings[0] and "loss_value=" in blind.warnings[0]
    assert blind.metrics["loss"].isna().all()
    assert blind.verdict.state == "collapsed"  # from the contraction of the embeddings
    assert "not checked" in blind.verdict.events[-1].message
    picked = train(tmp_path, "picked", loss_fn, step, loss_value=lambda out: out.value, **options)
    as_number = train(tmp_path, "number", loss_fn, step, loss_value=lambda out: out.value.item(),
                      lr=0.05, steps=3, per_class=4)  # fmt: skip
    assert as_number.warnings == []
    assert as_number.metrics["loss"].tolist() == pytest.approx(as_number.losses, rel=1e-6)
    assert picked.warnings == []
    assert picked.metrics["loss"].tolist() == pytest.approx(picked.losses, rel=1e-6)
    assert picked.verdict.state == "collapsed"
    assert abs(picked.verdict.onset_step - blind.verdict.onset_step) <= ONSET_TOLERANCE


# ------------------------------------------------------------------------ run names
def test_resume_continues_the_run_and_the_detector(tmp_path):
    loss_fn = cw.losses.BatchHardTripletLoss()
    first = train(tmp_path, "long", loss_fn, bundled_step(loss_fn), lr=0.5, steps=50,
                  per_class=10)  # fmt: skip
    assert first.verdict.state == "collapsed"
    with pytest.raises(FileExistsError, match="resume=True"):
        cw.watch(DigitsEmbedder(), loss_fn, logdir=tmp_path, run="long")
    second = train(tmp_path, "long", loss_fn, bundled_step(loss_fn), lr=0.5, steps=10,
                   per_class=10, resume=True)  # fmt: skip
    run = cw.load_run(second.path)
    assert list(run.metrics["step"]) == list(range(60))
    kinds = run.events["kind"].tolist()
    assert kinds.count("collapsed") == 1  # the resumed detector knew it was collapsed
    assert run.metadata["state"] == "collapsed" == cw.analyze(run).state


def test_a_run_that_failed_before_its_first_step_is_empty_and_frees_its_name(tmp_path, capsys):
    loss_fn = cw.losses.BatchHardTripletLoss()
    with pytest.raises(RuntimeError), cw.watch(DigitsEmbedder(), loss_fn, logdir=tmp_path,
                                                  run="again"):  # fmt: skip
        raise RuntimeError("data loader broke")
    assert cw.analyze(tmp_path / "again.cwrun").state == "empty"
    assert cli_main(["runs", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["state"], r["recorded_steps"]) for r in listed] == [("again", "empty", 0)]
    trained = train(tmp_path, "again", loss_fn, bundled_step(loss_fn), lr=0.05, steps=3,
                    per_class=4)  # fmt: skip
    assert list(trained.metrics["step"]) == [0, 1, 2]


@pytest.mark.parametrize(
    "wrap",
    [torch.nn.DataParallel, lambda m: torch.compile(m), lambda m: torch.compile(
        torch.nn.DataParallel(m))],
    ids=["dataparallel", "compile", "compile-dataparallel"],
)  # fmt: skip
def test_model_class_is_the_wrapped_models(tmp_path, wrap):
    with cw.watch(wrap(DigitsEmbedder()), cw.losses.BatchHardTripletLoss(), logdir=tmp_path) as w:
        pass
    assert cw.load_run(w.path).metadata["model_class"] == "DigitsEmbedder"


def test_soft_margin_plateau_is_ln2():
    class SoftMarginBatchHard(torch.nn.Module):  # sentence-transformers' definition
        def forward(self, embeddings, labels):
            d = torch.cdist(embeddings, embeddings)
            positive = (labels[:, None] == labels[None]).float()
            hardest_positive = (d * positive).max(1).values
            hardest_negative = (d + d.max() * positive).min(1).values
            return torch.log1p(torch.exp(hardest_positive - hardest_negative)).mean()

    spec = cw.adapters.find_margin(SoftMarginBatchHard(), None)
    collapsed = SoftMarginBatchHard()(torch.zeros(8, 4), torch.arange(8) % 2)
    assert spec.margin is None and spec.plateau == pytest.approx(collapsed.item())
    assert spec.plateau == pytest.approx(math.log(2))


def triplet_net_step(loss_fn):
    def step(net, x, y):
        # TripletNet-style: three model calls, (anchor, positive, negative) to the loss; the
        # positive is the next sample of the anchor's class, the negative the next class's.
        per_class = len(y) // 10
        anchor = torch.arange(len(y))
        positive = (anchor // per_class) * per_class + (anchor + 1) % per_class
        negative = (anchor + per_class) % len(y)
        return loss_fn(net(x[anchor]), net(x[positive]), net(x[negative]))

    return step


def test_triplet_net_loop_says_which_columns_need_labels(tmp_path):
    loss_fn = torch.nn.TripletMarginLoss(margin=0.2)
    run = train(tmp_path, "tripletnet", loss_fn, triplet_net_step(loss_fn), lr=0.05, steps=12,
                per_class=4)  # fmt: skip
    assert (
        len(run.warnings) == 1 and "(anchor, positive, negative) and no labels" in run.warnings[0]
    )
    metrics = run.metrics
    assert metrics[list(LABEL_COLUMNS)].isna().all().all()  # said, and explained
    assert metrics["batch_size"].eq(3 * 40).all() and metrics["frac_hard"].notna().all()
    assert metrics["loss"].tolist() == pytest.approx(run.losses, rel=1e-6)


def test_soft_margin_and_angular_margin_losses_say_what_they_lack(tmp_path):
    from pytorch_metric_learning import losses

    class BatchHardSoftMarginTripletLoss(torch.nn.Module):
        triplet_margin = 5.0  # inherited in sentence-transformers, and unused

    with pytest.warns(RuntimeWarning, match=r"no margin.*soft-margin level 0\.6931") as caught:
        cw.watch(DigitsEmbedder(), BatchHardSoftMarginTripletLoss(), logdir=tmp_path).close()
    assert "loss_margin_ratio" not in str(caught[0].message).split("are NaN")[0]
    arcface = losses.ArcFaceLoss(num_classes=10, embedding_size=32)  # margin: an angle
    spec = cw.adapters.find_margin(arcface, None)
    assert spec.margin is None and spec.plateau is None


def train_embedding_net(tmp_path: Path, name: str, selector) -> tuple[cw.Verdict, float, float]:
    """siamese-triplet's defaults (margin 1, EmbeddingNet, SGD) on digits for 120 steps; the
    verdict and the truth: held-out 5-NN accuracy and mean squared distance in eval mode."""
    from sklearn.neighbors import KNeighborsClassifier

    torch.manual_seed(0)
    np.random.seed(0)
    images, labels = load_digits_tensors()
    train_x, train_y, test_x, test_y = images[:1400], labels[:1400], images[1400:], labels[1400:]
    net = EmbeddingNet()
    loss_fn = OnlineTripletLoss(1.0, selector(1.0))
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    order = torch.Generator().manual_seed(0)
    with cw.watch(
        net,
        loss_fn,
        logdir=tmp_path,
        run=name,
        every=1,
        on_collapse="ignore",
        distance="squared_euclidean",
    ) as watcher:
        for _ in range(120):
            rows = torch.randperm(1400, generator=order)[:128]
            loss, _ = loss_fn(net(train_x[rows]), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        fitted, held_out = net(train_x).numpy(), net(test_x)
    knn = KNeighborsClassifier(5).fit(fitted, train_y.numpy()).score(held_out.numpy(), test_y)
    spread = torch.cdist(held_out, held_out).pow(2).mean().item()
    return cw.analyze(watcher.path), knn, spread


def test_siamese_triplets_default_net_that_never_separates_is_collapsed(tmp_path):
    verdict, knn, spread = train_embedding_net(tmp_path, "stuck", HardestNegativeTripletSelector)
    assert knn < 0.4 and spread < 0.01  # the truth: it never separated
    assert verdict.state == "collapsed"
    collapse = next(e for e in verdict.events if e.kind == "collapsed")
    assert "never separated" in collapse.message
    # Counted once the run has sat unseparated for a window, then confirmed a window later.
    window = cw.DetectorConfig().window
    assert verdict.onset_step <= 1 + 2 * window + 5


def test_siamese_triplets_default_net_with_random_negatives_is_healthy(tmp_path):
    verdict, knn, spread = train_embedding_net(tmp_path, "fine", RandomNegativeTripletSelector)
    assert knn > 0.6 and spread > 1  # the truth: it separated
    assert verdict.state == "healthy" and verdict.events == ()
