"""Slow, obviously correct float64 references: explicit loops over every triplet.

Nothing here is vectorised on purpose; each quantity is computed exactly as its definition
reads, one pair or triplet at a time, so it can be checked by eye against the docs.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from collapsewatch.losses.functional import SCALE_FLOOR


def distance(x: Tensor, i: int, j: int, kind: str) -> Tensor:
    diff = x[i] - x[j]
    if kind == "euclidean":
        return torch.linalg.vector_norm(diff)  # its gradient at 0 is 0
    if kind == "squared_euclidean":
        return (diff * diff).sum()
    if kind == "cosine":
        ni, nj = torch.linalg.vector_norm(x[i]), torch.linalg.vector_norm(x[j])
        if ni == 0 or nj == 0:
            return x.new_tensor(1.0) + 0 * (x[i].sum() + x[j].sum())
        return (1 - (x[i] * x[j]).sum() / (ni * nj)).clamp(0, 2)
    raise ValueError(kind)


def triplets(labels: list[int]) -> list[tuple[int, int, int]]:
    n = len(labels)
    return [
        (a, p, q)
        for a, p, q in itertools.product(range(n), repeat=3)
        if a != p and labels[a] == labels[p] and labels[q] != labels[a]
    ]


def valid_anchors(labels: list[int]) -> list[int]:
    n = len(labels)
    return [
        a
        for a in range(n)
        if any(labels[p] == labels[a] and p != a for p in range(n))
        and any(labels[q] != labels[a] for q in range(n))
    ]


def hardest(x: Tensor, labels: list[int], a: int, kind: str) -> tuple[Tensor, Tensor]:
    n = len(labels)
    pos = [distance(x, a, p, kind) for p in range(n) if p != a and labels[p] == labels[a]]
    neg = [distance(x, a, q, kind) for q in range(n) if labels[q] != labels[a]]
    return torch.stack(pos).max(), torch.stack(neg).min()


def scale(x: Tensor, labels: list[int], kind: str, scaled: bool) -> Tensor:
    anchors = valid_anchors(labels)
    if not scaled or not anchors:
        return x.new_tensor(1.0)
    return (
        torch.stack([hardest(x, labels, a, kind)[1] for a in anchors]).mean().clamp_min(SCALE_FLOOR)
    )


def batch_hard(x: Tensor, labels: Tensor, margin: float, scaled: bool, kind: str) -> Tensor:
    y = labels.tolist()
    s = scale(x, y, kind, scaled)
    terms = []
    for a in valid_anchors(y):
        hp, hn = hardest(x, y, a, kind)
        terms.append(torch.relu((hp - hn) / s + margin))
    return torch.stack(terms).mean() if terms else 0 * x.sum()


def batch_all(x: Tensor, labels: Tensor, margin: float, scaled: bool, kind: str) -> Tensor:
    y = labels.tolist()
    s = scale(x, y, kind, scaled)
    terms = [
        (distance(x, a, p, kind) - distance(x, a, q, kind)) / s + margin for a, p, q in triplets(y)
    ]
    positive = [t for t in terms if t > 0]
    return torch.stack(positive).mean() if positive else 0 * x.sum()


def statistics(
    x: Tensor, labels: Tensor, margin: float, mining: str, scaled: bool, kind: str
) -> dict[str, float]:
    """Every monitored ratio and count, by its definition in the docs."""
    y = labels.tolist()
    n = len(y)
    with torch.no_grad():
        trips = triplets(y)
        d = {(i, j): distance(x, i, j, kind).item() for i in range(n) for j in range(n)}
        easy = sum(d[a, q] >= d[a, p] + margin for a, p, q in trips)
        hard = sum(d[a, q] < d[a, p] for a, p, q in trips)
        semihard = sum(d[a, p] <= d[a, q] < d[a, p] + margin for a, p, q in trips)
        anchors = valid_anchors(y)
        hp = [hardest(x, y, a, kind)[0].item() for a in anchors]
        hn = [hardest(x, y, a, kind)[1].item() for a in anchors]
        s = scale(x, y, kind, scaled).item()
        if mining == "batch_all":
            terms = [(d[a, p] - d[a, q]) / s + margin for a, p, q in trips]
        else:
            terms = [(p - q) / s + margin for p, q in zip(hp, hn, strict=True)]
        pairs = [d[i, j] for i in range(n) for j in range(n) if i != j]
        between = [d[i, j] for i in range(n) for j in range(n) if y[i] != y[j]]

    def ratio(num: float, den: int) -> float:
        return num / den if den else 0.0

    return {
        "num_valid_triplets": len(trips),
        "num_valid_anchors": len(anchors),
        "num_easy": easy,
        "num_semihard": semihard,
        "num_hard": hard,
        "num_loss_terms": len(terms),
        "num_positive_loss": sum(t > 0 for t in terms),
        "frac_easy": ratio(easy, len(trips)),
        "frac_semihard": ratio(semihard, len(trips)),
        "frac_hard": ratio(hard, len(trips)),
        "frac_positive_loss": ratio(sum(t > 0 for t in terms), len(terms)),
        "hardest_positive_mean": ratio(sum(hp), len(anchors)),
        "hardest_negative_mean": ratio(sum(hn), len(anchors)),
        "mean_pairwise_distance": ratio(sum(pairs), len(pairs)),
        "num_between_class_pairs": len(between),
        "mean_between_class_distance": ratio(sum(between), len(between)),
    }


LOSSES = {"batch_hard": batch_hard, "batch_all": batch_all}
