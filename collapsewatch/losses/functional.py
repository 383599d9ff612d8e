"""Batch-hard and batch-all triplet losses, exact, with their difficulty statistics.

Definitions (labels y, distances d, margin m):

* valid triplet (a, p, n): a ≠ p, y_a = y_p, y_n ≠ y_a. A *valid anchor* has at least one
  positive and one negative. Anchors that are not valid contribute nothing.
* batch-hard: mean over valid anchors a of relu(max_p d(a,p) − min_n d(a,n) + m).
* batch-all: mean of (d(a,p) − d(a,n) + m) over the valid triplets where it is > 0; 0 if none.
* scaled variant (Quaterion): (d(a,p) − d(a,n)) is divided by S, the mean over valid anchors
  of min_n d(a,n), before the margin is added. S is not detached; it is floored at
  ``SCALE_FLOOR`` so identical embeddings give a finite loss (the margin) and gradient.
* difficulty of a valid triplet, from raw distances and the unscaled margin:
  easy d_an ≥ d_ap + m, semi-hard d_ap ≤ d_an < d_ap + m, hard d_an < d_ap.

Batch-all never builds anything larger than N×N: each anchor's negative distances are sorted
once; for a threshold t, the number of negatives below t is a ``searchsorted`` and their sum
a lookup in the prefix sum of the sorted row. That gives the exact loss, its exact gradient
(through the sort, prefix sum and gather) and every count in O(N² log N) time, O(N²) memory.

Every function here is free of host synchronisation unless ``check_finite=True`` (the
default), which reads one flag back to report non-finite rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from collapsewatch.losses.distances import Distance, check_distance, pairwise_distances

SCALE_FLOOR = 1e-12
"""Lower bound of the scaled variant's divisor S (its square is still a normal float32)."""

STATISTIC_FIELDS: tuple[str, ...] = (
    "num_valid_triplets",
    "num_valid_anchors",
    "num_easy",
    "num_semihard",
    "num_hard",
    "num_loss_terms",
    "num_positive_loss",
    "sum_hardest_positive",
    "sum_hardest_negative",
    "num_pairs",
    "sum_pairwise_distance",
)
"""Sufficient statistics, in the order of ``TripletStatistics.values``. All are sums, so the
statistics of several batches (or ranks) are the element-wise sum of their vectors."""

STATISTIC_RATIOS: dict[str, tuple[str, str]] = {
    "frac_easy": ("num_easy", "num_valid_triplets"),
    "frac_semihard": ("num_semihard", "num_valid_triplets"),
    "frac_hard": ("num_hard", "num_valid_triplets"),
    "frac_positive_loss": ("num_positive_loss", "num_loss_terms"),
    "hardest_positive_mean": ("sum_hardest_positive", "num_valid_anchors"),
    "hardest_negative_mean": ("sum_hardest_negative", "num_valid_anchors"),
    "mean_pairwise_distance": ("sum_pairwise_distance", "num_pairs"),
}
"""Monitored statistics as numerator / denominator of sufficient statistics. A ratio whose
denominator is 0 (no valid triplet, anchor or pair in the batch) is defined as 0."""

_NUMERATORS = [STATISTIC_FIELDS.index(num) for num, _ in STATISTIC_RATIOS.values()]
_DENOMINATORS = [STATISTIC_FIELDS.index(den) for _, den in STATISTIC_RATIOS.values()]


def _field(name: str) -> property:
    index = STATISTIC_FIELDS.index(name)
    return property(lambda self: self.values[index], doc=f"{name} (0-d float64 tensor).")


def _ratio(name: str) -> property:
    numerator, denominator = STATISTIC_RATIOS[name]
    num, den = STATISTIC_FIELDS.index(numerator), STATISTIC_FIELDS.index(denominator)
    return property(
        lambda self: self.values[num] / self.values[den].clamp_min(1.0),
        doc=f"{name} = {numerator} / {denominator}, 0 when {denominator} is 0.",
    )


