"""Per-step collapse statistics: sufficient statistics on the device, metrics on the host.

A recorded step is reduced on the embeddings' device to one float64 vector of *sums*
(:func:`step_vectors`): the loss, the triplet loss's sufficient statistics and the embedding
sums below. Sums add up exactly across ranks, so under DDP one ``all_reduce(SUM)`` of this
vector describes the global batch, where averaging per-rank variances or ranks would not.
The vectors are copied to the host in batches and turned into the recorded columns by
:func:`derive_metrics` (numpy, in the background writer thread).

Columns (float64; ``step``, ``nonfinite_count``, ``embedding_dim`` and ``batch_size`` int64):

=====================  ==========================================================
loss                   the loss value (under DDP: the mean over ranks)
margin                 the loss's margin m (NaN for a margin-free loss)
loss_margin_ratio      loss / plateau, the plateau being the loss at zero distances: m for
                       hinge losses, ln(1 + eᵐ) for soft-margin ones; ≈ 1 on the collapse
                       plateau; NaN without a margin
embedding_variance     (1/D) Σ_d Var_i(z_id), unbiased (N − 1); 0 if N < 2
mean_pairwise_distance mean over ordered pairs i ≠ j of d(z_i, z_j), as the loss sees it
mean_between_class_distance  the same mean over pairs of different labels only (NaN without
                       labels or with one class): the spread collapse takes away, whatever
                       share of same-class pairs the sampler puts in a batch
frac_easy/…semihard/…hard  share of valid triplets that are easy / semi-hard / hard
frac_positive_loss     share of the loss's terms that are > 0
hardest_positive_mean  mean over valid anchors of max_p d(a, p)
hardest_negative_mean  mean over valid anchors of min_n d(a, n)
embedding_norm_mean    (1/N) Σ_i ‖z_i‖
std_of_l2_normalized   (1/D) Σ_d Std_i(z_id / ‖z_i‖), unbiased; ≈ 1/√D healthy, 0 collapsed
effective_rank         RankMe of the centred batch: exp(−Σ_k p_k log p_k), p_k = σ_k / Σσ + 1e-7,
                       σ = √eig(ZᵀZ − N μμᵀ), μ the batch mean
num_classes            C, distinct labels among the rows (label mod ``CLASS_BUCKETS``)
within_class_variance_ratio  tr Σ_W / tr Σ_T (NC1): 1 no class structure, → 0 tight classes
alignment              mean over positive pairs i ≠ j of ‖u_i − u_j‖², u = z/‖z‖
uniformity             log mean over pairs i ≠ j of exp(−2‖u_i − u_j‖²)
nonfinite_count        NaN/inf entries among the step's embeddings, plus those of the
                       unrecorded steps since the previous recorded one
nonfinite_loss_count   non-finite (NaN/inf) loss values at this step and at the unrecorded
                       steps since the previous recorded one
loss_margin_ratio_step_change  mean |Δ loss| / plateau between consecutive loss calls, over
                       the calls since the previous recorded step (this one's included):
                       the batch noise of the loss from every training step, whatever the
                       recording interval; NaN without a plateau or a previous call
embedding_dim          D
batch_size             N, rows of the step's embeddings (finite and not)
num_valid_triplets     valid (a, p, n) triplets the statistics were computed over
=====================  ==========================================================

The last five are measured on *rank steps* only (``watch(..., rank_every=…)``; NaN on the
other steps), from one more vector of sums (:func:`rank_step_sums`): the Gram matrix, four
pair sums and a class table. The step vector itself keeps its size.

Embedding statistics use only the rows that are entirely finite; ``nonfinite_count`` says
how many entries were not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from collapsewatch.columns import (
    MARGIN_RELATIVE,
    METRIC_COLUMNS,
    PROBE_COLUMNS,
    RANK_STEP_COLUMNS,
)
from collapsewatch.losses.distances import Distance, pairwise_distances
from collapsewatch.losses.functional import (
    STATISTIC_FIELDS,
    STATISTIC_RATIOS,
    TripletStatistics,
    ratios_of,
)

RANKME_EPSILON = 1e-7

# Rows of the class table: a label counts in row ``label mod CLASS_BUCKETS``, so the table has
# a fixed shape (no host sync to count classes, the same shape on every DDP rank) and is exact
# for labels in [0, CLASS_BUCKETS); labels that share a row are counted as one class.
CLASS_BUCKETS = 1024
# Relative size under which tr Σ_T is rounding noise of Σ‖z‖² (all rows equal): ratio unknown.
_ROUNDING = 1e-12

# Layout of a step vector: [loss, triplet sums…, embedding sums…, non-finite losses,
# Σ |Δ loss|, number of Δ loss] (the last two over the loss calls since the previous recorded
# step: `loss_changes`), the embedding sums being
# [rows, finite rows, non-finite entries, Σ‖z‖, Σ z², Σ_i z_i (D), Σ_i ẑ_i (D), Σ_i ẑ_i² (D)].
_TRIPLET = slice(1, 1 + len(STATISTIC_FIELDS))
_EMBEDDING = 1 + len(STATISTIC_FIELDS)
_SCALARS = 5
# Layout of a rank-step vector: [Gram (D·D), pair sums (4), class table (K, 1 + D)], the pair
# sums being [Σ exp(−2‖u_i − u_j‖²), pairs, Σ_positive ‖u_i − u_j‖², positive pairs].
_PAIR_SUMS = 4


def step_vector_size(dim: int) -> int:
    """Length of a step vector for embeddings of dimension ``dim`` (without the Gram)."""
    return _EMBEDDING + _SCALARS + 3 * dim + 3


def rank_step_size(dim: int, buckets: int = CLASS_BUCKETS) -> int:
    """Length of a rank-step vector (:func:`rank_step_sums`) for dimension ``dim``."""
    return dim * dim + _PAIR_SUMS + buckets * (1 + dim)


def _finite_rows(embeddings: Tensor) -> tuple[Tensor, Tensor]:
    """(N, D) → float64 copy with non-finite rows zeroed (N, D), and the finite-row mask (N, 1)."""
    z = embeddings.detach().to(torch.float64)
    finite_rows = torch.isfinite(z).all(dim=1, keepdim=True)
    return torch.where(finite_rows, z, 0.0), finite_rows


def _unit(z: Tensor) -> tuple[Tensor, Tensor]:
    """Rows scaled to unit length (a zero row stays zero) and their norms (N, 1)."""
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z / norms.clamp_min(torch.finfo(torch.float64).tiny), norms


def embedding_sums(embeddings: Tensor) -> Tensor:
    """(..., N, D) embeddings → (..., 5 + 3D) float64 sums, on the same device, no host sync.

    Order: N, N_finite, non-finite entry count, Σ‖z_i‖, Σ_{i,d} z_id², Σ_i z_i, Σ_i ẑ_i,
    Σ_i ẑ_i², where ẑ = z/‖z‖ and only entirely finite rows count in the sums. Leading
    dimensions are independent batches: ``watch()`` reduces a whole commit's steps of one
    shape in one call, since at small N the cost is the number of kernels, not their work.
    """
    e = embeddings.detach()
    finite = torch.isfinite(e)
    finite_rows = finite.all(dim=-1, keepdim=True)
    z = torch.where(finite_rows, e, 0.0).to(torch.float64)
    square_norms = (z * z).sum(dim=-1, keepdim=True)
    norms = square_norms.sqrt()
    unit = z / norms.clamp_min(torch.finfo(torch.float64).tiny)
    # Per-row scalars are summed together, the (N, D) terms each on their own: concatenating
    # everything into one (..., N, 5 + 3D) block first costs four times as much on a CPU.
    per_row = torch.cat(
        [finite_rows, (~finite).sum(dim=-1, keepdim=True), norms, square_norms], dim=-1
    ).to(torch.float64)
    rows = norms.new_full((*norms.shape[:-2], 1), e.shape[-2])
    return torch.cat(
        [rows, per_row.sum(dim=-2), z.sum(dim=-2), unit.sum(dim=-2), (unit * unit).sum(dim=-2)],
        dim=-1,
    )


def rank_step_sums(
    embeddings: Tensor, labels: Tensor | None, buckets: int = CLASS_BUCKETS
) -> Tensor:
    """(N, D) embeddings, (N,) integer labels or None → (rank_step_size(D, K),) float64 sums.

    On the embeddings' device, no host sync, a fixed number of kernels (no loop over
    classes). Finite rows only; u = z/‖z‖. Order:

    * ZᵀZ (D·D), for the effective rank;
    * Σ_{i≠j} exp(−2‖u_i − u_j‖²) and the number of ordered pairs i ≠ j (uniformity);
    * Σ ‖u_i − u_j‖² over ordered pairs i ≠ j with equal labels, and their number
      (alignment; NaN without labels);
    * the class table (K, 1 + D) flattened: row k holds n_k and Σ z_i over the rows whose
      label mod K is k (within-class variance, class count; NaN without labels).

    All of it adds up across DDP ranks: the table exactly (global classes); the pair sums
    range over the pairs *within* each rank's batch, as the loss's own pairs do.
    """
    z, finite_rows = _finite_rows(embeddings)
    finite = finite_rows.to(torch.float64)
    unit, _ = _unit(z)
    squares = (unit * unit).sum(dim=1)
    # ‖u_i − u_j‖² from the Gram of the unit rows: one (N, N) matmul, no pairwise loop.
    distances = (squares[:, None] + squares[None, :] - 2 * unit @ unit.T).clamp_min(0.0)
    pairs = finite * finite.T
    pairs.fill_diagonal_(0.0)
    sums = [(torch.exp(-2 * distances) * pairs).sum(), pairs.sum()]
    if labels is None:
        sums += [torch.full_like(sums[1], torch.nan)] * 2
        table = z.new_full((buckets, 1 + z.shape[1]), torch.nan)
    else:
        labels = labels.detach().to(device=z.device, dtype=torch.int64)
        positive = pairs * (labels[:, None] == labels[None, :])
        sums += [(distances * positive).sum(), positive.sum()]
        table = z.new_zeros((buckets, 1 + z.shape[1]))
        table.index_add_(0, labels.remainder(buckets), torch.cat([finite, z], dim=1))
    return torch.cat([(z.T @ z).flatten(), torch.stack(sums), table.flatten()])


def step_vectors(
    losses: Sequence[Tensor | None],
    triplets: Sequence[TripletStatistics | None],
    embedding_sums: Tensor,
    skipped: Tensor | None = None,
) -> Tensor:
    """S steps' vectors, (S, step_vector_size(D)) float64: [loss, triplet sums,
    ``embedding_sums(z)``, non-finite losses, Σ |Δ loss|, number of Δ loss] each, NaN where
    the loss or its statistics are unknown.

    ``losses``: S 0-d tensors or None; ``triplets``: S ``TripletStatistics`` or None;
    ``embedding_sums``: (S, 5 + 3D); ``skipped``: (S, 4) [non-finite losses, non-finite
    embedding entries] counted over the unrecorded steps before each (:func:`nonfinite_counts`),
    added to the step's own, and [Σ |Δ loss|, number of Δ loss] over the loss calls since the
    previous recorded step, this one's included (:func:`loss_changes`). A handful of kernels
    whatever S is.
    """
    unknown = embedding_sums.new_full((len(STATISTIC_FIELDS),), torch.nan)
    # A loss read as a Python number (loss_value=) is a CPU tensor: moved, it syncs nothing
    # its float() had not already synced.
    device = embedding_sums.device
    loss = torch.stack([unknown[0] if v is None else v.detach().to(device) for v in losses])
    loss = loss.to(embedding_sums)
    # An unknown loss (None) is NaN in the loss column but is not a non-finite loss.
    known = torch.tensor([v is not None for v in losses], device=device)
    nonfinite_losses = (known & ~torch.isfinite(loss)).to(embedding_sums)
    sums = embedding_sums
    changes = embedding_sums.new_zeros((len(losses), 2))
    if skipped is not None:
        skipped = skipped.to(embedding_sums)
        nonfinite_losses = nonfinite_losses + skipped[:, 0]
        sums = sums.clone()
        sums[:, 2] += skipped[:, 1]
        changes = skipped[:, 2:]
    triplet = torch.stack([unknown if t is None else t.values for t in triplets])
    return torch.cat(
        [loss[:, None], triplet.to(embedding_sums), sums, nonfinite_losses[:, None], changes],
        dim=1,
    )


def nonfinite_counts(loss: Tensor | None, embeddings: Sequence[Tensor]) -> Tensor:
    """(2,) float64 [1 if ``loss`` is non-finite else 0, non-finite entries of
    ``embeddings``], on the device, no host sync: what an unrecorded step adds to the next
    recorded step's ``nonfinite_loss_count`` and ``nonfinite_count``."""
    device = loss.device if loss is not None else embeddings[0].device
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    if loss is not None:
        counts[0] = (~torch.isfinite(loss.detach())).any().to(torch.float64)
    for e in embeddings:
        counts[1] += (~torch.isfinite(e.detach())).sum().to(device=device, dtype=torch.float64)
    return counts


