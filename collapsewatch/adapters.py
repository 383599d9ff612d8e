"""How ``watch()`` reads any loss: its margin, its distance, and what a call passed it.

Three call signatures are understood:

* ``loss(embeddings, labels, ...)`` (the bundled losses, pytorch-metric-learning, most
  in-batch mining losses): embeddings (N, D) float, labels (N,) integer;
* ``loss(anchor, positive, negative)`` (``torch.nn.TripletMarginLoss`` and friends): three
  (N, D) float tensors;
* keyword forms of both (``embeddings=``, ``labels=``; ``anchor=``, ``positive=``,
  ``negative=``).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch import Tensor

from collapsewatch.losses.base import TripletLoss
from collapsewatch.losses.batch_all_triplet_loss import BatchAllTripletLoss
from collapsewatch.losses.distances import Distance, check_distance


@dataclass(frozen=True)
class LossCall:
    """What one loss call was given. Exactly one of the two forms is set."""

    embeddings: Tensor | None = None
    labels: Tensor | None = None
    anchor: Tensor | None = None
    positive: Tensor | None = None
    negative: Tensor | None = None

    @property
    def is_labelled(self) -> bool:
        return self.embeddings is not None

    def triplet(self) -> tuple[Tensor, Tensor, Tensor]:
        """(anchor, positive, negative) of a call without labels: three (N, D)."""
        # parse_loss_call sets either the embeddings or all three.
        assert self.anchor is not None and self.positive is not None and self.negative is not None
        return self.anchor, self.positive, self.negative

    def all_embeddings(self) -> Tensor:
        """Every embedding the loss saw: (N, D), or the 3N rows of explicit triplets."""
        if self.embeddings is not None:
            return self.embeddings
        return torch.cat(self.triplet())


def _is_embedding(t: Any) -> TypeGuard[Tensor]:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 2


def _is_labels(t: Any, n: int) -> TypeGuard[Tensor]:
    return (
        isinstance(t, Tensor)
        and t.dim() == 1
        and t.shape[0] == n
        and not t.is_floating_point()
        and not t.is_complex()
    )


def parse_loss_call(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> LossCall | None:
    """Recognise a loss call's arguments; None if it matches no known signature."""
    if "embeddings" in kwargs or "labels" in kwargs:
        positional = list(args)
        embeddings = kwargs.get("embeddings", positional.pop(0) if positional else None)
        labels = kwargs.get("labels", positional.pop(0) if positional else None)
        args = (embeddings, labels)
    elif {"anchor", "positive", "negative"} & set(kwargs):
        names = ["anchor", "positive", "negative"]
        positional = list(args)
        args = tuple(kwargs[n] if n in kwargs else positional.pop(0) for n in names)
    if (
        len(args) >= 3
        and all(_is_embedding(t) for t in args[:3])
        and args[0].shape == args[1].shape == args[2].shape
    ):
        return LossCall(anchor=args[0], positive=args[1], negative=args[2])
    if len(args) >= 2 and _is_embedding(args[0]) and _is_labels(args[1], args[0].shape[0]):
        return LossCall(embeddings=args[0], labels=args[1])
    return None


SOFT_MARGIN_ATTRIBUTES = ("smooth_loss", "soft_margin")
MARGIN_ATTRIBUTES = ("margin", "triplet_margin")
CONTRASTIVE_MARGIN_ATTRIBUTE = "neg_margin"  # PML's contrastive losses: neg_margin − pos_margin
LOOKED_UP_MARGINS = (*MARGIN_ATTRIBUTES, CONTRASTIVE_MARGIN_ATTRIBUTE)
"""Where ``find_margin`` looks for a loss's margin, in order (``watch()``'s warning names them)."""

CallPlateau = Callable[[tuple[Any, ...], Mapping[str, Any]], "float | Tensor | None"]
"""The loss of identical embeddings for one call, from its arguments (a 0-dim tensor when it
is computed from the call's labels, so that no step waits for the device); None if the call
does not say."""