@dataclass(frozen=True)
class TripletStatistics:
    """Difficulty statistics of one loss call, as device tensors (nothing is read back).

    ``values`` is a (len(STATISTIC_FIELDS),) float64 tensor of sums and counts, exact up to
    2⁵³ triplets; the named fields are views into it and the ratios cost one division each.
    ``num_loss_terms`` counts what the loss averages: all valid triplets for batch-all, valid
    anchors for batch-hard; ``num_positive_loss`` how many of those have a positive loss
    term. ``num_pairs`` is N(N − 1), the ordered pairs i ≠ j.
    """

    values: Tensor

    num_valid_triplets = _field("num_valid_triplets")
    num_valid_anchors = _field("num_valid_anchors")
    num_easy = _field("num_easy")
    num_semihard = _field("num_semihard")
    num_hard = _field("num_hard")
    num_loss_terms = _field("num_loss_terms")
    num_positive_loss = _field("num_positive_loss")
    sum_hardest_positive = _field("sum_hardest_positive")
    sum_hardest_negative = _field("sum_hardest_negative")
    num_pairs = _field("num_pairs")
    sum_pairwise_distance = _field("sum_pairwise_distance")

    frac_easy = _ratio("frac_easy")
    frac_semihard = _ratio("frac_semihard")
    frac_hard = _ratio("frac_hard")
    frac_positive_loss = _ratio("frac_positive_loss")
    hardest_positive_mean = _ratio("hardest_positive_mean")
    hardest_negative_mean = _ratio("hardest_negative_mean")
    mean_pairwise_distance = _ratio("mean_pairwise_distance")

    def ratios(self) -> Tensor:
        """(len(STATISTIC_RATIOS),) float64 tensor of the monitored ratios, in one kernel."""
        return ratios_of(self.values)

    def as_dict(self) -> dict[str, Tensor]:
        """Every field and ratio by name, as 0-d device tensors."""
        named = dict(zip(STATISTIC_FIELDS, self.values.unbind(), strict=True))
        named.update(zip(STATISTIC_RATIOS, self.ratios().unbind(), strict=True))
        return named


def ratios_of(values: Tensor) -> Tensor:
    """Monitored ratios from sufficient statistics: (..., F) → (..., len(STATISTIC_RATIOS))."""
    return values[..., _NUMERATORS] / values[..., _DENOMINATORS].clamp_min(1.0)


def check_margin(margin: float) -> float:
    """Return ``margin`` as a float if it is finite and > 0, else raise ``ValueError``."""
    try:
        value = float(margin)
    except (TypeError, ValueError):
        raise ValueError(f"margin must be a number, got {margin!r}") from None
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"margin must be finite and > 0, got {margin!r}")
    return value


def check_inputs(embeddings: Tensor, labels: Tensor, *, check_finite: bool = True) -> None:
    """Raise ``ValueError`` naming the problem if (embeddings, labels) is not a valid batch.

    Args:
        embeddings: (N, D) floating-point tensor.
        labels: (N,) integer tensor on the same device.
        check_finite: also reject NaN/inf embeddings, naming the rows. This reads one flag
            back from the device (a host synchronisation on GPU).
    """
    if not isinstance(embeddings, Tensor):
        raise ValueError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"embeddings and labels disagree on the batch size: {embeddings.shape[0]} "
            f"embeddings, {labels.shape[0]} labels"
        )
    if labels.device != embeddings.device:
        raise ValueError(
            f"labels are on {labels.device} but embeddings on {embeddings.device}; "
            "move them to the same device"
        )
    if check_finite and embeddings.numel():
        bad_rows = ~torch.isfinite(embeddings).all(dim=1)
        if bad_rows.any():
            rows = bad_rows.nonzero().flatten().tolist()
            shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
            raise ValueError(
                f"embeddings contain NaN or inf in {len(rows)} of {embeddings.shape[0]} rows "
                f"(rows {shown})"
            )


def label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) labels → (positive, negative) (N, N) bool masks: same label and a ≠ p; other label."""
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return positive, ~same


def _sort_negatives(distances: Tensor, negative: Tensor) -> Tensor:
    """Each row's anchor-negative distances ascending, the row padded with +inf: (N, N)."""
    return torch.sort(distances.masked_fill(~negative, torch.inf), dim=1).values


def _count_below(sorted_negatives: Tensor, thresholds: Tensor) -> Tensor:
    """(N, N) counts #{n : d(a, n) < thresholds[a, p]} by binary search in each sorted row."""
    return torch.searchsorted(sorted_negatives, thresholds.contiguous(), side="left")


