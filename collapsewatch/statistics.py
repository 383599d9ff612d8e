"""Per-step collapse statistics: sufficient statistics on the device, metrics on the host.

A recorded step is reduced on the embeddings' device to one float64 vector of *sums*
(:func:`step_sums`): the loss, the triplet loss's sufficient statistics and the embedding
sums below. Sums add up exactly across ranks, so under DDP one ``all_reduce(SUM)`` of this
vector describes the global batch, where averaging per-rank variances or ranks would not.
The vectors are copied to the host in batches and turned into the recorded columns by
:func:`derive_metrics` (numpy, in the background writer thread).

Columns (float64; ``step``, ``nonfinite_count``, ``embedding_dim`` and ``batch_size`` int64):

=====================  ==========================================================
loss                   the loss value (under DDP: the mean over ranks)
margin                 the loss's margin m
loss_margin_ratio      loss / m; ≈ 1 on the batch-hard collapse plateau
embedding_variance     (1/D) Σ_d Var_i(z_id), unbiased (N − 1); 0 if N < 2
mean_pairwise_distance mean over ordered pairs i ≠ j of d(z_i, z_j), as the loss sees it
frac_easy/…semihard/…hard  share of valid triplets that are easy / semi-hard / hard
frac_positive_loss     share of the loss's terms that are > 0
hardest_positive_mean  mean over valid anchors of max_p d(a, p)
hardest_negative_mean  mean over valid anchors of min_n d(a, n)
embedding_norm_mean    (1/N) Σ_i ‖z_i‖
std_of_l2_normalized   (1/D) Σ_d Std_i(z_id / ‖z_i‖), unbiased; ≈ 1/√D healthy, 0 collapsed
effective_rank         RankMe: exp(−Σ_k p_k log p_k), p_k = σ_k / Σσ + 1e-7, σ = √eig(ZᵀZ)
nonfinite_count        NaN/inf entries among the step's embeddings
embedding_dim          D
batch_size             N, rows of the step's embeddings (finite and not)
num_valid_triplets     valid (a, p, n) triplets the statistics were computed over
=====================  ==========================================================

Embedding statistics use only the rows that are entirely finite; ``nonfinite_count`` says
how many entries were not.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from collapsewatch.losses.distances import Distance, pairwise_distances
from collapsewatch.losses.functional import (
    STATISTIC_FIELDS,
    STATISTIC_RATIOS,
    TripletStatistics,
    ratios_of,
)

METRIC_COLUMNS: tuple[str, ...] = (
    "step",
    "time",
    "loss",
    "margin",
    "loss_margin_ratio",
    "embedding_variance",
    "mean_pairwise_distance",
    "frac_easy",
    "frac_semihard",
    "frac_hard",
    "frac_positive_loss",
    "hardest_positive_mean",
    "hardest_negative_mean",
    "embedding_norm_mean",
    "std_of_l2_normalized",
    "effective_rank",
    "nonfinite_count",
    "embedding_dim",
    "batch_size",
    "num_valid_triplets",
)

RANKME_EPSILON = 1e-7

# Layout of a step vector: [loss, triplet sums…, embedding sums…], the embedding sums being
# [rows, finite rows, non-finite entries, Σ‖z‖, Σ z², Σ_i z_i (D), Σ_i ẑ_i (D), Σ_i ẑ_i² (D)].
_TRIPLET = slice(1, 1 + len(STATISTIC_FIELDS))
_EMBEDDING = 1 + len(STATISTIC_FIELDS)
_SCALARS = 5


def step_vector_size(dim: int) -> int:
    """Length of a step vector for embeddings of dimension ``dim`` (without the Gram)."""
    return _EMBEDDING + _SCALARS + 3 * dim


def embedding_sums(embeddings: Tensor) -> Tensor:
    """(N, D) embeddings → (5 + 3D,) float64 sums, on the same device, no host sync.

    Order: N, N_finite, non-finite entry count, Σ‖z_i‖, Σ_{i,d} z_id², Σ_i z_i, Σ_i ẑ_i,
    Σ_i ẑ_i², where ẑ = z/‖z‖ and only entirely finite rows count in the sums.
    """
    z = embeddings.detach().to(torch.float64)
    finite = torch.isfinite(z)
    finite_rows = finite.all(dim=1, keepdim=True)
    z = torch.where(finite_rows, z, 0.0)
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    unit = z / norms.clamp_min(torch.finfo(torch.float64).tiny)
    scalars = torch.stack(
        [
            torch.full((), z.shape[0], dtype=torch.float64, device=z.device),
            finite_rows.sum().to(torch.float64),
            (~finite).sum().to(torch.float64),
            norms.sum(),
            (z * z).sum(),
        ]
    )
    return torch.cat([scalars, z.sum(dim=0), unit.sum(dim=0), (unit * unit).sum(dim=0)])


def gram_matrix(embeddings: Tensor) -> Tensor:
    """ZᵀZ over the finite rows, in float64, flattened to (D·D,)."""
    z = embeddings.detach().to(torch.float64)
    z = torch.where(torch.isfinite(z).all(dim=1, keepdim=True), z, 0.0)
    return (z.T @ z).flatten()


def step_sums(loss: Tensor, triplet: TripletStatistics | None, embedding_sums: Tensor) -> Tensor:
    """The step vector: [loss, triplet sums (NaN if unknown), ``embedding_sums(z)``]."""
    device = embedding_sums.device
    loss = loss.detach().to(device=device, dtype=torch.float64).reshape(-1).mean()
    if triplet is None:
        # Made on the device: a host-to-device copy of pageable memory would synchronise.
        triplet_values = torch.full(
            (len(STATISTIC_FIELDS),), torch.nan, dtype=torch.float64, device=device
        )
    else:
        triplet_values = triplet.values.to(device=device, dtype=torch.float64)
    return torch.cat([loss.reshape(1), triplet_values, embedding_sums])


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
        values = torch.stack(
            [
                num,
                num,
                num - hard - semihard,
                semihard.to(torch.float64),
                hard.to(torch.float64),
                num,
                (d_ap - d_an + margin > 0).sum().to(torch.float64),
                d_ap.sum().to(torch.float64),
                d_an.sum().to(torch.float64),
                torch.full_like(num, float(pairs)),
                (distances.sum() - distances.diagonal().sum()).to(torch.float64),
            ]
        )
    return TripletStatistics(values)


def effective_rank(gram: np.ndarray) -> float:
    """RankMe of the embeddings whose Gram matrix ZᵀZ is ``gram`` (D, D), in float64."""
    eigenvalues = np.linalg.eigvalsh(np.asarray(gram, dtype=np.float64))
    singular = np.sqrt(np.clip(eigenvalues, 0.0, None))
    p = singular / max(singular.sum(), np.finfo(np.float64).tiny) + RANKME_EPSILON
    return float(np.exp(-(p * np.log(p)).sum()))


def derive_metrics(
    steps: np.ndarray,
    times: np.ndarray,
    vectors: np.ndarray,
    *,
    dim: int,
    margin: float,
    world_size: int = 1,
    grams: dict[int, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Recorded columns from S step vectors (S, step_vector_size(dim)), summed over ranks.

    ``grams`` maps a row index to its (D·D,) Gram sum, for the steps that measured the rank;
    the other rows get NaN. Returns one (S,) array per name in ``METRIC_COLUMNS``.
    """
    vectors = np.asarray(vectors, dtype=np.float64).reshape(len(steps), -1)
    loss = vectors[:, 0] / world_size
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
    ranks = np.full(len(steps), np.nan)
    for row, gram in (grams or {}).items():
        ranks[row] = effective_rank(np.asarray(gram).reshape(dim, dim))
    columns = {
        "step": np.asarray(steps, dtype=np.int64),
        "time": np.asarray(times, dtype=np.float64),
        "loss": loss,
        "margin": np.full(len(steps), margin),
        "loss_margin_ratio": loss / margin,
        "embedding_variance": np.maximum(variance, 0.0),
        "embedding_norm_mean": norm_mean,
        "std_of_l2_normalized": np.sqrt(np.maximum(unit_variance, 0.0)).mean(axis=1),
        "effective_rank": ranks,
        "nonfinite_count": nonfinite.astype(np.int64),
        "embedding_dim": np.full(len(steps), dim, dtype=np.int64),
        "batch_size": rows.astype(np.int64),
        "num_valid_triplets": vectors[:, _TRIPLET][:, STATISTIC_FIELDS.index("num_valid_triplets")],
    }
    for index, name in enumerate(STATISTIC_RATIOS):
        if name in METRIC_COLUMNS:
            columns[name] = triplet[:, index]
    return {name: columns[name] for name in METRIC_COLUMNS}


def healthy_std_of_l2_normalized(dim: int) -> float:
    """1/√D: the value of ``std_of_l2_normalized`` for isotropic embeddings."""
    return 1.0 / math.sqrt(dim)