def _feature_batch_rows(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[int] | None:
    """The rows of each of a sentence-transformers call's k feature batches (anchors,
    positives, hard negatives), None unless k ≥ 2 batches of one size."""
    batches = kwargs.get("sentence_features", args[0] if args else ())
    found = [_rows(features) for features in batches] if isinstance(batches, list | tuple) else []
    rows = [n for n in found if n is not None]
    if len(rows) < 2 or len(rows) < len(found) or len(set(rows)) != 1:
        return None
    return rows


RANKING_CANDIDATES = {
    "query_to_doc": "each anchor against the batch's positives and hard negatives",
    "query_to_query": "against the other anchors",
    "doc_to_query": "each positive against the anchors",
    "doc_to_doc": "against the other anchors' documents",
}
"""What each of MultipleNegativesRankingLoss's ``directions`` scores, for the warning."""


@dataclass(frozen=True)
class RankingPlateau:
    """sentence-transformers' MultipleNegativesRankingLoss (v6: any ``directions``,
    ``partition_mode`` and ``hardness_mode``; its cached and symmetric variants) with
    identical embeddings, for a call of k feature batches of B rows (W·B with
    ``gather_across_devices`` over W ranks): every similarity is the same, so a direction's
    softmax runs over n equal logits, n = (k − 1)·B (query → doc), B − 1 (query → query),
    B (doc → query), (k − 1)(B − 1) (doc → doc), and costs ln n; a hardness penalty α on
    P of the query → doc logits makes that n + P(e^α − 1). The loss is ln Σ n over the
    directions ("joint") or the mean of their ln n ("per_direction")."""

    directions: tuple[str, ...] = ("query_to_doc",)
    per_direction: bool = False
    hardness: str | None = None  # hardness_mode, when its strength is > 0
    strength: float = 0.0
    gathered: bool = False

    @classmethod
    def of(cls, loss_fn: torch.nn.Module) -> RankingPlateau | None:
        """The loss's settings; before sentence-transformers 6 they were its class (the
        symmetric one: anchors → positives and back, averaged). None when the plateau
        depends on the embeddings: a hardness penalty on a similarity other than cosine."""
        symmetric = "Symmetric" in type(loss_fn).__name__
        default = ("query_to_doc", "doc_to_query") if symmetric else ("query_to_doc",)
        partition = getattr(loss_fn, "partition_mode", "per_direction" if symmetric else "joint")
        strength = float(getattr(loss_fn, "hardness_strength", 0.0) or 0.0)
        hardness = getattr(loss_fn, "hardness_mode", None) if strength > 0 else None
        similarity = getattr(getattr(loss_fn, "similarity_fct", None), "__name__", None)
        if hardness is not None and similarity not in _COSINE_SIMILARITIES:
            return None
        return cls(
            tuple(getattr(loss_fn, "directions", default)),
            partition == "per_direction",
            hardness,
            strength,
            bool(getattr(loss_fn, "gather_across_devices", False)),
        )

    @property
    def candidates(self) -> str:
        return ", ".join(RANKING_CANDIDATES.get(d, d) for d in self.directions)

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float | None:
        rows = _feature_batch_rows(args, kwargs)
        if rows is None:
            return None
        k = len(rows)
        gathered = self.gathered and dist.is_available() and dist.is_initialized()
        b = rows[0] * (dist.get_world_size() if gathered else 1)
        sizes: dict[str, float] = {  # a hardness penalty adds a real-valued count
            "query_to_doc": (k - 1) * b,
            "query_to_query": b - 1,
            "doc_to_query": b,
            "doc_to_doc": (k - 1) * (b - 1),
        }
        penalised = {
            "hard_negatives": k - 2,
            "in_batch_negatives": (k - 1) * (b - 1),
            "all_negatives": (k - 1) * b - 1,
        }.get(self.hardness or "", 0)
        sizes["query_to_doc"] += penalised * math.expm1(self.strength)
        chosen = [sizes[d] for d in self.directions if d in sizes]
        if not chosen or min(chosen) <= 0:
            return None
        if self.per_direction:
            return sum(math.log(n) for n in chosen) / len(chosen)
        return math.log(sum(chosen))


PML_CALL = ("embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels")
"""The arguments of a pytorch-metric-learning loss call, in order."""


def _pml_pair_counts(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], distinct: bool
) -> tuple[Tensor, Tensor] | None:
    """How many positive and negative pairs each row of a PML loss call anchors: two (N,)
    float tensors, counted as ``lmu.convert_to_pairs`` pairs the rows (every pair of
    different rows from the labels; a miner's (a, p, n) or (a1, p, a2, n) indices as they
    are, repeats included unless ``distinct``). None for a call against ``ref_emb``, without
    labels, or with at most one index of each kind (PML scores those 0)."""
    bound = {**dict(zip(PML_CALL, args, strict=False)), **kwargs}
    embeddings, labels = bound.get("embeddings"), bound.get("labels")
    if (
        bound.get("ref_emb") is not None
        or not _is_embedding(embeddings)
        or not _is_labels(labels, embeddings.shape[0])
    ):
        return None
    n, device = embeddings.shape[0], embeddings.device
    indices = bound.get("indices_tuple")
    if indices is None:
        same = (labels[:, None] == labels[None, :]).sum(1).to(device, torch.float32)
        return same - 1, n - same  # the row itself is neither
    if len(indices) == 3:
        indices = (indices[0], indices[1], indices[0], indices[2])
    if len(indices) != 4 or all(len(index) <= 1 for index in indices):
        return None
    a1, p, a2, negative = (index.to(device) for index in indices)
    if distinct:
        counts = []
        for anchors, others in ((a1, p), (a2, negative)):
            mask = torch.zeros(n, n, dtype=torch.bool, device=device)
            mask[anchors, others] = True
            counts.append(mask.sum(1, dtype=torch.float32))
        return counts[0], counts[1]
    ones = torch.ones(len(a1) + len(a2), device=device)
    positives = torch.zeros(n, device=device).index_add_(0, a1, ones[: len(a1)])
    return positives, torch.zeros(n, device=device).index_add_(0, a2, ones[len(a1) :])


