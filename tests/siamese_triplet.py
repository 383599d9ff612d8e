"""The online-triplet code of the siamese-triplet repository (adambielski/siamese-triplet,
BSD-3-Clause: ``utils.py`` and ``losses.py``), as people copy it into their projects; it is
not on the package index. Kept as written there, apart from formatting: squared Euclidean
distances, a per-pair hardest-negative selector running in NumPy on the host, and a loss
that returns ``(loss, n_triplets)``.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def pdist(vectors):
    return (
        -2 * vectors.mm(torch.t(vectors))
        + vectors.pow(2).sum(dim=1).view(1, -1)
        + vectors.pow(2).sum(dim=1).view(-1, 1)
    )


def hardest_negative(loss_values):
    hard_negative = np.argmax(loss_values)
    return hard_negative if loss_values[hard_negative] > 0 else None


class FunctionNegativeTripletSelector:
    """For each (anchor, positive) pair, the negative that ``negative_selection_fn`` picks
    among those with a positive loss."""

    def __init__(self, margin, negative_selection_fn, cpu=True):
        self.cpu = cpu
        self.margin = margin
        self.negative_selection_fn = negative_selection_fn

    def get_triplets(self, embeddings, labels):
        if self.cpu:
            embeddings = embeddings.cpu()
        distance_matrix = pdist(embeddings)
        distance_matrix = distance_matrix.cpu()
        labels = labels.cpu().data.numpy()
        triplets = []
        for label in set(labels):
            label_mask = labels == label
            label_indices = np.where(label_mask)[0]
            if len(label_indices) < 2:
                continue
            negative_indices = np.where(np.logical_not(label_mask))[0]
            anchor_positives = np.array(list(combinations(label_indices, 2)))
            ap_distances = distance_matrix[anchor_positives[:, 0], anchor_positives[:, 1]]
            for anchor_positive, ap_distance in zip(anchor_positives, ap_distances, strict=True):
                loss_values = (
                    ap_distance
                    - distance_matrix[
                        torch.LongTensor(np.array([anchor_positive[0]])),
                        torch.LongTensor(negative_indices),
                    ]
                    + self.margin
                )
                loss_values = loss_values.data.cpu().numpy()
                hard_negative = self.negative_selection_fn(loss_values)
                if hard_negative is not None:
                    hard_negative = negative_indices[hard_negative]
                    triplets.append([anchor_positive[0], anchor_positive[1], hard_negative])
        if len(triplets) == 0:
            triplets.append([anchor_positive[0], anchor_positive[1], negative_indices[0]])
        return torch.LongTensor(np.array(triplets))


def HardestNegativeTripletSelector(margin, cpu=False):  # noqa: N802 (the repository's name)
    return FunctionNegativeTripletSelector(margin, hardest_negative, cpu=cpu)


class OnlineTripletLoss(nn.Module):
    """Triplets from ``triplet_selector``; returns (mean hinge loss, number of triplets)."""

    def __init__(self, margin, triplet_selector):
        super().__init__()
        self.margin = margin
        self.triplet_selector = triplet_selector

    def forward(self, embeddings, target):
        triplets = self.triplet_selector.get_triplets(embeddings, target)
        if embeddings.is_cuda:
            triplets = triplets.cuda()
        ap_distances = (embeddings[triplets[:, 0]] - embeddings[triplets[:, 1]]).pow(2).sum(1)
        an_distances = (embeddings[triplets[:, 0]] - embeddings[triplets[:, 2]]).pow(2).sum(1)
        losses = F.relu(ap_distances - an_distances + self.margin)
        return losses.mean(), len(triplets)


def random_hard_negative(loss_values):
    hard_negatives = np.where(loss_values > 0)[0]
    return np.random.choice(hard_negatives) if len(hard_negatives) > 0 else None


def RandomNegativeTripletSelector(margin, cpu=False):  # noqa: N802 (the repository's name)
    return FunctionNegativeTripletSelector(margin, random_hard_negative, cpu=cpu)


class EmbeddingNet(nn.Module):
    """The repository's ``EmbeddingNet`` (PReLU layers down to a 2-d embedding, PyTorch's
    default initialisation), its convolutional body replaced by fully connected layers for
    8×8 digits. It starts with squared distances ~10⁻³ of a margin of 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(64, 256), nn.PReLU(), nn.Linear(256, 256), nn.PReLU(), nn.Linear(256, 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], -1))
