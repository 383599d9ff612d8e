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

Batch-all never builds anything larger than N×N. A triplet's term (d_ap − d_an)/S + m is
positive exactly when d_an < d_ap + m·S, so each anchor's row holds its negatives' distances
and its positives' distances shifted up by m·S, sorted once; the negatives sorted before a
positive are its violating ones, and the loss is Σ (v_p − v_n)/S over those pairs: a count
times v_p minus a prefix sum. Rows are sorted by (key, is-negative), so a negative tied with
a positive sorts after it and ties count as not violating, exactly as the definition's
strict inequality says. That gives the exact loss, its exact gradient (through the sort and
the prefix sum) and, with one more sort of the unshifted rows, every difficulty count in
O(N² log N) time and O(N²) memory.

Difficulty counts of batches larger than ``STATISTICS_ANCHORS`` are estimated from that
many anchors drawn uniformly without replacement (each still sees all N columns), so
their cost is O(N log N) per sampled anchor whatever the batch size; see
:meth:`_LabelledBatch.difficulty_counts` and docs/losses.md for the estimator and its error bound.

Every function here is free of host synchronisation unless ``check_finite=True``, which
reads one flag back to report non-finite rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

from collapsewatch.losses.distances import Distance, check_distance, pairwise_distances

SCALE_FLOOR = 1e-12
"""Lower bound of the scaled variant's divisor S (its square is still a normal float32)."""