def ntxent_plateau(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """PML's NTXentLoss with identical embeddings: every logit equal, so a positive pair
    (a, p) costs ln(1 + K_a), its own logit against the anchor's K_a negatives, and the loss
    (the mean over positive pairs) is Σ_a P_a ln(1 + K_a) / Σ_a P_a with P_a the positive
    pairs anchor a has. NaN when there is no positive or no negative pair (loss 0)."""
    counts = _pml_pair_counts(args, kwargs, distinct=False)
    if counts is None:
        return None
    positives, negatives = counts
    value = (positives * torch.log1p(negatives)).sum() / positives.sum()
    known = (positives.sum() > 0) & (negatives.sum() > 0)
    return torch.where(known, value, torch.full_like(value, math.nan))


def supcon_plateau(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """PML's SupConLoss with identical embeddings: an anchor with P_a ≥ 1 positives and K_a
    negatives (distinct pairs) costs ln(P_a + K_a), the log-probability of each positive
    among all of them; its reducer averages the anchors whose cost is not 0. NaN when there
    is no positive or no negative pair (loss 0)."""
    counts = _pml_pair_counts(args, kwargs, distinct=True)
    if counts is None:
        return None
    positives, negatives = counts
    candidates = positives + negatives
    scored = ((positives > 0) & (candidates > 1)).float()
    value = (scored * torch.log(candidates.clamp(min=1))).sum() / scored.sum()
    known = (scored.sum() > 0) & (negatives.sum() > 0)
    return torch.where(known, value, torch.full_like(value, math.nan))


@dataclass(frozen=True)
class SelfSupervisedPlateau:
    """PML's ``SelfSupervisedLoss(NTXentLoss() or SupConLoss())(embeddings, ref_emb)``
    (SimCLR, CLIP-style pairs): row i of each is the other's one positive. Symmetric (its
    default): both as 2N rows labelled 0…N−1 twice, so an anchor has 1 positive and 2N − 2
    negatives, ln(2N − 1); otherwise each embedding against the N reference rows, ln N."""

    symmetric: bool = True

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> float | None:
        bound = {**dict(zip(("embeddings", "ref_emb"), args, strict=False)), **kwargs}
        embeddings, reference = bound.get("embeddings"), bound.get("ref_emb")
        if not (
            _is_embedding(embeddings)
            and _is_embedding(reference)
            and embeddings.shape == reference.shape
        ):
            return None
        n = embeddings.shape[0]
        candidates = 2 * n - 1 if self.symmetric else n
        return math.log(candidates) if candidates > 1 else None  # one candidate: loss 0


def _self_supervised(loss_fn: torch.nn.Module) -> tuple[CallPlateau, str] | None:
    inner = pml_wrapped(loss_fn)
    if type(inner).__name__ not in ("NTXentLoss", "SupConLoss") or inner is loss_fn:
        return None
    if IN_BATCH_NEGATIVES_LOSSES[("pytorch_metric_learning", type(inner).__name__)](inner) is None:
        return None
    symmetric = bool(getattr(loss_fn, "symmetric", True))
    return SelfSupervisedPlateau(symmetric), (
        "each embedding against its reference twin and the other rows of both"
        if symmetric
        else "each embedding against the reference rows, its twin among them"
    )


def pml_wrapped(loss_fn: torch.nn.Module) -> torch.nn.Module:
    """The loss PML's ``SelfSupervisedLoss`` computes with (its ``loss``), else ``loss_fn``."""
    inner = getattr(loss_fn, "loss", None)
    if type(loss_fn).__name__ == "SelfSupervisedLoss" and isinstance(inner, torch.nn.Module):
        return inner
    return loss_fn


def _ranking(loss_fn: torch.nn.Module) -> tuple[CallPlateau, str] | None:
    plateau = RankingPlateau.of(loss_fn)
    return None if plateau is None else (plateau, plateau.candidates)


def _pml(plateau: CallPlateau, candidates: str) -> InBatchFamily:
    """A PML loss's plateau, as long as it reduces as its class does by default (its
    default reducer, no embedding regulariser): the plateau assumes so."""

    def read(loss_fn: torch.nn.Module) -> tuple[CallPlateau, str] | None:
        default = getattr(loss_fn, "get_default_reducer", None)
        reducer = type(getattr(loss_fn, "reducer", None))
        regularised = getattr(loss_fn, "embedding_regularizer", None) is not None
        if default is None or reducer is not type(default()) or regularised:
            return None
        return plateau, candidates

    return read


InBatchFamily = Callable[[torch.nn.Module], "tuple[CallPlateau, str] | None"]

IN_BATCH_NEGATIVES_LOSSES: dict[tuple[str, str], InBatchFamily] = {
    ("sentence_transformers", "MultipleNegativesRankingLoss"): _ranking,
    ("sentence_transformers", "CachedMultipleNegativesRankingLoss"): _ranking,
    ("sentence_transformers", "MultipleNegativesSymmetricRankingLoss"): _ranking,
    ("sentence_transformers", "CachedMultipleNegativesSymmetricRankingLoss"): _ranking,
    ("pytorch_metric_learning", "NTXentLoss"): _pml(
        ntxent_plateau, "each positive pair against its anchor's negatives, from each call's labels"
    ),
    ("pytorch_metric_learning", "SupConLoss"): _pml(
        supcon_plateau,
        "each anchor against every other row it is compared with, from each call's labels",
    ),
    ("pytorch_metric_learning", "SelfSupervisedLoss"): _self_supervised,
}
"""InfoNCE losses: cross-entropy of each anchor over its in-batch candidates, so identical
embeddings (equal logits) cost exactly ln(candidates), computed per call. Each entry reads
the loss's settings into its per-call plateau and what each anchor is scored against (None:
settings under which the plateau is not known; the loss is then watched margin-free)."""


ANGULAR_MARGIN_LOSSES = frozenset(
    {
        "ArcFaceLoss",
        "SubCenterArcFaceLoss",
        "CosFaceLoss",
        "SphereFaceLoss",
        "LargeMarginSoftmaxLoss",
    }
)
"""pytorch-metric-learning losses whose ``margin`` is not a distance margin."""

_NO_KEYWORDS: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class MarginSpec:
    """What watch() knows about a loss's margin and the loss value at collapse.

    ``margin`` is the m of the difficulty classes (semi-hard: d_ap ≤ d_an < d_ap + m) and
    of the contraction test; ``plateau`` is the loss value once every distance is 0, the
    level the detector's plateau rule looks for: m for hinge losses, ln(1 + eᵐ) for
    soft-margin ones (ln 2 without a margin), PML's ``neg_margin`` for contrastive losses.
    Either is None when the loss has none; ``source`` says where they came from. An
    in-batch-negatives loss has ``call_plateau`` instead: ln(candidates) follows each
    call's batch (its size, its labels), and ``candidates`` says what they are.
    """

    margin: float | None
    plateau: float | None
    source: str
    call_plateau: CallPlateau | None = None
    candidates: str = ""

    @property
    def in_batch(self) -> bool:
        """Whether the plateau is ln(in-batch candidates), found per call."""
        return self.call_plateau is not None

    def plateau_of_call(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any] = _NO_KEYWORDS
    ) -> float | Tensor | None:
        """The loss at zero distances for one call (``args``, ``kwargs``): the in-batch
        plateau of its batch, else the fixed ``plateau``."""
        if self.call_plateau is None:
            return self.plateau
        return self.call_plateau(args, kwargs)


def _rows(features: Any) -> int | None:
    """The batch size of one sentence-transformers feature dict (its first tensor's rows)."""
    if isinstance(features, Mapping):
        first = next((v for v in features.values() if isinstance(v, Tensor)), None)
        return None if first is None or first.dim() == 0 else int(first.shape[0])
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value.detach().cpu())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _check_margin(margin: float, source: str) -> float:
    if not (0 < margin < float("inf")):
        raise ValueError(f"{source} must be finite and > 0, got {margin!r}")
    return margin