def loss_changes(values: Sequence[Tensor]) -> Tensor | None:
    """(2,) float64 [Σ_t |v_t − v_{t−1}|, number of terms] over consecutive pairs of the 0-d
    loss values ``values`` (one per loss call, in order) where both are finite, on the last
    value's device, no host sync; None for fewer than two. Summed over the calls between
    recorded steps, it gives the loss's step-to-step noise from every call, not only the
    recorded ones (changes between recorded steps k calls apart mix in k steps of trend).
    """
    if len(values) < 2:
        return None
    # Straight to float64: calls of mixed precision (autocast) lose nothing to the last's.
    device = values[-1].device
    changes = torch.stack([v.detach().to(device, torch.float64) for v in values]).diff()
    known = torch.isfinite(changes)
    return torch.stack([torch.where(known, changes.abs(), 0.0).sum(), known.sum().to(changes)])


def explicit_triplet_statistics(
    anchor: Tensor, positive: Tensor, negative: Tensor, margin: float, distance: Distance
) -> TripletStatistics:
    """Statistics of explicit triplets (anchor_i, positive_i, negative_i), each (N, D).

    For losses called as ``(anchor, positive, negative)``: the loss's terms are the N given
    triplets; each anchor counts as a valid anchor with d(a, p) as its hardest positive and
    d(a, n) as its hardest negative; pairs are those among all 3N embeddings.
    """
    with torch.no_grad():
        n = anchor.shape[0]
        stacked = torch.cat([anchor, positive, negative]).detach()
        distances = pairwise_distances(stacked, distance)
        index = torch.arange(n, device=anchor.device)
        d_ap = distances[index, index + n]
        d_an = distances[index, index + 2 * n]
        hard = (d_an < d_ap).sum()
        semihard = ((d_ap <= d_an) & (d_an < d_ap + margin)).sum()
        num = torch.full((), float(n), dtype=torch.float64, device=anchor.device)
        pairs = 3 * n * (3 * n - 1)
        return TripletStatistics.of(
            num_valid_triplets=num,
            num_valid_anchors=num,
            num_easy=num - hard - semihard,
            num_semihard=semihard,
            num_hard=hard,
            num_loss_terms=num,
            num_positive_loss=(d_ap - d_an + margin > 0).sum(),
            sum_hardest_positive=d_ap.sum(),
            sum_hardest_negative=d_an.sum(),
            num_pairs=torch.full_like(num, float(pairs)),
            sum_pairwise_distance=distances.sum() - distances.diagonal().sum(),
            # Only the a–n and p–n pairs are known to be of different classes, not all of
            # them: unknown, as for unlabelled rows.
            num_between_class_pairs=torch.full_like(num, torch.nan),
            sum_between_class_distance=torch.full_like(num, torch.nan),
        )


