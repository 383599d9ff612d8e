"""Triplet losses: a functional core (``functional``) and modules on top."""

from collapsewatch.losses import functional
from collapsewatch.losses.base import ReportsStatistics, TripletLoss
from collapsewatch.losses.batch_all_triplet_loss import BatchAllTripletLoss
from collapsewatch.losses.batch_hard_triplet_loss import BatchHardTripletLoss
from collapsewatch.losses.distances import DISTANCES, Distance, pairwise_distances
from collapsewatch.losses.functional import TripletStatistics

__all__ = [
    "DISTANCES",
    "BatchAllTripletLoss",
    "BatchHardTripletLoss",
    "Distance",
    "ReportsStatistics",
    "TripletLoss",
    "TripletStatistics",
    "functional",
    "pairwise_distances",
]