def is_soft_margin(loss_fn: torch.nn.Module) -> bool:
    """Whether the loss replaces relu(t) by softplus(t) (PML ``smooth_loss``, ST soft-margin)."""
    flagged = any(getattr(loss_fn, name, False) is True for name in SOFT_MARGIN_ATTRIBUTES)
    return flagged or "SoftMargin" in type(loss_fn).__name__


def find_margin(loss_fn: torch.nn.Module, margin: float | None) -> MarginSpec:
    """The margin and collapse plateau to monitor ``loss_fn`` with.

    An explicit ``margin`` wins; else the loss's ``margin`` or ``triplet_margin``
    (sentence-transformers) attribute; else PML's contrastive ``neg_margin`` (with
    ``pos_margin``, the margin is their gap). A loss with none of them is margin-free
    (NTXent, InfoNCE, soft-margin without a margin): ``MarginSpec(None, …)``.
    """
    soft = is_soft_margin(loss_fn)
    name = type(loss_fn).__name__
    family = IN_BATCH_NEGATIVES_LOSSES.get((type(loss_fn).__module__.split(".")[0], name))
    in_batch = None if margin is not None or family is None else family(loss_fn)
    if in_batch is not None:
        plateau, candidates = in_batch
        source = f"{name} (ln of the in-batch candidates)"
        return MarginSpec(None, None, source, call_plateau=plateau, candidates=candidates)
    if margin is None and name in ANGULAR_MARGIN_LOSSES:
        # Their margin is an angle or a cosine offset on class logits, not a distance.
        return MarginSpec(None, None, "")
    if margin is not None:
        found, source = _number(margin), "margin="
        if found is None:
            raise ValueError(f"margin= must be a number, got {margin!r}")
    else:
        found, source = None, ""
        # A soft-margin loss uses only PML's ``margin``: sentence-transformers'
        # BatchHardSoftMarginTripletLoss inherits a ``triplet_margin`` it never uses.
        for attribute in ("margin",) if soft else MARGIN_ATTRIBUTES:
            found = _number(getattr(loss_fn, attribute, None))
            if found is not None:
                source = f"{name}.{attribute}"
                break
    if found is None and margin is None:
        negative = _number(getattr(loss_fn, CONTRASTIVE_MARGIN_ATTRIBUTE, None))
        positive = _number(getattr(loss_fn, "pos_margin", None)) or 0.0
        if negative is not None and negative > positive:
            # A collapsed contrastive loss pays relu(neg_margin − 0) on every negative pair.
            source = f"{name}.{CONTRASTIVE_MARGIN_ATTRIBUTE}"
            return MarginSpec(negative - positive, negative, source)
    if soft:
        # softplus(d_ap − d_an + m) at d = 0; a soft margin of 0 is still a margin.
        if found is not None and found < 0:
            raise ValueError(f"{source} must be ≥ 0 for a soft-margin loss, got {found!r}")
        m = found or 0.0
        return MarginSpec(m or None, math.log1p(math.exp(m)), source or f"{name} (soft margin)")
    if found is None:
        return MarginSpec(None, None, "")
    found = _check_margin(found, source)
    return MarginSpec(found, found, source)


