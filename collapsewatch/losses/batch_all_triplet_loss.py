"""Batch-all triplet loss over every valid triplet, in O(N² log N), optionally scaled."""

from __future__ import annotations

from collapsewatch.losses.base import TripletLoss


class BatchAllTripletLoss(TripletLoss):
    """Mean of t = d(a,p) − d(a,n) + margin over the valid triplets with t > 0 (0 if none).

    With ``scaled=True``, t = (d(a,p) − d(a,n)) / S + margin, S the mean over valid anchors of
    min_n d(a,n). Exact, without building the N×N×N triplet tensor.

    Shapes: embeddings (N, D) float, labels (N,) integer → scalar.
    """

    mining = "batch_all"
