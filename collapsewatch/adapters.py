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

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from collapsewatch.losses.base import TripletLoss
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

    def all_embeddings(self) -> Tensor:
        """Every embedding the loss saw: (N, D), or the 3N rows of explicit triplets."""
        if self.embeddings is not None:
            return self.embeddings
        return torch.cat([self.anchor, self.positive, self.negative])  # type: ignore[list-item]


def _is_embedding(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point() and t.dim() == 2


def _is_labels(t: Any, n: int) -> bool:
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


def find_margin(loss_fn: torch.nn.Module, margin: float | None) -> float:
    """The margin to monitor: ``margin`` if given, else the loss's ``margin`` attribute."""
    if margin is None:
        found = getattr(loss_fn, "margin", None)
        if isinstance(found, Tensor) and found.numel() == 1:
            found = float(found.detach().cpu())
        if not isinstance(found, numbers.Real) or isinstance(found, bool):
            raise ValueError(
                f"cannot find the margin of {type(loss_fn).__name__}: it has no numeric "
                "`margin` attribute. Pass it explicitly: watch(model, loss_fn, margin=0.2)"
            )
        margin = float(found)
    if not (0 < margin < float("inf")):
        raise ValueError(f"margin must be finite and > 0, got {margin!r}")
    return float(margin)


@dataclass(frozen=True)
class DistanceSpec:
    """The distance a loss measures with, and whether it L2-normalises embeddings first."""

    distance: Distance
    normalize: bool = False


def find_distance(loss_fn: torch.nn.Module, distance: Distance | None) -> DistanceSpec:
    """The distance under which watch() computes a foreign loss's statistics.

    An explicit ``distance`` wins. Otherwise: the bundled losses say theirs;
    pytorch-metric-learning losses carry a ``distance`` object (``LpDistance`` with p=2,
    power 1 or 2, optionally normalising; ``CosineSimilarity``); ``TripletMarginLoss`` and
    anything else default to Euclidean.
    """
    if distance is not None:
        return DistanceSpec(check_distance(distance))
    if isinstance(loss_fn, TripletLoss):
        return DistanceSpec(loss_fn.distance)
    pml_distance = getattr(loss_fn, "distance", None)
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