@dataclass(frozen=True)
class DistanceSpec:
    """The distance a loss measures with, and whether it L2-normalises embeddings first."""

    distance: Distance
    normalize: bool = False


# sentence-transformers' BatchHardTripletLossDistanceFunction, by function name
# (``eucledian_distance`` is its old spelling, kept as an alias).
_DISTANCE_FUNCTIONS: dict[str, Distance] = {
    "euclidean_distance": "euclidean",
    "eucledian_distance": "euclidean",
    "euclidean_distance_squared": "squared_euclidean",
    "eucledian_distance_squared": "squared_euclidean",
    "cosine_distance": "cosine",
}


def _distance_of_function(loss_fn: torch.nn.Module, metric: Any) -> Distance:
    """The distance a ``distance_metric`` function computes; ``ValueError`` if unknown."""
    squared = False
    if isinstance(metric, functools.partial):
        # partial(euclidean_distance, squared=True), the way to ask for squared distances
        squared = bool(metric.keywords.get("squared", False))
        metric = metric.func
    distance = _DISTANCE_FUNCTIONS.get(getattr(metric, "__name__", ""))
    if distance is None:
        raise ValueError(
            f"cannot tell which distance {type(loss_fn).__name__}.distance_metric ({metric!r}) "
            "computes; pass it: watch(..., distance='euclidean'), 'squared_euclidean' or "
            "'cosine'"
        )
    return "squared_euclidean" if squared and distance == "euclidean" else distance


