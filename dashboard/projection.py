"""Embedding snapshots projected to 2-D: a shared PCA basis per run (default) or t-SNE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Snapshot points sent to the browser; more than this is a blur anyway.
MAX_EMBEDDING_POINTS = 2000
# t-SNE is O(n log n) per iteration and runs on request; this keeps it to seconds.
MAX_TSNE_POINTS = 1000
# Snapshots (and points per snapshot) used to fit the shared PCA basis of a run.
PCA_FIT_SNAPSHOTS = 20
PCA_FIT_POINTS = 500


@dataclass(frozen=True)
class Projection:
    """2-D coordinates of (a sample of) one snapshot, ready to plot."""

    step: int
    method: str
    xy: np.ndarray  # (m, 2)
    labels: np.ndarray | None  # (m,)
    n_points: int  # points in the snapshot (m ≤ n_points are shown)
    radius: float  # RMS distance to the centroid, in the original embedding space
    reference_radius: float  # the same for the run's first snapshot
    axis_titles: tuple[str, str]
    extent: tuple[tuple[float, float], tuple[float, float]] | None  # fixed axes, or None


@dataclass(frozen=True)
class Basis:
    mean: np.ndarray
    components: np.ndarray  # (2, D)
    explained: tuple[float, float]
    extent: tuple[tuple[float, float], tuple[float, float]]


def fit_steps(steps: Sequence[int]) -> tuple[int, ...]:
    if len(steps) <= PCA_FIT_SNAPSHOTS:
        return tuple(steps)
    picks = np.linspace(0, len(steps) - 1, PCA_FIT_SNAPSHOTS).round().astype(int)
    return tuple(steps[i] for i in np.unique(picks))


def _sample(n: int, limit: int) -> np.ndarray:
    if n <= limit:
        return np.arange(n)
    # Fixed seed: the same points are shown at every step of a run, and on every reload.
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def _radius(embeddings: np.ndarray) -> float:
    x = np.asarray(embeddings, dtype=np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    if not len(x):
        return float("nan")
    return float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean()))


def _clean(embeddings: np.ndarray) -> np.ndarray:
    # A diverged run stores NaN/inf embeddings; plot them at 0 rather than failing.
    return np.nan_to_num(np.asarray(embeddings, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _centred(embeddings: np.ndarray) -> np.ndarray:
    x = _clean(embeddings)
    return x - x.mean(axis=0) if len(x) else x


def fit_basis(snapshots: Sequence[Any]) -> Basis:
    from sklearn.decomposition import PCA

    # Each snapshot is centred on its own mean: a drift of the whole cloud is not collapse,
    # and left in it would take the first component and squash the clusters.
    samples = [
        _centred(s.embeddings)[_sample(len(s.embeddings), PCA_FIT_POINTS)] for s in snapshots
    ]
    stacked = np.concatenate(samples)
    dims = stacked.shape[1]
    components = np.zeros((2, dims))
    explained = [0.0, 0.0]
    mean = stacked.mean(axis=0)
    usable = min(2, dims, len(stacked))
    if usable and np.ptp(stacked, axis=0).max() > 0:
        pca = PCA(n_components=usable, random_state=0).fit(stacked)
        mean = pca.mean_
        for i in range(usable):
            # Deterministic sign (largest loading positive): refits do not flip the picture.
            c = pca.components_[i]
            components[i] = c if c[np.argmax(np.abs(c))] >= 0 else -c
            explained[i] = float(pca.explained_variance_ratio_[i])
    xy = (stacked - mean) @ components.T
    return Basis(mean, components, (explained[0], explained[1]), _extent(xy))


def _extent(xy: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    half = max(float((hi - lo).max()) / 2 * 1.08, 1e-6)  # square, with a margin
    cx, cy = (lo + hi) / 2
    return ((cx - half, cx + half), (cy - half, cy + half))


def project_pca(snapshot: Any, basis: Basis, first: Any) -> Projection:
    pick = _sample(len(snapshot.embeddings), MAX_EMBEDDING_POINTS)
    xy = (_centred(snapshot.embeddings)[pick] - basis.mean) @ basis.components.T
    (x0, x1), (y0, y1) = basis.extent
    # A snapshot outside the fitted extent (the basis predates it) still fits on screen.
    if len(xy):
        x0, y0 = min(x0, xy[:, 0].min()), min(y0, xy[:, 1].min())
        x1, y1 = max(x1, xy[:, 0].max()), max(y1, xy[:, 1].max())
    ex1, ex2 = basis.explained
    return _projection(
        snapshot,
        first,
        "pca",
        xy,
        pick,
        (f"PC 1 ({ex1:.0%} of variance)", f"PC 2 ({ex2:.0%} of variance)"),
        ((float(x0), float(x1)), (float(y0), float(y1))),
    )


def project_tsne(snapshot: Any, first: Any) -> Projection:
    from sklearn.manifold import TSNE

    pick = _sample(len(snapshot.embeddings), MAX_TSNE_POINTS)
    x = _clean(snapshot.embeddings)[pick]
    if len(x) >= 4 and np.ptp(x, axis=0).max() > 0:
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        xy = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=0, max_iter=500
        ).fit_transform(x)
    else:  # too few or identical points: t-SNE is undefined, every point is one spot
        xy = np.zeros((len(x), 2))
    return _projection(snapshot, first, "tsne", xy, pick, ("t-SNE 1", "t-SNE 2"), None)


def _projection(
    snapshot: Any,
    first: Any,
    method: str,
    xy: np.ndarray,
    pick: np.ndarray,
    axis_titles: tuple[str, str],
    extent: tuple[tuple[float, float], tuple[float, float]] | None,
) -> Projection:
    """The projected points of ``pick``, with the snapshot's real size against the first's."""
    return Projection(
        step=snapshot.step,
        method=method,
        xy=xy,
        labels=None if snapshot.labels is None else snapshot.labels[pick],
        n_points=len(snapshot.embeddings),
        radius=_radius(snapshot.embeddings),
        reference_radius=_radius(first.embeddings),
        axis_titles=axis_titles,
        extent=extent,
    )