def unlabelled_statistics(embeddings: Tensor, distance: Distance) -> TripletStatistics:
    """The spread of an (N, D) batch whose labels are unknown: ``num_pairs`` = N(N − 1) and
    the sum of d(i, j) over ordered pairs i ≠ j under ``distance``; every label-based field
    (triplet and anchor counts, difficulty, hardest pairs) NaN.

    For losses that compare the rows of several model calls with each other (in-batch
    negatives: MultipleNegativesRankingLoss, NTXent over two views), so that the spread of
    what the loss compares is known even where no triplet is.
    """
    with torch.no_grad():
        z = embeddings.detach()
        n = z.shape[0]
        d = pairwise_distances(z, distance).to(torch.float64)
        nan = torch.full((), torch.nan, dtype=torch.float64, device=z.device)
        return TripletStatistics.of(
            num_valid_triplets=nan,
            num_valid_anchors=nan,
            num_easy=nan,
            num_semihard=nan,
            num_hard=nan,
            num_loss_terms=nan,
            num_positive_loss=nan,
            sum_hardest_positive=nan,
            sum_hardest_negative=nan,
            num_pairs=torch.full((), float(n * (n - 1)), dtype=torch.float64, device=z.device),
            sum_pairwise_distance=d.sum() - d.diagonal().sum(),
            num_between_class_pairs=nan,
            sum_between_class_distance=nan,
        )