_COSINE_SIMILARITIES = frozenset({"cos_sim", "pairwise_cos_sim", "cosine_similarity"})
"""sentence-transformers' ``similarity_fct`` functions that compare by cosine."""


def find_distance(loss_fn: torch.nn.Module, distance: Distance | None) -> DistanceSpec:
    """The distance under which watch() computes a foreign loss's statistics.

    An explicit ``distance`` wins. Otherwise: the bundled losses say theirs;
    sentence-transformers losses keep a ``distance_metric`` function (an unknown one raises
    ``ValueError``) or a cosine ``similarity_fct`` (in-batch negatives: cosine);
    pytorch-metric-learning losses carry a ``distance`` object (``LpDistance`` with p=2,
    power 1 or 2, optionally normalising; ``CosineSimilarity``); ``TripletMarginLoss`` and
    anything else default to Euclidean.
    """
    if distance is not None:
        return DistanceSpec(check_distance(distance))
    if isinstance(loss_fn, TripletLoss):
        return DistanceSpec(loss_fn.distance)
    metric = getattr(loss_fn, "distance_metric", None)
    if callable(metric):
        return DistanceSpec(_distance_of_function(loss_fn, metric))
    similarity = getattr(loss_fn, "similarity_fct", None)
    if getattr(similarity, "__name__", None) in _COSINE_SIMILARITIES:
        # In-batch-negatives losses (MultipleNegativesRankingLoss and its variants) compare
        # the rows by cosine similarity: their spread is measured the same way.
        return DistanceSpec("cosine")
    pml_distance = getattr(pml_wrapped(loss_fn), "distance", None)
    kind = type(pml_distance).__name__
    if kind == "CosineSimilarity":
        return DistanceSpec("cosine")
    if kind == "LpDistance" and getattr(pml_distance, "p", 2) == 2:
        power = getattr(pml_distance, "power", 1)
        normalize = bool(getattr(pml_distance, "normalize_embeddings", False))
        return DistanceSpec("squared_euclidean" if power == 2 else "euclidean", normalize)
    p = getattr(loss_fn, "p", 2)
    if isinstance(loss_fn, torch.nn.TripletMarginLoss) and p != 2:
        raise ValueError(
            f"TripletMarginLoss(p={p}) is not a distance watch() computes; pass "
            "watch(..., distance='euclidean') to monitor it under the Euclidean distance"
        )
    return DistanceSpec("euclidean")


