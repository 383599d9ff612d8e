"""float32 (and bfloat16) embeddings with |x| ≳ 1e19: squared distances used to overflow to
inf and every bundled loss came out NaN. Now exact against the float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from collapsewatch.losses import pairwise_distances
from tests import reference
from tests.losses.test_triplet_losses import MININGS, fast, loss_and_grad, random_batch

CASES = list(itertools.product(MININGS, [False, True], ["euclidean", "cosine"]))


@pytest.mark.parametrize(("mining", "scaled", "distance"), CASES)
@pytest.mark.parametrize("scale", [1e19, 1e25, 1e30])
def test_float32_losses_and_gradients_at_huge_magnitudes(mining, scaled, distance, scale):
    x, labels = random_batch(21, 20, 8, 4, scale=scale)
    x = x.float().double()  # the reference sees exactly the float32 inputs
    # The scaled variant and cosine are scale-free: their margin is not in embedding units.
    margin = 0.2 * scale if distance == "euclidean" and not scaled else 0.2
    want, want_grad = loss_and_grad(reference.LOSSES[mining], x, labels, margin, scaled, distance)
    got, got_grad = loss_and_grad(fast, x.float(), labels, margin, mining, scaled, distance)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        got_grad.double(), want_grad, rtol=1e-3, atol=1e-5 * float(want_grad.abs().max())
    )


@pytest.mark.parametrize("mining", MININGS)
def test_bfloat16_at_huge_magnitudes(mining):
    x, labels = random_batch(22, 16, 8, 4, scale=1e19)
    x = x.bfloat16()
    got = fast(x, labels, 2e18, mining, False, "euclidean")
    want = reference.LOSSES[mining](x.double(), labels, 2e18, False, "euclidean")
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e19, 1e30])
def test_distances_match_float64_at_every_magnitude(scale):
    x, _ = random_batch(23, 12, 6, 3, scale=scale)
    x = x.float()
    want = torch.cdist(x.double(), x.double())
    got = pairwise_distances(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert torch.equal(got.diagonal(), torch.zeros(12))


def test_scaling_by_a_power_of_two_changes_no_ordinary_distance_bit():
    # Dividing by 2^e is exact: distances of everyday embeddings are bit for bit those of
    # the unscaled formula (ties and exact zeros included).
    x, _ = random_batch(24, 16, 8, 4)
    x = x.float()
    shifted = x - x[:1]
    gram = shifted @ shifted.T
    norms = gram.diagonal()
    unscaled = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0).sqrt()
    assert torch.equal(pairwise_distances(x), unscaled)