def _difficulty_counts(
    distances: Tensor,
    sorted_negatives: Tensor,
    positive: Tensor,
    num_valid_triplets: Tensor,
    margin: float,
    below_margin: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(num_easy, num_semihard, num_hard) from raw distances and the unscaled margin.

    ``below_margin``, the (N, N) count #{n : d_an < d_ap + m}, is searched for unless given.
    """
    hard = _count_below(sorted_negatives, distances)
    if below_margin is None:
        below_margin = _count_below(sorted_negatives, distances + margin)
    num_hard = torch.where(positive, hard, 0).sum()
    num_semihard = torch.where(positive, below_margin - hard, 0).sum()
    return num_valid_triplets - num_hard - num_semihard, num_semihard, num_hard


def _hardest_distances(
    distances: Tensor, positive: Tensor, negative: Tensor, valid_anchor: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-anchor max d(a, p) and min d(a, n), (N,) each, 0 where the anchor is not valid."""
    hardest_positive = distances.masked_fill(~positive, -torch.inf).amax(dim=1)
    hardest_negative = distances.masked_fill(~negative, torch.inf).amin(dim=1)
    return (
        torch.where(valid_anchor, hardest_positive, 0.0),
        torch.where(valid_anchor, hardest_negative, 0.0),
    )


def _scale(hardest_negative: Tensor, num_valid_anchors: Tensor, scaled: bool) -> Tensor:
    """S = mean over valid anchors of the hardest negative distance (scaled), else 1."""
    if not scaled:
        return hardest_negative.new_ones(())
    return (hardest_negative.sum() / num_valid_anchors.clamp_min(1)).clamp_min(SCALE_FLOOR)


@dataclass
class _Batch:
    """What both reductions need about one batch; every tensor lives on the batch's device."""

    distances: Tensor  # (N, N)
    positive: Tensor  # (N, N) bool
    negative: Tensor  # (N, N) bool
    valid_anchor: Tensor  # (N,) bool
    num_valid_anchors: Tensor  # () int64
    num_valid_triplets: Tensor  # () int64

    @classmethod
    def build(cls, embeddings: Tensor, labels: Tensor, distance: Distance) -> _Batch:
        distances = pairwise_distances(embeddings, distance)
        positive, negative = label_masks(labels)
        num_positives, num_negatives = positive.sum(dim=1), negative.sum(dim=1)
        valid_anchor = (num_positives > 0) & (num_negatives > 0)
        return cls(
            distances=distances,
            positive=positive,
            negative=negative,
            valid_anchor=valid_anchor,
            num_valid_anchors=valid_anchor.sum(),
            num_valid_triplets=(num_positives * num_negatives).sum(),
        )

    def statistics(
        self,
        counts: tuple[Tensor, Tensor, Tensor],
        num_loss_terms: Tensor,
        num_positive_loss: Tensor,
        hardest_positive: Tensor,
        hardest_negative: Tensor,
    ) -> TripletStatistics:
        d = self.distances.detach()
        n = d.shape[0]
        values = torch.stack(
            [
                self.num_valid_triplets.to(torch.float64),
                self.num_valid_anchors.to(torch.float64),
                *(c.to(torch.float64) for c in counts),
                num_loss_terms.to(torch.float64),
                num_positive_loss.to(torch.float64),
                hardest_positive.detach().sum().to(torch.float64),
                hardest_negative.detach().sum().to(torch.float64),
                torch.full((), float(n * (n - 1)), dtype=torch.float64, device=d.device),
                (d.sum() - d.diagonal().sum()).to(torch.float64),
            ]
        )
        return TripletStatistics(values)


def _batch_hard(
    batch: _Batch, margin: float, scaled: bool, with_statistics: bool
) -> tuple[Tensor, TripletStatistics | None]:
    hardest_positive, hardest_negative = _hardest_distances(
        batch.distances, batch.positive, batch.negative, batch.valid_anchor
    )
    scale = _scale(hardest_negative, batch.num_valid_anchors, scaled)
    per_anchor = torch.relu((hardest_positive - hardest_negative) / scale + margin)
    per_anchor = torch.where(batch.valid_anchor, per_anchor, 0.0)
    loss = per_anchor.sum() / batch.num_valid_anchors.clamp_min(1)
    if not with_statistics:
        return loss, None
    # The difficulty counts range over all valid triplets, not only the hardest ones, so
    # they need the sorted negatives that batch-all sorts anyway; batch-hard sorts only here.
    with torch.no_grad():
        distances = batch.distances.detach()
        sorted_negatives = _sort_negatives(distances, batch.negative)
        counts = _difficulty_counts(
            distances, sorted_negatives, batch.positive, batch.num_valid_triplets, margin
        )
        stats = batch.statistics(
            counts,
            num_loss_terms=batch.num_valid_anchors,
            num_positive_loss=(per_anchor > 0).sum(),
            hardest_positive=hardest_positive,
            hardest_negative=hardest_negative,
        )
    return loss, stats


def _batch_all(
    batch: _Batch, margin: float, scaled: bool, with_statistics: bool
) -> tuple[Tensor, TripletStatistics | None]:
    distances, positive = batch.distances, batch.positive
    sorted_negatives = _sort_negatives(distances, batch.negative)
    # The row minimum is the hardest negative: no second pass over the matrix for it.
    hardest_negative = torch.where(batch.valid_anchor, sorted_negatives[:, 0], 0.0)
    scale = _scale(hardest_negative, batch.num_valid_anchors, scaled)

    # A triplet's term (d_ap − d_an)/S + m is > 0 exactly when d_an < d_ap + m·S.
    with torch.no_grad():
        violating = _count_below(sorted_negatives.detach(), distances.detach() + margin * scale)
        violating = torch.where(positive, violating, 0)
    # Prefix sums in float64: Σ d_an over thousands of negatives must not drift.
    finite_sorted = torch.where(sorted_negatives.isinf(), 0.0, sorted_negatives)
    prefix = F.pad(finite_sorted.cumsum(dim=1, dtype=torch.float64), (1, 0))
    violating_sum = prefix.gather(1, violating)
    violating_float = violating.to(torch.float64)
    # Σ_n over violating negatives of (d_ap − d_an)/S + m, for every (a, p) at once.
    terms = (violating_float * distances.to(torch.float64) - violating_sum) / scale
    total = (terms + margin * violating_float).sum()
    num_positive_loss = violating.sum()
    loss = (total / num_positive_loss.clamp_min(1)).to(distances.dtype)
    if not with_statistics:
        return loss, None
    with torch.no_grad():
        counts = _difficulty_counts(
            distances.detach(),
            sorted_negatives.detach(),
            positive,
            batch.num_valid_triplets,
            margin,
            # Unscaled, the loss's own threshold d_ap + m is the semi-hard boundary.
            below_margin=None if scaled else violating,
        )
        hardest_positive, _ = _hardest_distances(
            distances.detach(), positive, batch.negative, batch.valid_anchor
        )
        stats = batch.statistics(
            counts,
            num_loss_terms=batch.num_valid_triplets,
            num_positive_loss=num_positive_loss,
            hardest_positive=hardest_positive,
            hardest_negative=hardest_negative,
        )
    return loss, stats


_REDUCTIONS = {"batch_hard": _batch_hard, "batch_all": _batch_all}
Mining = Literal["batch_hard", "batch_all"]


def triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float,
    *,
    mining: Mining,
    scaled: bool = False,
    distance: Distance = "euclidean",
    with_statistics: bool = False,
    check_finite: bool = True,
) -> tuple[Tensor, TripletStatistics | None]:
    """The pipeline both losses share: check inputs → distances → mining reduction.

    Returns the scalar loss (float32, or float64 for float64 input) and, if asked, its
    ``TripletStatistics``. Batches with no valid triplet (N < 2, one class, all labels
    distinct) give a loss of exactly 0 that is still attached to the graph.
    """
    check_inputs(embeddings, labels, check_finite=check_finite)
    margin = check_margin(margin)
    check_distance(distance)
    reduction = _REDUCTIONS[mining]
    if embeddings.shape[0] < 2:
        return _empty_batch(embeddings, with_statistics)
    return reduction(_Batch.build(embeddings, labels, distance), margin, scaled, with_statistics)