def find_labels(args: tuple[Any, ...], kwargs: Mapping[str, Any], n: int) -> Tensor | None:
    """The one (n,) integer tensor among a call's arguments, or None if none or several."""
    found = [t for t in (*args, *kwargs.values()) if _is_labels(t, n)]
    return found[0] if len(found) == 1 else None


EMBEDDING_KEYS = ("sentence_embedding", "embeddings", "embedding")


def default_embedding(output: Any) -> Tensor:
    """The (N, D) embeddings in a model's output: the tensor itself; a mapping's
    ``sentence_embedding`` / ``embeddings`` / ``embedding``; or the rows of a tuple of (N, D)
    tensors (a siamese/triplet network's branches), concatenated. Raises ``TypeError``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in EMBEDDING_KEYS:
            if isinstance(output.get(key), Tensor):
                return output[key]
        keys = ", ".join(repr(k) for k in list(output)[:8])
        raise TypeError(
            f"the model returned a {type(output).__name__} with keys {keys}, none of them "
            f"{' / '.join(EMBEDDING_KEYS)}; pick one with embedding=lambda out: out['KEY']"
        )
    if (
        isinstance(output, tuple | list)
        and output
        and all(_is_embedding(t) for t in output)
        and len({t.shape[1] for t in output}) == 1
    ):
        return output[0] if len(output) == 1 else torch.cat(list(output))
    raise TypeError(
        f"the model returned a {type(output).__name__}, not a tensor; pick the embeddings with "
        "embedding=lambda out: out[0] (or out['KEY'])"
    )


def default_loss_value(output: Any) -> Tensor | None:
    """The loss value in a loss's output: the tensor itself, the first tensor of a tuple or
    list (siamese-triplet returns ``(loss, n_triplets)``), or a mapping's ``"loss"``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get("loss")
        return value if isinstance(value, Tensor) else None
    if isinstance(output, tuple | list):
        return next((t for t in output if isinstance(t, Tensor) and t.is_floating_point()), None)
    return None


def loss_family(loss_fn: torch.nn.Module) -> str:
    """Which advice fits the loss: "bundled", "pml_triplet", "pml", "sentence_transformers",
    "siamese" (a loss with a ``triplet_selector``, as in the siamese-triplet repository) or
    "other"."""
    module = type(loss_fn).__module__.split(".")[0]
    if isinstance(loss_fn, TripletLoss):
        return "bundled"
    if module == "pytorch_metric_learning":
        return "pml_triplet" if "Triplet" in type(loss_fn).__name__ else "pml"
    if module == "sentence_transformers":
        return "sentence_transformers"
    if hasattr(loss_fn, "triplet_selector"):
        return "siamese"
    return "other"


def loss_traits(loss_fn: torch.nn.Module, distance: DistanceSpec) -> frozenset[str]:
    """What the loss already does that the collapse advice would otherwise suggest:
    "scaled" (the bundled scaled variant), "batch_all" (the bundled batch-all loss),
    "normalized" (the distance L2-normalises: cosine, or PML's normalising LpDistance)."""
    traits = set()
    if isinstance(loss_fn, TripletLoss) and getattr(loss_fn, "scaled", False):
        traits.add("scaled")
    if isinstance(loss_fn, BatchAllTripletLoss):
        traits.add("batch_all")
    if distance.distance == "cosine" or distance.normalize:
        traits.add("normalized")
    return frozenset(traits)
