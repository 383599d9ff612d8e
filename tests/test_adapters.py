"""adapters.py: how watch() reads any loss's call, margin, distance, output and family."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses

from collapsewatch import adapters
from collapsewatch.losses import BatchAllTripletLoss, BatchHardTripletLoss

Z = torch.randn(6, 4)
Y = torch.tensor([0, 0, 1, 1, 2, 2])


class _Loss(torch.nn.Module):
    """A stand-in loss carrying whatever attributes a test gives it."""

    def __init__(self, **attributes: object) -> None:
        super().__init__()
        for name, value in attributes.items():
            setattr(self, name, value)


def _named(name: str, module: str = "somewhere", **attributes: object) -> torch.nn.Module:
    """An instance of a loss class called ``name`` defined in module ``module``."""
    cls = type(name, (_Loss,), {"__module__": module})
    return cls(**attributes)


# ------------------------------------------------------------------------------ calls
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((Z, Y), {}), ((Z,), {"labels": Y}), ((), {"embeddings": Z, "labels": Y}), ((Z, Y, 1.0), {})],
)
def test_labelled_calls(args, kwargs):
    call = adapters.parse_loss_call(args, kwargs)
    assert call is not None and call.is_labelled
    assert call.embeddings is Z and call.labels is Y
    assert call.all_embeddings() is Z


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((Z, Z + 1, Z + 2), {}), ((Z,), {"positive": Z + 1, "negative": Z + 2})],
)
def test_explicit_triplet_calls(args, kwargs):
    call = adapters.parse_loss_call(args, kwargs)
    assert call is not None and not call.is_labelled
    assert torch.equal(call.all_embeddings(), torch.cat([Z, Z + 1, Z + 2]))


@pytest.mark.parametrize(
    "args",
    [
        (Z, Y.float()),  # float labels
        (Z, Y[:5]),  # labels for other rows
        (Z[0], Y),  # not (N, D)
        (Z, Z[:5], Z),  # triplet parts of different shapes
        ({"x": Z}, Y),  # features dict (a loss that runs the model itself)
    ],
)
def test_unrecognised_calls_are_none(args):
    assert adapters.parse_loss_call(args, {}) is None


def test_labels_are_found_only_when_unambiguous():
    assert adapters.find_labels(({"x": Z}, Y), {}, 6) is Y
    assert adapters.find_labels(({"x": Z},), {"labels": Y}, 6) is Y
    assert adapters.find_labels((Y, Y.clone()), {}, 6) is None  # two candidates
    assert adapters.find_labels((Y,), {}, 5) is None


# ------------------------------------------------------------------------------ margin
def test_margin_lookup_order_and_sources():
    assert adapters.find_margin(BatchHardTripletLoss(0.3), None) == adapters.MarginSpec(
        0.3, 0.3, "BatchHardTripletLoss.margin"
    )
    st = _named("BatchHardTripletLoss", "sentence_transformers.losses", triplet_margin=5)
    assert adapters.find_margin(st, None).margin == 5.0
    explicit = adapters.find_margin(BatchHardTripletLoss(0.3), 0.7)
    assert (explicit.margin, explicit.source) == (0.7, "margin=")
    tensor_margin = adapters.find_margin(_named("X", margin=torch.tensor(0.25)), None)
    assert tensor_margin.margin == 0.25


def test_contrastive_margin_is_the_gap_and_its_plateau_the_negative_margin():
    spec = adapters.find_margin(pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.9), None)
    assert spec.margin == pytest.approx(0.8)
    assert spec.plateau == pytest.approx(0.9)
    assert spec.source.endswith(".neg_margin")


def test_soft_margin_plateau_is_softplus_of_the_margin():
    soft = adapters.find_margin(pml_losses.TripletMarginLoss(margin=0.2, smooth_loss=True), None)
    assert soft.margin == pytest.approx(0.2)
    assert soft.plateau == pytest.approx(math.log1p(math.exp(0.2)))
    # sentence-transformers' soft-margin loss inherits a triplet_margin it never uses.
    st = _named("BatchHardSoftMarginTripletLoss", "sentence_transformers.losses", triplet_margin=5)
    spec = adapters.find_margin(st, None)
    assert spec.margin is None and spec.plateau == pytest.approx(math.log(2))


def test_margin_free_losses():
    assert adapters.find_margin(pml_losses.NTXentLoss(), None).margin is None
    arcface = pml_losses.ArcFaceLoss(num_classes=3, embedding_size=4, margin=28.6)
    assert adapters.find_margin(arcface, None) == adapters.MarginSpec(None, None, "")


@pytest.mark.parametrize("margin", [0, -1, math.inf, math.nan])
def test_a_margin_that_is_no_margin_is_refused(margin):
    with pytest.raises(ValueError, match="finite and > 0"):
        adapters.find_margin(_named("X", margin=margin), None)
    with pytest.raises(ValueError, match="margin= must be"):
        adapters.find_margin(_named("X"), "wide")


# ---------------------------------------------------------------------------- distance
def test_distance_of_the_bundled_losses_and_explicit_choice():
    assert adapters.find_distance(BatchAllTripletLoss(distance="cosine"), None).distance == "cosine"
    chosen = adapters.find_distance(BatchAllTripletLoss(), "squared_euclidean")
    assert chosen.distance == "squared_euclidean"
    with pytest.raises(ValueError, match="distance must be one of"):
        adapters.find_distance(BatchAllTripletLoss(), "manhattan")


def euclidean_distance(x, squared=False):  # named like sentence-transformers' function
    return torch.cdist(x, x) ** (2 if squared else 1)


def cosine_distance(x):
    return 1 - torch.nn.functional.normalize(x) @ torch.nn.functional.normalize(x).T


@pytest.mark.parametrize(
    ("metric", "want"),
    [
        (euclidean_distance, "euclidean"),
        (functools.partial(euclidean_distance, squared=True), "squared_euclidean"),
        (cosine_distance, "cosine"),
    ],
)
def test_sentence_transformers_distance_metric_functions(metric, want):
    loss = _named("BatchHardTripletLoss", "sentence_transformers.losses", distance_metric=metric)
    assert adapters.find_distance(loss, None).distance == want


def test_an_unknown_distance_function_asks_for_distance():
    loss = _named("BatchHardTripletLoss", distance_metric=lambda x: x)
    with pytest.raises(ValueError, match="pass it: watch"):
        adapters.find_distance(loss, None)


def test_pytorch_metric_learning_distances():
    def spec(distance):
        return adapters.find_distance(pml_losses.TripletMarginLoss(distance=distance), None)

    assert spec(pml_distances.LpDistance()) == adapters.DistanceSpec("euclidean", True)
    unnormalised = pml_distances.LpDistance(normalize_embeddings=False, power=2)
    assert spec(unnormalised) == adapters.DistanceSpec("squared_euclidean", False)
    assert spec(pml_distances.CosineSimilarity()).distance == "cosine"


def test_torch_triplet_margin_loss_other_than_p2_is_refused():
    assert adapters.find_distance(torch.nn.TripletMarginLoss(), None).distance == "euclidean"
    with pytest.raises(ValueError, match="p=1"):
        adapters.find_distance(torch.nn.TripletMarginLoss(p=1), None)


# ------------------------------------------------------------------------------ outputs
def test_default_embedding_reads_tensors_dicts_and_branches():
    assert adapters.default_embedding(Z) is Z
    assert adapters.default_embedding({"token": Y, "sentence_embedding": Z}) is Z
    branches = adapters.default_embedding((Z, Z + 1, Z + 2))
    assert torch.equal(branches, torch.cat([Z, Z + 1, Z + 2]))
    with pytest.raises(TypeError, match="'logits', 'hidden'"):
        adapters.default_embedding({"logits": Z, "hidden": Z})
    with pytest.raises(TypeError, match="embedding=lambda out"):
        adapters.default_embedding((Z, torch.randn(6, 5)))  # branches of different widths


def test_default_loss_value():
    loss = torch.tensor(0.5)
    assert adapters.default_loss_value(loss) is loss
    assert adapters.default_loss_value((loss, 12)) is loss  # siamese-triplet
    assert adapters.default_loss_value((Y, loss)) is loss  # the first float tensor
    assert adapters.default_loss_value({"loss": loss, "acc": 1.0}) is loss
    assert adapters.default_loss_value({"total": loss}) is None
    assert adapters.default_loss_value(0.5) is None


# ------------------------------------------------------------------------------ family
@pytest.mark.parametrize(
    ("loss", "family"),
    [
        (BatchHardTripletLoss(), "bundled"),
        (pml_losses.TripletMarginLoss(), "pml_triplet"),
        (pml_losses.NTXentLoss(), "pml"),
        (
            _named("MultipleNegativesRankingLoss", "sentence_transformers.losses"),
            "sentence_transformers",
        ),
        (_named("OnlineTripletLoss", triplet_selector=object()), "siamese"),
        (torch.nn.TripletMarginLoss(), "other"),
    ],
)
def test_loss_family(loss, family):
    assert adapters.loss_family(loss) == family


def test_in_batch_negatives_losses_are_measured_by_cosine():
    def cos_sim(a, b):  # named like sentence_transformers.util.cos_sim
        return torch.nn.functional.normalize(a) @ torch.nn.functional.normalize(b).T

    def dot_score(a, b):
        return a @ b.T

    mnrl = _named("MultipleNegativesRankingLoss", "sentence_transformers.losses")
    mnrl.similarity_fct = cos_sim
    assert adapters.find_distance(mnrl, None).distance == "cosine"
    mnrl.similarity_fct = dot_score
    assert adapters.find_distance(mnrl, None).distance == "euclidean"