def probe_statistics(embeddings: Tensor, labels: Tensor | None, distance: Distance) -> Tensor:
    """The held-out probe's columns (``columns.PROBE_COLUMNS``, in that order) from its
    (N, D) embeddings and optional (N,) labels, as a (4,) float64 tensor on their device
    (no host sync):

    * mean pairwise distance: Σ_{i≠j} d(i, j) / (N(N − 1)) under ``distance``;
    * embedding variance: (1/D) Σ_d Var_i(z_id), unbiased; 0 if N < 2;
    * std of L2-normalised: (1/D) Σ_d Std_i(z_id / ‖z_i‖), unbiased;
    * kNN accuracy: leave-one-out 1-nearest-neighbour accuracy under ``distance`` (ties to
      the lowest index), NaN without labels.

    The spread is NaN for N < 2, as is the accuracy.
    """
    with torch.no_grad():
        z = embeddings.detach().to(torch.float64)
        n = z.shape[0]
        nan = torch.full((), torch.nan, dtype=torch.float64, device=z.device)
        if n < 2:
            zero = torch.zeros((), dtype=torch.float64, device=z.device)
            return torch.stack([nan, zero, zero, nan])
        d = pairwise_distances(z, distance).to(torch.float64)
        spread = (d.sum() - d.diagonal().sum()) / (n * (n - 1))
        variance = z.var(dim=0).mean()
        unit = torch.nn.functional.normalize(z, dim=1)
        direction = unit.var(dim=0).clamp_min(0).sqrt().mean()
        accuracy = nan
        if labels is not None:
            d.fill_diagonal_(torch.inf)
            nearest = d.argmin(dim=1)
            accuracy = (labels[nearest] == labels).to(torch.float64).mean()
        return torch.stack([spread, variance, direction, accuracy])