def _empty_batch(
    embeddings: Tensor, with_statistics: bool
) -> tuple[Tensor, TripletStatistics | None]:
    """Zero loss for N < 2, attached to the graph without arithmetic on the embeddings."""
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    attached = embeddings.sum().to(dtype)
    loss = torch.where(torch.zeros((), dtype=torch.bool, device=embeddings.device), attached, 0.0)
    stats = None
    if with_statistics:
        zeros = torch.zeros(len(STATISTIC_FIELDS), dtype=torch.float64, device=embeddings.device)
        stats = TripletStatistics(zeros)
    return loss, stats


def _loss_or_pair(
    mining: Mining,
    embeddings: Tensor,
    labels: Tensor,
    margin: float,
    scaled: bool,
    distance: Distance,
    return_statistics: bool,
    check_finite: bool,
) -> Tensor | tuple[Tensor, TripletStatistics]:
    loss, stats = triplet_loss(
        embeddings,
        labels,
        margin,
        mining=mining,
        scaled=scaled,
        distance=distance,
        with_statistics=return_statistics,
        check_finite=check_finite,
    )
    return (loss, stats) if return_statistics else loss  # type: ignore[return-value]


@overload
def batch_hard_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = ...,
    *,
    scaled: bool = ...,
    distance: Distance = ...,
    return_statistics: Literal[False] = ...,
    check_finite: bool = ...,
) -> Tensor: ...
@overload
def batch_hard_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = ...,
    *,
    scaled: bool = ...,
    distance: Distance = ...,
    return_statistics: Literal[True],
    check_finite: bool = ...,
) -> tuple[Tensor, TripletStatistics]: ...
def batch_hard_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 0.2,
    *,
    scaled: bool = False,
    distance: Distance = "euclidean",
    return_statistics: bool = False,
    check_finite: bool = True,
) -> Tensor | tuple[Tensor, TripletStatistics]:
    """Batch-hard triplet loss: mean over valid anchors a of
    relu(max_p d(a,p) − min_n d(a,n) + m), or relu((max_p d(a,p) − min_n d(a,n)) / S + m)
    when ``scaled`` (S = mean over valid anchors of min_n d(a,n)).

    Args:
        embeddings: (N, D) float tensor (any float dtype; distances are computed in float32).
        labels: (N,) integer tensor on the same device.
        margin: m > 0.
        scaled: divide the difference by S (Quaterion's collapse-resistant variant).
        distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        return_statistics: also return the ``TripletStatistics`` (costs one row sort).
        check_finite: reject NaN/inf rows (one host synchronisation on GPU).

    Returns:
        The scalar loss, or (loss, statistics).
    """
    return _loss_or_pair(
        "batch_hard",
        embeddings,
        labels,
        margin,
        scaled,
        distance,
        return_statistics,
        check_finite,
    )


