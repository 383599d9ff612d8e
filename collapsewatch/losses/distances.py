"""Pairwise distance matrices for the triplet losses.

All three distances are computed from one Gram matrix, in float32 (float64 stays float64)
with autocast disabled, so half-precision inputs and mixed-precision training get the same
distances as float32 training.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import Tensor

Distance = Literal["euclidean", "squared_euclidean", "cosine"]
DISTANCES: tuple[str, ...] = get_args(Distance)


def check_distance(distance: str) -> Distance:
    """Return ``distance`` if it names a supported distance, else raise ``ValueError``."""
    if distance not in DISTANCES:
        raise ValueError(
            f"distance must be one of {', '.join(map(repr, DISTANCES))}; got {distance!r}"
        )
    return distance  # type: ignore[return-value]  # checked against the Literal's values


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck, references); every other float computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pairwise_distances(embeddings: Tensor, distance: Distance = "euclidean") -> Tensor:
    """Distance between every pair of rows.

    Args:
        embeddings: (N, D) floating-point tensor.
        distance: ``"euclidean"`` ‖x_i − x_j‖, ``"squared_euclidean"`` ‖x_i − x_j‖², or
            ``"cosine"`` 1 − x_i·x_j / (‖x_i‖ ‖x_j‖) (a zero vector is at distance 1 from all).

    Returns:
        (N, N) tensor in float32 (float64 for float64 input), ≥ 0, differentiable.

    ‖x_i − x_j‖² is taken as G_ii + G_jj − 2 G_ij with G = X Xᵀ. Every row is first shifted
    by the first row (distances do not change) so that embeddings collapsed far from the
    origin do not lose their small distances to cancellation; a data row rather than the mean
    keeps the shift exact where the inputs are (ties stay ties). The rows are then divided by
    s, the power of two just above max |x_ij| (exact in floating point, found on the device),
    and the distances multiplied back by s (s² squared): squares of float32 embeddings with
    |x| ≳ 1e19 would overflow to inf, and those of tiny ones underflow. The squared norms are
    read off G's own diagonal so that duplicate rows come out at exactly zero. The square
    root has a zero gradient at zero distance (a valid subgradient) instead of an infinite
    one.
    """
    check_distance(distance)
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = embeddings.to(compute_dtype(embeddings.dtype))
        if distance == "cosine":
            x = x / _power_of_two_above(x)  # the norm squares too; cosine ignores the scale
            unit = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
            return (1.0 - unit @ unit.T).clamp(0.0, 2.0)
        x = x - x[:1].detach()
        scale = _power_of_two_above(x)
        x = x / scale
        gram = x @ x.T
        squared_norms = torch.diagonal(gram)
        squared = (squared_norms[:, None] + squared_norms[None, :]).sub_(gram, alpha=2.0)
        squared = squared.clamp_min_(0.0)
        if distance == "squared_euclidean":
            return squared * scale.square()
        return _ScaledSqrt.apply(squared, scale)


def _power_of_two_above(x: Tensor) -> Tensor:
    """2^e with max |x| < 2^e (1 for an all-zero or empty x), a detached 0-d tensor.

    A power of two so that dividing by it is exact: distances of ordinary embeddings come
    out bit for bit as without it. Computed on x's device (no host synchronisation).
    """
    if x.numel() == 0:
        return x.new_ones(())
    _, exponent = torch.frexp(x.detach().abs().amax())
    return torch.ldexp(x.new_ones(()), exponent)


class _ScaledSqrt(torch.autograd.Function):
    """s·√x for x ≥ 0 and a constant s > 0, whose gradient at x = 0 is 0 (a subgradient of
    ‖·‖) instead of ∞. One function so that the scale costs one in-place multiply each way:
    d/dx s√x = s²/(2·s√x), applied as two multiplies by s because s² overflows float32 for
    s ≥ 2⁶⁴."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, squared: Tensor, scale: Tensor) -> Tensor:
        root = squared.sqrt().mul_(scale)
        ctx.save_for_backward(root, scale)
        return root

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # ctx is torch's backward node (FunctionCtx, as typed, has no saved_tensors).
        root, scale = ctx.saved_tensors
        # grad·(s/2)/root first: grad/root alone underflows for the scaled variant's tiny
        # gradients at |x| ~1e25, and s² would overflow.
        grad = (grad * (0.5 * scale)).div_(root).mul_(scale)
        return torch.where(root > 0, grad, 0.0), None