STATISTICS_ANCHORS = 1024
"""Difficulty counts are exact up to this many anchors; a larger batch's are estimated from
this many anchors drawn uniformly without replacement (see docs/losses.md)."""

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
    "num_between_class_pairs",
    "sum_between_class_distance",
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
    "mean_between_class_distance": ("sum_between_class_distance", "num_between_class_pairs"),
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
    Above ``STATISTICS_ANCHORS`` anchors, ``num_easy``/``num_semihard``/``num_hard`` (and a
    foreign loss's ``num_positive_loss``) are ratio estimates of the full-batch sums
    from a sample of anchors; every other field stays exact.
    ``num_loss_terms`` counts what the loss averages: all valid triplets for batch-all, valid
    anchors for batch-hard; ``num_positive_loss`` how many of those have a positive loss
    term. ``num_pairs`` is N(N − 1), the ordered pairs i ≠ j; ``num_between_class_pairs``
    the ordered pairs of different labels, Σ_i (N − n_{y_i}).
    """

    values: Tensor

    def __post_init__(self) -> None:
        if tuple(self.values.shape) != (len(STATISTIC_FIELDS),):
            raise ValueError(
                f"TripletStatistics.values must have shape ({len(STATISTIC_FIELDS)},), one entry "
                f"per STATISTIC_FIELDS name, got {tuple(self.values.shape)}; build it by name "
                "with TripletStatistics.of(...)"
            )

    @classmethod
    def of(cls, **fields: Tensor) -> TripletStatistics:
        """Statistics from every field of ``STATISTIC_FIELDS`` by name (0-d tensors on one
        device), stacked in the canonical order in one kernel: ``torch.stack`` promotes the
        integer counts to float64 along with the float64 ones, exact up to 2⁵³."""
        if fields.keys() != set(STATISTIC_FIELDS):
            missing = sorted(set(STATISTIC_FIELDS) - fields.keys())
            unknown = sorted(fields.keys() - set(STATISTIC_FIELDS))
            raise ValueError(
                f"TripletStatistics.of needs exactly the STATISTIC_FIELDS; missing {missing}, "
                f"unknown {unknown}"
            )
        return cls(torch.stack([fields[name] for name in STATISTIC_FIELDS]))

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
    num_between_class_pairs = _field("num_between_class_pairs")
    sum_between_class_distance = _field("sum_between_class_distance")

    frac_easy = _ratio("frac_easy")
    frac_semihard = _ratio("frac_semihard")
    frac_hard = _ratio("frac_hard")
    frac_positive_loss = _ratio("frac_positive_loss")
    hardest_positive_mean = _ratio("hardest_positive_mean")
    hardest_negative_mean = _ratio("hardest_negative_mean")
    mean_pairwise_distance = _ratio("mean_pairwise_distance")
    mean_between_class_distance = _ratio("mean_between_class_distance")

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


def check_inputs(embeddings: Tensor, labels: Tensor, *, check_finite: bool = False) -> None:
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
    negative = ~same
    return same.fill_diagonal_(False), negative


def _class_sizes(labels: Tensor) -> Tensor:
    """(N,) labels → (N,) size of each sample's class, in O(N log N)."""
    sorted_labels = torch.sort(labels).values
    left = torch.searchsorted(sorted_labels, labels, side="left")
    return torch.searchsorted(sorted_labels, labels, side="right") - left


def _sort_rows(keys: Tensor, negative: Tensor) -> Tensor:
    """(R, N) keys ≥ 0 and (R, N) bool tags → (R, N) column order sorting each row by
    (key, tag): ascending keys, and at equal keys the untagged (False) entries first.

    float32 keys are packed with their row and tag into one int64 per entry — the IEEE bits
    of a float ≥ 0 order like the float (``abs`` turns −0.0 into +0.0) — and sorted as one
    flat tensor: a radix sort, 2–3× faster on CPU than torch's comparison sort of the rows.
    float64 keys (references, gradcheck) take two stable row sorts, by tag and then by key.
    """
    r, n = keys.shape
    if keys.dtype == torch.float32:
        rows = torch.arange(r, device=keys.device)[:, None]
        bits = keys.detach().abs().view(torch.int32).to(torch.int64)
        packed = (rows << 32) | (bits << 1) | negative
        return torch.sort(packed.flatten()).indices.view(r, n) - rows * n
    by_tag = torch.argsort(negative.to(torch.uint8), dim=1, stable=True)
    by_key = torch.argsort(keys.detach().gather(1, by_tag), dim=1, stable=True)
    return by_tag.gather(1, by_key)


@dataclass
class _Rows:
    """Each anchor's positives and negatives, sorted by key (see ``_sorted_rows``)."""

    values: Tensor  # (R, N) sorted keys, differentiable
    positive: Tensor  # (R, N) bool: the sorted entry is a positive
    negative: Tensor  # (R, N) bool: the sorted entry is a negative
    negatives_before: Tensor  # (R, N) int: negatives strictly below the entry

    def count_below_positives(self) -> Tensor:
        """Σ over (a, p) of #{n : key_n < key_p}: a difficulty or violation count."""
        return torch.where(self.positive, self.negatives_before, 0).sum()


def _sorted_rows(
    distances: Tensor, positive: Tensor, negative: Tensor, shift: Tensor | float
) -> _Rows:
    """Sort each row of negatives d(a,n) and shifted positives d(a,p) + shift together.

    Args: distances, positive, negative (R, N): R anchors' rows (all N columns) and masks.
    For a positive p, the negatives sorted before it are exactly those with
    d(a,n) < d(a,p) + shift: with shift = m, the triplets with a positive loss.
    """
    keys = torch.where(negative, distances, distances + shift)
    order = _sort_rows(keys, negative)
    sorted_negative = negative.gather(1, order)
    return _Rows(
        values=keys.gather(1, order),
        positive=positive.gather(1, order),
        negative=sorted_negative,
        negatives_before=sorted_negative.cumsum(dim=1, dtype=torch.int32),
    )


def _hardest_positive(distances: Tensor, positive: Tensor, valid_anchor: Tensor) -> Tensor:
    """Per-anchor max_p d(a, p), (N,), 0 where the anchor is not valid.

    ``max`` with indices, not ``amax``: the gradient goes to one hardest positive (a valid
    subgradient under ties) without another pass over the matrix to split it.
    """
    hardest = torch.where(positive, distances, -torch.inf).max(dim=1).values
    return torch.where(valid_anchor, hardest, 0.0)


def _hardest_negative(distances: Tensor, negative: Tensor, valid_anchor: Tensor) -> Tensor:
    """Per-anchor min_n d(a, n), (N,), 0 where the anchor is not valid."""
    hardest = torch.where(negative, distances, torch.inf).min(dim=1).values
    return torch.where(valid_anchor, hardest, 0.0)


def _scale(hardest_negative: Tensor, num_valid_anchors: Tensor, scaled: bool) -> Tensor | None:
    """S = mean over valid anchors of the hardest negative distance, or None (unscaled)."""
    if not scaled:
        return None
    return (hardest_negative.sum() / num_valid_anchors.clamp_min(1)).clamp_min(SCALE_FLOOR)


class AnchorSampler:
    """Draws the anchors whose difficulty counts estimate a large batch's (see
    ``STATISTICS_ANCHORS``), from a random stream of its own.

    One generator per device, seeded with ``seed`` on first use: no host sync, the training
    loop's random stream is left alone, and two losses never share (or perturb) one stream.
    Each bundled loss module and each ``watch()`` owns one; the functional API makes a fresh
    one per call unless given one, so a functional call is a pure function of its inputs.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(self, n: int, device: torch.device) -> Tensor | None:
        """``STATISTICS_ANCHORS`` distinct anchors drawn uniformly from N on ``device`` (the
        top-k of uniform keys), or None (all anchors) when N is not larger."""
        if n <= STATISTICS_ANCHORS:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            self._generators[device] = generator
        keys = torch.rand(n, generator=generator, device=device)
        return keys.topk(STATISTICS_ANCHORS, sorted=False).indices


@dataclass
class _LabelledBatch:
    """What both reductions need about one batch; every tensor lives on the batch's device."""

    distances: Tensor  # (N, N)
    labels: Tensor  # (N,)
    positive: Tensor  # (N, N) bool
    negative: Tensor  # (N, N) bool
    class_size: Tensor  # (N,) int64
    valid_anchor: Tensor  # (N,) bool
    num_valid_anchors: Tensor  # () int64
    num_valid_triplets: Tensor  # () int64
    anchor_sampler: AnchorSampler  # for difficulty counts above STATISTICS_ANCHORS anchors

    @classmethod
    def build(
        cls,
        embeddings: Tensor,
        labels: Tensor,
        distance: Distance,
        anchor_sampler: AnchorSampler | None = None,
    ) -> _LabelledBatch:
        n = labels.shape[0]
        positive, negative = label_masks(labels)
        class_size = _class_sizes(labels)
        num_positives, num_negatives = class_size - 1, n - class_size
        valid_anchor = (num_positives > 0) & (num_negatives > 0)
        return cls(
            distances=pairwise_distances(embeddings, distance),
            labels=labels,
            positive=positive,
            negative=negative,
            class_size=class_size,
            valid_anchor=valid_anchor,
            num_valid_anchors=valid_anchor.sum(),
            num_valid_triplets=(num_positives * num_negatives).sum(),
            anchor_sampler=anchor_sampler or AnchorSampler(),
        )

    def difficulty_counts(
        self, margin: float, below_margin: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(num_easy, num_semihard, num_hard) from raw distances and the unscaled margin.

        ``below_margin``, the count of (a, p, n) with d_an < d_ap + m, is sorted for
        unless given. Up to ``STATISTICS_ANCHORS`` anchors the counts are exact. Beyond,
        each count c is estimated from a uniform sample A of anchors as
        c_A · T / T_A (T valid triplets, T_A those of the sampled anchors): the fractions
        c/T are then the sample's own fractions, and the estimates stay sums that add up
        across batches and ranks like exact counts (float64, not integers).
        """
        with torch.no_grad():
            n = self.labels.shape[0]
            anchors = self.anchor_sampler.sample(n, self.distances.device)
            distances, positive, negative = self.distances.detach(), self.positive, self.negative
            total = self.num_valid_triplets.to(torch.float64)
            weight = None
            if anchors is not None:
                distances, positive, negative = (
                    t.index_select(0, anchors) for t in (distances, positive, negative)
                )
                sizes = self.class_size.index_select(0, anchors)
                weight = total / ((sizes - 1) * (n - sizes)).sum().clamp_min(1)

            def estimate(count: Tensor) -> Tensor:
                count = count.to(torch.float64)
                return count if weight is None else count * weight

            num_hard = estimate(
                _sorted_rows(distances, positive, negative, 0.0).count_below_positives()
            )
            if below_margin is None:
                below_margin = estimate(
                    _sorted_rows(distances, positive, negative, margin).count_below_positives()
                )
            below_margin = below_margin.to(torch.float64)
        return total - below_margin, below_margin - num_hard, num_hard

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
        num_easy, num_semihard, num_hard = counts
        # One kernel: the stack promotes every entry to float64 (num_pairs is), so the integer
        # counts stay exact up to 2⁵³; converting each first would be a dozen more kernels.
        return TripletStatistics.of(
            num_valid_triplets=self.num_valid_triplets,
            num_valid_anchors=self.num_valid_anchors,
            num_easy=num_easy,
            num_semihard=num_semihard,
            num_hard=num_hard,
            num_loss_terms=num_loss_terms,
            num_positive_loss=num_positive_loss,
            sum_hardest_positive=hardest_positive.detach().sum(),
            sum_hardest_negative=hardest_negative.detach().sum(),
            num_pairs=torch.full((), float(n * (n - 1)), dtype=torch.float64, device=d.device),
            sum_pairwise_distance=d.sum() - d.diagonal().sum(),
            num_between_class_pairs=(n - self.class_size).sum(),
            sum_between_class_distance=torch.where(self.negative, d, 0.0).sum(),
        )


def _unknown_counts(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(num_easy, num_semihard, num_hard) when they were not computed: NaN, so the
    fractions read back as unknown rather than as 0."""
    nan = torch.full((), torch.nan, dtype=torch.float64, device=device)
    return nan, nan, nan


def _batch_hard(
    batch: _LabelledBatch, margin: float, scaled: bool, with_statistics: bool, with_difficulty: bool
) -> tuple[Tensor, TripletStatistics | None]:
    distances = batch.distances
    hardest_positive = _hardest_positive(distances, batch.positive, batch.valid_anchor)
    hardest_negative = _hardest_negative(distances, batch.negative, batch.valid_anchor)
    scale = _scale(hardest_negative, batch.num_valid_anchors, scaled)
    difference = hardest_positive - hardest_negative
    per_anchor = torch.relu((difference if scale is None else difference / scale) + margin)
    per_anchor = torch.where(batch.valid_anchor, per_anchor, 0.0)
    loss = per_anchor.sum() / batch.num_valid_anchors.clamp_min(1)
    if not with_statistics:
        return loss, None
    # The difficulty counts range over all valid triplets, not only the hardest ones, which
    # takes two row sorts: batch-hard pays for them only when they are asked for.
    with torch.no_grad():
        counts = (
            batch.difficulty_counts(margin)
            if with_difficulty
            else _unknown_counts(distances.device)
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
    batch: _LabelledBatch, margin: float, scaled: bool, with_statistics: bool, with_difficulty: bool
) -> tuple[Tensor, TripletStatistics | None]:
    distances = batch.distances
    hardest_negative = None
    scale = None
    if scaled or with_statistics:
        hardest_negative = _hardest_negative(distances, batch.negative, batch.valid_anchor)
        scale = _scale(hardest_negative, batch.num_valid_anchors, scaled)
    # (d_ap − d_an)/S + m > 0 ⇔ d_an < d_ap + m·S: shift the positives up by m·S and sort
    # each row once; the negatives sorted before a positive are exactly its violating ones.
    shift = margin if scale is None else margin * scale
    rows = _sorted_rows(distances, batch.positive, batch.negative, shift)
    count = torch.where(rows.positive, rows.negatives_before, 0)
    # Σ over violating n of (d_ap − d_an)/S + m = Σ (v_p − v_n)/S, v_p = d_ap + m·S:
    # v_p times the count, minus the prefix sum (float64) of the negatives. The count is 0
    # away from positives, the anchor's own entry included.
    prefix = torch.where(rows.negative, rows.values, 0.0).cumsum(dim=1, dtype=torch.float64)
    total = (count.to(distances.dtype) * rows.values).sum(dtype=torch.float64)
    total = total - torch.where(rows.positive, prefix, 0.0).sum()
    if scale is not None:
        total = total / scale
    num_positive_loss = count.sum()
    loss = (total / num_positive_loss.clamp_min(1)).to(distances.dtype)
    if not with_statistics:
        return loss, None
    assert hardest_negative is not None  # computed above whenever statistics are asked for
    with torch.no_grad():
        # Unscaled, the loss's own threshold d_ap + m is the semi-hard boundary.
        if with_difficulty:
            below_margin = None if scaled else num_positive_loss
            counts = batch.difficulty_counts(margin, below_margin=below_margin)
        else:
            counts = _unknown_counts(distances.device)
        stats = batch.statistics(
            counts,
            num_loss_terms=batch.num_valid_triplets,
            num_positive_loss=num_positive_loss,
            hardest_positive=_hardest_positive(distances, batch.positive, batch.valid_anchor),
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
    with_difficulty: bool = True,
    check_finite: bool = False,
    anchor_sampler: AnchorSampler | None = None,
) -> tuple[Tensor, TripletStatistics | None]:
    """The pipeline both losses share: check inputs → distances → mining reduction.

    Returns the scalar loss (float32, or float64 for float64 input) and, if asked, its
    ``TripletStatistics``; without ``with_difficulty`` their easy / semi-hard / hard counts
    (the one part that sorts every anchor's row) are NaN. Batches with no valid triplet
    (N < 2, one class, all labels distinct) give a loss of exactly 0 that is still attached
    to the graph. ``anchor_sampler`` draws the anchors of a large batch's difficulty counts
    (a fresh one, seeded 0, when None).
    """
    check_inputs(embeddings, labels, check_finite=check_finite)
    margin = check_margin(margin)
    check_distance(distance)
    reduction = _REDUCTIONS[mining]
    if embeddings.shape[0] < 2:
        return _empty_batch(embeddings, with_statistics)
    batch = _LabelledBatch.build(embeddings, labels, distance, anchor_sampler)
    return reduction(batch, margin, scaled, with_statistics, with_difficulty)


def _empty_batch(
    embeddings: Tensor, with_statistics: bool
) -> tuple[Tensor, TripletStatistics | None]:
    """Zero loss for N < 2, attached to the graph without arithmetic on the embeddings."""
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    attached = embeddings.sum().to(dtype)
    loss = torch.where(torch.zeros((), dtype=torch.bool, device=embeddings.device), attached, 0.0)
    return loss, _zero_statistics(embeddings.device) if with_statistics else None


def _zero_statistics(device: torch.device) -> TripletStatistics:
    """The statistics of a batch of fewer than two embeddings: every sum and count is 0."""
    return TripletStatistics(torch.zeros(len(STATISTIC_FIELDS), dtype=torch.float64, device=device))


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
    # stats is None exactly when they were not asked for.
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
    check_finite: bool = False,
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
        return_statistics: also return the ``TripletStatistics`` (costs two row sorts, of at
            most ``STATISTICS_ANCHORS`` rows).
        check_finite: reject NaN/inf rows with a ``ValueError`` (one host synchronisation
            on GPU). Off by default: ``watch()`` counts non-finite entries on the device.

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
    check_finite: bool = False,
) -> Tensor | tuple[Tensor, TripletStatistics]:
    """Batch-all triplet loss: mean of t = d(a,p) − d(a,n) + m over the valid triplets with
    t > 0 (0 if there are none); t = (d(a,p) − d(a,n)) / S + m when ``scaled``.

    Exact, in O(N² log N) time and O(N²) memory (see the module docstring). Arguments and
    returns as for :func:`batch_hard_triplet_loss`; its statistics cost one more row sort
    (two when ``scaled``).
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
    with_difficulty: bool = True,
    anchor_sampler: AnchorSampler | None = None,
) -> TripletStatistics:
    """Difficulty statistics of a labelled (N, D) batch for a loss whose mining is unknown.

    The statistics of batch-all, without its loss: ``num_loss_terms`` is every valid
    triplet and ``num_positive_loss`` those with d_an < d_ap + m. Difficulty counts are
    estimated above ``STATISTICS_ANCHORS`` anchors from ``anchor_sampler``'s draws (a fresh
    one, seeded 0, when None), as for the bundled losses. Without
    ``with_difficulty`` only the counts of valid triplets and anchors and the pairwise
    distance sum are computed (what the detector reads every step); the per-anchor fields
    are NaN. No gradient is recorded, no host sync.
    """
    check_inputs(embeddings, labels)
    margin = check_margin(margin)
    check_distance(distance)
    with torch.no_grad():
        if embeddings.shape[0] < 2:
            return _zero_statistics(embeddings.device)
        if not with_difficulty:
            return _spread_statistics(embeddings.detach(), labels, distance)
        batch = _LabelledBatch.build(embeddings.detach(), labels, distance, anchor_sampler)
        easy, semihard, hard = batch.difficulty_counts(margin)
        return batch.statistics(
            (easy, semihard, hard),
            num_loss_terms=batch.num_valid_triplets,
            num_positive_loss=semihard + hard,
            hardest_positive=_hardest_positive(batch.distances, batch.positive, batch.valid_anchor),
            hardest_negative=_hardest_negative(batch.distances, batch.negative, batch.valid_anchor),
        )


def _spread_statistics(embeddings: Tensor, labels: Tensor, distance: Distance) -> TripletStatistics:
    """The statistics every step needs, of an (N, D) batch: the valid triplet and anchor
    counts and the pairwise distance sums (all pairs, and between classes); the per-anchor
    ones (difficulty counts, hardest-pair sums, positive-loss count) NaN. A handful of
    kernels; one N×N mask, of different labels."""
    n = labels.shape[0]
    d = pairwise_distances(embeddings, distance)
    class_size = _class_sizes(labels)
    num_positives, num_negatives = class_size - 1, n - class_size
    nan = torch.full((), torch.nan, dtype=torch.float64, device=d.device)
    num_triplets = (num_positives * num_negatives).sum()
    return TripletStatistics.of(
        num_valid_triplets=num_triplets,
        num_valid_anchors=((num_positives > 0) & (num_negatives > 0)).sum(),
        num_easy=nan,
        num_semihard=nan,
        num_hard=nan,
        num_loss_terms=num_triplets,
        num_positive_loss=nan,
        sum_hardest_positive=nan,
        sum_hardest_negative=nan,
        num_pairs=torch.full((), float(n * (n - 1)), dtype=torch.float64, device=d.device),
        sum_pairwise_distance=d.sum() - d.diagonal().sum(),
        num_between_class_pairs=num_negatives.sum(),
        sum_between_class_distance=torch.where(labels[:, None] != labels[None, :], d, 0.0).sum(),
    )
