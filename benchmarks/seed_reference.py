"""The seed's reference triplet losses, kept only as the baseline for the loss benchmark.

Taken from the triplet-loss tutorial the project started from (seed 002), unchanged except
for type hints and docstrings: batch-all enumerates every valid triplet through an N×N×N
boolean mask and ``torch.nonzero``, so it needs O(N³) memory and time. Nothing in
``collapsewatch`` imports this module.

Semantics differ from ``collapsewatch.losses`` in one place: batch-hard averages over *all*
anchors, and an anchor with no positive enters with hardest-positive distance 0 (ours leaves
such anchors out). On P×K batches, where every anchor has a positive, the two agree.
"""

from __future__ import annotations

import torch
from torch import Tensor


def get_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) labels → (positive, negative) (N, N) bool masks."""
    positive = labels.unsqueeze(0) == labels.unsqueeze(1)
    positive.fill_diagonal_(False)
    negative = labels.unsqueeze(0) != labels.unsqueeze(1)
    return positive, negative


def get_triplets(labels: Tensor) -> tuple[Tensor, ...]:
    """(anchor, positive, negative) int64 indices of every valid triplet, via an N³ mask."""
    i_equal_j, i_not_equal_k = get_pairs(labels)
    triplets = i_equal_j.unsqueeze(2) & i_not_equal_k.unsqueeze(1)
    assert torch.any(triplets), "No valid triplets found"
    return torch.nonzero(triplets, as_tuple=True)


def triplet_loss_batch_all(embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Mean of d(a,p) − d(a,n) + margin over the valid triplets where it is > 0."""
    anchor, positive, negative = get_triplets(labels)
    pairwise_dist = torch.cdist(embeddings, embeddings, p=2)
    positive_dist = pairwise_dist[anchor, positive]
    negative_dist = pairwise_dist[anchor, negative]
    loss = positive_dist - negative_dist + margin
    loss = loss[loss > 0]
    return loss.mean()


def triplet_loss_batch_hard(embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Mean over all anchors of relu(max_p d(a,p) − min_n d(a,n) + margin)."""
    positive, negative = get_pairs(labels)
    pairwise_dist = torch.cdist(embeddings, embeddings, p=2)
    anchor_positive_dist = pairwise_dist.where(positive, 0)
    hardest_positive_dist = anchor_positive_dist.amax(dim=1)
    anchor_negative_dist = pairwise_dist.where(negative, torch.inf)
    hardest_negative_dist = anchor_negative_dist.amin(dim=1)
    loss = torch.relu(hardest_positive_dist - hardest_negative_dist + margin)
    return loss.mean()
