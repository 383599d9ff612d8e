"""The module shell shared by the bundled triplet losses."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from collapsewatch.losses.distances import Distance, check_distance
from collapsewatch.losses.functional import (
    AnchorSampler,
    Mining,
    TripletStatistics,
    check_margin,
    triplet_loss,
)


@runtime_checkable
class ReportsStatistics(Protocol):
    """A loss that computes its own :class:`TripletStatistics` for ``watch()`` to read.

    ``watch()`` sets ``statistics`` (and ``difficulty``, whether to count easy / semi-hard /
    hard triplets) before each recorded step's call and reads ``last_stats`` after it, so a
    loss that already has its distances and hardest pairs at hand hands them over instead of
    ``watch()`` recomputing them. Between recorded steps ``statistics`` is False and the loss
    should skip the work. The bundled losses implement it; so can any ``nn.Module`` loss
    (e.g. with :func:`collapsewatch.losses.functional.triplet_loss`). ``last_stats`` must be
    None, or the statistics of the latest call: device tensors, nothing read back.
    """

    statistics: bool
    difficulty: bool
    last_stats: TripletStatistics | None


class TripletLoss(torch.nn.Module):
    """Base of the bundled triplet losses: a mining rule applied to a distance matrix.

    Subclasses set ``mining``; the pipeline (check inputs → distances → mining → statistics)
    is :func:`collapsewatch.losses.functional.triplet_loss`.

    Attributes:
        margin: m > 0.
        scaled: divide (d_ap − d_an) by the mean hardest negative distance (Quaterion).
        distance: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
        statistics: compute :class:`TripletStatistics` on every call. Off by default: the
            loss alone costs nothing extra; ``watch()`` switches it on for the steps it
            records.
        check_finite: reject NaN/inf embeddings with a ``ValueError`` naming the rows. Off
            by default: on a GPU it reads one flag back per call, and ``watch()`` already
            counts non-finite entries on the device (``nonfinite_count``).
        difficulty: with ``statistics``, also count easy / semi-hard / hard triplets (else
            NaN); ``watch()`` sets it on the steps its difficulty interval picks.
        last_stats: the statistics of the latest call (device tensors), or None.
    """

    mining: ClassVar[Mining]

    def __init__(
        self,
        margin: float = 0.2,
        scaled: bool = False,
        distance: Distance = "euclidean",
        *,
        statistics: bool = False,
        check_finite: bool = False,
    ) -> None:
        super().__init__()
        self.margin = check_margin(margin)
        self.scaled = bool(scaled)
        self.distance: Distance = check_distance(distance)
        self.statistics = bool(statistics)
        # Set by watch() per recorded step: the easy / semi-hard / hard counts sort every
        # anchor's row, the only statistic that costs more than the loss itself.
        self.difficulty = True
        self.check_finite = bool(check_finite)
        self.last_stats: TripletStatistics | None = None
        # Its own random stream for the anchors of large batches' difficulty counts.
        self.anchor_sampler = AnchorSampler()

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """(N, D) float embeddings, (N,) integer labels → scalar loss."""
        loss, self.last_stats = triplet_loss(
            embeddings,
            labels,
            self.margin,
            mining=self.mining,
            scaled=self.scaled,
            distance=self.distance,
            with_statistics=self.statistics,
            with_difficulty=self.difficulty,
            check_finite=self.check_finite,
            anchor_sampler=self.anchor_sampler,
        )
        return loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, scaled={self.scaled}, distance={self.distance!r}"