def effective_rank(gram: np.ndarray) -> float:
    """RankMe of the embeddings whose Gram matrix is ``gram`` (D, D), in float64: ZᵀZ for
    the uncentred figure, ZᵀZ − N μμᵀ (the centred rows' Gram) for the recorded one."""
    eigenvalues = np.linalg.eigvalsh(np.asarray(gram, dtype=np.float64))
    singular = np.sqrt(np.clip(eigenvalues, 0.0, None))
    p = singular / max(singular.sum(), np.finfo(np.float64).tiny) + RANKME_EPSILON
    return float(np.exp(-(p * np.log(p)).sum()))


def _geometry(
    rank_sums: np.ndarray, dim: int, square_sum: float, total_sum: np.ndarray, rows: float
) -> dict[str, float]:
    """The rank-step columns from one rank-step vector and its step's Σ‖z‖², Σz (D,), N.

    tr Σ_W / tr Σ_T = (Σ‖z‖² − Σ_c ‖S_c‖²/n_c) / (Σ‖z‖² − ‖S‖²/N) (the 1/N cancels). NaN
    rather than 0 where a value is undefined, because 0 is what a perfectly tight (or
    collapsed) batch scores: the ratio when tr Σ_T = 0 (N < 2, or every row equal), the
    alignment without a positive pair, the uniformity without a pair, everything
    label-based without labels. One class gives ratio 1; all-distinct labels give 0.
    """
    rank_sums = np.asarray(rank_sums, dtype=np.float64)
    uniform, pairs, aligned, positives = rank_sums[dim * dim : dim * dim + _PAIR_SUMS]
    table = rank_sums[dim * dim + _PAIR_SUMS :].reshape(-1, 1 + dim)
    counts, class_sums = table[:, 0], table[:, 1:]
    labelled = not np.isnan(counts).any()
    present = counts > 0
    total = square_sum - (total_sum @ total_sum) / rows if rows > 0 else 0.0
    ratio = math.nan
    if labelled and total > _ROUNDING * square_sum:
        between = ((class_sums[present] ** 2).sum(axis=1) / counts[present]).sum()
        # Rounding can push Σ_W a hair outside [0, Σ_T]; mathematically it is inside.
        ratio = float(np.clip(square_sum - between, 0.0, total) / total)
    return {
        # Centred: embeddings that all point roughly one way would read ~1 uncentred,
        # whatever their spread around that direction. ZᵀZ − SSᵀ/N from the sums, so it
        # stays exact across DDP ranks.
        "effective_rank": effective_rank(
            rank_sums[: dim * dim].reshape(dim, dim)
            - (np.outer(total_sum, total_sum) / rows if rows > 0 else 0.0)
        ),
        "num_classes": float(present.sum()) if labelled else math.nan,
        "within_class_variance_ratio": ratio,
        "alignment": aligned / positives if positives > 0 else math.nan,
        "uniformity": math.log(uniform / pairs) if pairs > 0 else math.nan,
    }


