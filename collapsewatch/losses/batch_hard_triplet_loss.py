"""Batch-hard triplet loss (Hermans et al. 2017), optionally scaled (Quaterion)."""

from __future__ import annotations

from collapsewatch.losses.base import TripletLoss


class BatchHardTripletLoss(TripletLoss):
    """Mean over valid anchors a of relu(max_p d(a,p) − min_n d(a,n) + margin).

    With ``scaled=True`` the difference is divided by S, the mean over valid anchors of
    min_n d(a,n): a collapsed encoder (all distances → 0) no longer sits at loss = margin.
    Anchors without a positive or a negative in the batch are left out of the mean.

    Shapes: embeddings (N, D) float, labels (N,) integer → scalar.
    Example::

        loss_fn = BatchHardTripletLoss(margin=0.2)
        loss = loss_fn(model(x), y)
        loss_fn.last_stats.frac_hard  # device tensor, no sync
    """

    mining = "batch_hard"