@overload
def batch_all_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = ...,
    *,
    scaled: bool = ...,
    distance: Distance = ...,
    return_statistics: Literal[False] = ...,
    check_finite: bool = ...,
) -> Tensor: ...
@overload
def batch_all_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = ...,
    *,
    scaled: bool = ...,
    distance: Distance = ...,
    return_statistics: Literal[True],
    check_finite: bool = ...,
) -> tuple[Tensor, TripletStatistics]: ...
def batch_all_triplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    margin: float = 0.2,
    *,
    scaled: bool = False,
    distance: Distance = "euclidean",
    return_statistics: bool = False,
    check_finite: bool = True,
) -> Tensor | tuple[Tensor, TripletStatistics]:
    """Batch-all triplet loss: mean of t = d(a,p) − d(a,n) + m over the valid triplets with
    t > 0 (0 if there are none); t = (d(a,p) − d(a,n)) / S + m when ``scaled``.

    Exact, in O(N² log N) time and O(N²) memory (see the module docstring). Arguments and
    returns as for :func:`batch_hard_triplet_loss`; its statistics come from the same sort
    as the loss, at the cost of two extra binary searches.
    """
    return _loss_or_pair(
        "batch_all",
        embeddings,
        labels,
        margin,
        scaled,
        distance,
        return_statistics,
        check_finite,
    )


def triplet_statistics(
    embeddings: Tensor,
    labels: Tensor,
    margin: float,
    *,
    distance: Distance = "euclidean",
) -> TripletStatistics:
    """Difficulty statistics of a labelled batch for a loss whose mining is unknown.

    The statistics of batch-all: ``num_loss_terms`` is every valid triplet and
    ``num_positive_loss`` those with d_an < d_ap + m. No gradient is recorded, no host sync.
    """
    with torch.no_grad():
        _, stats = triplet_loss(
            embeddings.detach(),
            labels,
            margin,
            mining="batch_all",
            distance=distance,
            with_statistics=True,
            check_finite=False,
        )
    assert stats is not None
    return stats