def derive_metrics(
    steps: np.ndarray,
    times: np.ndarray,
    vectors: np.ndarray,
    *,
    dim: int,
    margin: float | None,
    plateau: float | np.ndarray | None = None,
    world_size: int = 1,
    rank_sums: dict[int, np.ndarray] | None = None,
    probes: dict[int, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Recorded columns from S step vectors (S, step_vector_size(dim)), summed over ranks.

    ``rank_sums`` maps a row index to its rank-step vector (:func:`rank_step_sums`, summed
    over ranks), for the steps that measured the geometry; the other rows get NaN in those
    columns. ``probes`` maps a row index to its probe's :func:`probe_statistics` (rank 0's:
    every rank sees the same probe); NaN in the other rows. ``plateau`` (the loss at zero
    distances: a number, or one per row for in-batch-negatives losses) defaults to the
    margin.
    Without a margin the columns that depend on it (``MARGIN_RELATIVE``) are NaN. Returns
    one (S,) array per name in ``METRIC_COLUMNS``.
    """
    plateau = margin if plateau is None else plateau
    plateau_or_nan = np.nan if plateau is None else plateau
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(steps), -1)
    loss = vectors[:, 0] / world_size
    # Summed over ranks, the count too: the mean over ranks of each rank's change.
    change_sum, change_count = vectors[:, -2], vectors[:, -1]
    triplet = ratios_of(torch.from_numpy(vectors[:, _TRIPLET])).numpy()
    e = vectors[:, _EMBEDDING:]
    rows, finite_rows, nonfinite, norm_sum, square_sum = e[:, :_SCALARS].T
    sums = e[:, _SCALARS : _SCALARS + dim]
    unit_sums = e[:, _SCALARS + dim : _SCALARS + 2 * dim]
    unit_square_sums = e[:, _SCALARS + 2 * dim : _SCALARS + 3 * dim]
    n = finite_rows[:, None]
    spread = n > 1
    with np.errstate(divide="ignore", invalid="ignore"):
        # Unbiased per-dimension variances from sums; 0 when fewer than two rows.
        variance = np.where(
            spread[:, 0],
            (square_sum - (sums**2 / n).sum(axis=1)) / (dim * (finite_rows - 1)),
            0.0,
        )
        unit_variance = np.where(spread, (unit_square_sums - unit_sums**2 / n) / (n - 1), 0.0)
        norm_mean = np.where(finite_rows > 0, norm_sum / finite_rows, 0.0)
        step_change = np.where(change_count > 0, change_sum / change_count, np.nan)
    geometry = {name: np.full(len(steps), np.nan) for name in RANK_STEP_COLUMNS}
    for row, payload in (rank_sums or {}).items():
        values = _geometry(payload, dim, square_sum[row], sums[row], finite_rows[row])
        for name, value in values.items():
            geometry[name][row] = value
    probe = {name: np.full(len(steps), np.nan) for name in PROBE_COLUMNS}
    for row, measured in (probes or {}).items():
        for name, value in zip(PROBE_COLUMNS, np.asarray(measured, np.float64), strict=True):
            probe[name][row] = value
    columns = {
        **probe,
        "step": np.asarray(steps, dtype=np.int64),
        "time": np.asarray(times, dtype=np.float64),
        "loss": loss,
        "margin": np.full(len(steps), np.nan if margin is None else margin),
        "loss_margin_ratio": loss / plateau_or_nan,
        "embedding_variance": np.maximum(variance, 0.0),
        "embedding_norm_mean": norm_mean,
        "std_of_l2_normalized": np.sqrt(np.maximum(unit_variance, 0.0)).mean(axis=1),
        **geometry,
        "nonfinite_count": nonfinite.astype(np.int64),
        "nonfinite_loss_count": vectors[:, -3].astype(np.int64),
        "loss_margin_ratio_step_change": step_change / plateau_or_nan,
        "embedding_dim": np.full(len(steps), dim, dtype=np.int64),
        "batch_size": rows.astype(np.int64),
        "num_valid_triplets": vectors[:, _TRIPLET][:, STATISTIC_FIELDS.index("num_valid_triplets")],
    }
    for index, name in enumerate(STATISTIC_RATIOS):
        if name in METRIC_COLUMNS:
            unknown = margin is None and name in MARGIN_RELATIVE
            columns[name] = np.full(len(steps), np.nan) if unknown else triplet[:, index]
    # A batch of one class has no spread between classes: unknown, not 0 (a spread of 0
    # would read as contracted).
    between_pairs = vectors[:, _TRIPLET][:, STATISTIC_FIELDS.index("num_between_class_pairs")]
    columns["mean_between_class_distance"][between_pairs == 0] = np.nan
    return {name: columns[name] for name in METRIC_COLUMNS}
