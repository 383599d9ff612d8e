"""Every recorded column against a direct computation on a known batch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from collapsewatch.columns import METRIC_COLUMNS, PROBE_COLUMNS, healthy_std_of_l2_normalized
from collapsewatch.losses import functional
from collapsewatch.statistics import (
    derive_metrics,
    effective_rank,
    embedding_sums,
    explicit_triplet_statistics,
    loss_changes,
    nonfinite_counts,
    probe_statistics,
    rank_step_size,
    rank_step_sums,
    step_vectors,
    unlabelled_statistics,
)
from tests import reference


def known_batch(seed: int = 0, n: int = 24, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2 + 0.5
    labels = torch.randint(0, 4, (n,), generator=g)
    return z, labels


def derive(vectors, dim, *, margin=0.3, world_size=1, rank_sums=None, steps=None):
    vectors = torch.stack(vectors).numpy() if isinstance(vectors, list) else vectors
    count = vectors.shape[0]
    steps = np.arange(count) if steps is None else steps
    return derive_metrics(
        steps,
        np.full(count, 1.5e9),
        vectors,
        dim=dim,
        margin=margin,
        world_size=world_size,
        rank_sums=rank_sums,
    )


def rankme(z: torch.Tensor) -> float:
    """RankMe of the centred batch straight from its definition, with an SVD."""
    z = z.double()
    singular = torch.linalg.svdvals(z - z.mean(dim=0))
    p = singular / singular.sum() + 1e-7
    return math.exp(-(p * p.log()).sum().item())


def test_every_column_matches_a_direct_computation():
    z, labels = known_batch()
    loss, stats = functional.batch_hard_triplet_loss(z, labels, 0.3, return_statistics=True)
    vector = step_vectors([loss], [stats], embedding_sums(z)[None])[0]
    m = derive([vector], dim=6, rank_sums={0: rank_step_sums(z, labels).numpy()})
    want = reference.statistics(z, labels, 0.3, "batch_hard", False, "euclidean")
    direct = {
        "loss": loss.item(),
        "margin": 0.3,
        "loss_margin_ratio": loss.item() / 0.3,
        "embedding_variance": torch.var(z, dim=0).mean().item(),
        "embedding_norm_mean": z.norm(dim=1).mean().item(),
        # lightly's std_of_l2_normalized: std over the batch of the normalised embeddings.
        "std_of_l2_normalized": torch.std(F.normalize(z, dim=1), dim=0).mean().item(),
        "effective_rank": rankme(z),
        "num_classes": len(set(labels.tolist())),
        "within_class_variance_ratio": within_over_total(z, labels),
        "alignment": alignment(z, labels),
        "uniformity": uniformity(z),
        "nonfinite_count": 0.0,
        "nonfinite_loss_count": 0.0,
        "embedding_dim": 6.0,
        "batch_size": 24.0,
        "num_valid_triplets": want["num_valid_triplets"],
        **{
            name: want[name]
            for name in (
                "mean_pairwise_distance",
                "mean_between_class_distance",
                "frac_easy",
                "frac_semihard",
                "frac_hard",
                "frac_positive_loss",
                "hardest_positive_mean",
                "hardest_negative_mean",
            )
        },
    }
    assert set(m) == set(METRIC_COLUMNS)
    no_history = {"loss_margin_ratio_step_change"}  # one step: no previous loss call
    assert set(direct) == set(METRIC_COLUMNS) - {"step", "time", *PROBE_COLUMNS, *no_history}
    assert all(np.isnan(m[name][0]) for name in (*PROBE_COLUMNS, *no_history))
    for name, value in direct.items():
        assert m[name][0] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    assert m["step"].dtype == np.int64 and m["time"][0] == 1.5e9


def test_sums_of_two_halves_describe_the_whole_batch():
    # What makes the DDP reduction exact: sums over ranks, not averages of statistics.
    z, labels = known_batch(1, n=30, dim=5)
    halves = [(z[:13], labels[:13]), (z[13:], labels[13:])]
    vectors, rank_vectors = [], []
    for part, part_labels in halves:
        loss, stats = functional.batch_all_triplet_loss(part, part_labels, return_statistics=True)
        vectors.append(step_vectors([loss], [stats], embedding_sums(part)[None])[0])
        rank_vectors.append(rank_step_sums(part, part_labels))
    m = derive(
        [vectors[0] + vectors[1]],
        dim=5,
        world_size=2,
        rank_sums={0: (rank_vectors[0] + rank_vectors[1]).numpy()},
    )
    assert m["embedding_variance"][0] == pytest.approx(torch.var(z, dim=0).mean().item())
    assert m["effective_rank"][0] == pytest.approx(rankme(z))
    assert m["std_of_l2_normalized"][0] == pytest.approx(
        torch.std(F.normalize(z, dim=1), dim=0).mean().item()
    )
    assert m["batch_size"][0] == 30
    losses = [functional.batch_all_triplet_loss(p, y).item() for p, y in halves]
    assert m["loss"][0] == pytest.approx(sum(losses) / 2)  # DDP: the mean of rank losses


def test_non_finite_rows_are_counted_and_left_out():
    z, _ = known_batch(2, n=10, dim=4)
    bad = z.clone()
    bad[3, 1] = float("nan")
    bad[7] = float("inf")
    vector = step_vectors([torch.tensor(0.1)], [None], embedding_sums(bad)[None])[0]
    m = derive([vector], dim=4, rank_sums={0: rank_step_sums(bad, None).numpy()})
    finite = z[[i for i in range(10) if i not in (3, 7)]]
    assert m["nonfinite_count"][0] == 5
    assert m["batch_size"][0] == 10
    assert m["embedding_variance"][0] == pytest.approx(torch.var(finite, dim=0).mean().item())
    assert m["effective_rank"][0] == pytest.approx(rankme(finite))
    # Without triplet statistics the triplet columns are unknown, not zero.
    assert math.isnan(m["frac_hard"][0]) and math.isnan(m["mean_pairwise_distance"][0])


def test_non_finite_losses_and_unrecorded_steps_add_to_the_counts():
    z, _ = known_batch(3, n=10, dim=4)
    bad = z.clone()
    bad[2, 0] = float("inf")
    # Two unrecorded steps before step 1: a NaN loss with 3 NaN entries, then an inf loss.
    skipped = nonfinite_counts(torch.tensor(float("nan")), [torch.full((1, 3), math.nan)])
    skipped = skipped + nonfinite_counts(torch.tensor(float("inf")), [bad])
    assert skipped.tolist() == [2.0, 4.0]
    sums = embedding_sums(torch.stack([z, z]))
    losses = [torch.tensor(float("nan")), None]  # a NaN loss, then an unknown one (not NaN)
    # The loss's changes between consecutive calls: 1.0 → 1.15 → 1.0 → NaN, then 2.0
    # (the two changes that touch the NaN are not known).
    one, more = torch.tensor(1.0), torch.tensor(1.15)
    changes = loss_changes([one, more, one, losses[0], torch.tensor(2.0)])
    assert changes.tolist() == pytest.approx([0.3, 2.0])
    assert loss_changes([one]) is None
    skipped = torch.stack([torch.zeros(4), torch.cat([skipped, changes])])
    vectors = step_vectors(losses, [None, None], sums, skipped)
    m = derive(vectors.numpy(), dim=4)
    assert list(m["nonfinite_loss_count"]) == [1, 2]
    assert list(m["nonfinite_count"]) == [0, 4]
    # Mean |Δ| / margin over the two known changes; none before the first row.
    assert math.isnan(m["loss_margin_ratio_step_change"][0])
    assert m["loss_margin_ratio_step_change"][1] == pytest.approx(0.15 / 0.3)
    assert math.isnan(m["loss"][0]) and math.isnan(m["loss"][1])


def test_single_row_and_collapsed_batches_are_defined():
    one = torch.randn(1, 8, dtype=torch.float64)
    same = torch.ones(16, 8, dtype=torch.float64) * 3
    m = derive(
        [
            step_vectors([torch.tensor(0.2)], [None], embedding_sums(b)[None])[0]
            for b in (one, same)
        ],
        dim=8,
        rank_sums={1: rank_step_sums(same, None).numpy()},
    )
    assert list(m["embedding_variance"]) == [0.0, 0.0]
    assert list(m["std_of_l2_normalized"]) == [0.0, 0.0]
    assert m["effective_rank"][1] == pytest.approx(1.0, abs=1e-4)  # one direction
    assert math.isnan(m["effective_rank"][0])  # not measured on that step


def test_effective_rank_bounds():
    assert effective_rank(np.eye(10)) == pytest.approx(10.0, rel=1e-5)
    line = np.outer(np.arange(1.0, 6.0), np.ones(3))  # all rows on one line
    assert effective_rank(line.T @ line) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(np.zeros((4, 4))) == pytest.approx(1.0, abs=1e-4)
    assert healthy_std_of_l2_normalized(64) == 0.125


def test_explicit_triplet_statistics():
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(12, 4, generator=g, dtype=torch.float64) for _ in range(3))
    stats = explicit_triplet_statistics(a, p, n, 0.5, "euclidean")
    d_ap, d_an = (a - p).norm(dim=1), (a - n).norm(dim=1)
    everything = torch.cat([a, p, n])
    pairwise = torch.cdist(everything, everything)
    assert stats.num_valid_triplets.item() == 12
    assert stats.frac_hard.item() == pytest.approx((d_an < d_ap).double().mean().item())
    semihard = ((d_ap <= d_an) & (d_an < d_ap + 0.5)).double().mean().item()
    assert stats.frac_semihard.item() == pytest.approx(semihard)
    assert stats.frac_positive_loss.item() == pytest.approx(
        (d_ap - d_an + 0.5 > 0).double().mean().item()
    )
    assert stats.hardest_positive_mean.item() == pytest.approx(d_ap.mean().item())
    assert stats.hardest_negative_mean.item() == pytest.approx(d_an.mean().item())
    assert stats.mean_pairwise_distance.item() == pytest.approx((pairwise.sum() / (36 * 35)).item())
    # Only the a–n and p–n pairs are known to be of different classes: no between-class mean.
    assert math.isnan(stats.mean_between_class_distance.item())


def test_between_class_distance_does_not_depend_on_rows_per_class():
    # The same four class points, each repeated k times (a P×K sampler's K): the mean over all
    # pairs falls as k grows (more zero same-class pairs), the mean between classes does not.
    g = torch.Generator().manual_seed(8)
    points = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = {}
    for k in (2, 8):
        z, labels = points.repeat_interleave(k, 0), torch.arange(4).repeat_interleave(k)
        _, stats = functional.batch_hard_triplet_loss(z, labels, 0.2, return_statistics=True)
        got[k] = stats
    between = torch.pdist(points).mean().item()
    for stats in got.values():
        assert stats.mean_between_class_distance.item() == pytest.approx(between, rel=1e-12)
    assert got[8].mean_pairwise_distance.item() < 0.95 * got[2].mean_pairwise_distance.item()


@pytest.mark.parametrize(
    ("labels", "why"),
    [([3] * 6, "one class"), (None, "no labels")],
    ids=["one-class", "unlabelled"],
)
def test_between_class_distance_is_unknown_without_two_classes(labels, why):
    z, _ = known_batch(4, n=6, dim=3)
    if labels is None:
        stats = unlabelled_statistics(z, "euclidean")
    else:
        _, stats = functional.batch_all_triplet_loss(
            z, torch.tensor(labels), return_statistics=True
        )
    vector = step_vectors([None], [stats], embedding_sums(z)[None])[0]
    m = derive([vector], dim=3)
    assert math.isnan(m["mean_between_class_distance"][0]), why  # 0 would read as contracted
    assert m["mean_pairwise_distance"][0] == pytest.approx(torch.pdist(z).mean().item())


# Slow references for the label-aware columns: explicit loops over rows and pairs, float64.


def unit_rows(z: torch.Tensor) -> list[torch.Tensor]:
    return [row / row.norm() if row.norm() > 0 else row for row in z.double()]


def within_over_total(z: torch.Tensor, labels: torch.Tensor) -> float:
    rows, y = z.double(), labels.tolist()
    members = {c: [r for r, label in zip(rows, y, strict=True) if label == c] for c in set(y)}
    means = {c: torch.stack(rows_c).mean(0) for c, rows_c in members.items()}
    centre = rows.mean(0)
    within = sum(((r - means[c]) ** 2).sum().item() for r, c in zip(rows, y, strict=True))
    total = sum(((r - centre) ** 2).sum().item() for r in rows)
    return within / total


def alignment(z: torch.Tensor, labels: torch.Tensor) -> float:
    u, y, terms = unit_rows(z), labels.tolist(), []
    for i in range(len(u)):
        for j in range(len(u)):
            if i != j and y[i] == y[j]:
                terms.append(((u[i] - u[j]) ** 2).sum().item())
    return sum(terms) / len(terms)


def uniformity(z: torch.Tensor) -> float:
    u, terms = unit_rows(z), []
    for i in range(len(u)):
        for j in range(len(u)):
            if i != j:
                terms.append(math.exp(-2 * ((u[i] - u[j]) ** 2).sum().item()))
    return math.log(sum(terms) / len(terms))


def geometry(z, labels, **kwargs):
    """The label-aware columns of one step (rank step) of ``z``."""
    vector = step_vectors([torch.tensor(0.1)], [None], embedding_sums(z)[None])[0]
    m = derive([vector], dim=z.shape[1], rank_sums={0: rank_step_sums(z, labels, **kwargs).numpy()})
    return {name: m[name][0] for name in LABEL_COLUMNS}


LABEL_COLUMNS = ("num_classes", "within_class_variance_ratio", "alignment", "uniformity")


def test_label_geometry_matches_explicit_loops():
    z, labels = known_batch(4, n=30, dim=5)
    labels[[0, 1]] = 7  # a class of two beside classes 0–3
    z[5] = 0.0  # a zero row: u = 0, it still counts in every pair
    got = geometry(z, labels)
    assert got["num_classes"] == 5
    assert got["within_class_variance_ratio"] == pytest.approx(within_over_total(z, labels))
    assert got["alignment"] == pytest.approx(alignment(z, labels))
    assert got["uniformity"] == pytest.approx(uniformity(z))
    assert 0 < got["within_class_variance_ratio"] < 1 and got["uniformity"] < 0


def test_rank_step_sums_of_two_halves_describe_the_whole_batch():
    z, labels = known_batch(5, n=26, dim=4)
    halves = [(z[:11], labels[:11]), (z[11:], labels[11:])]
    whole = rank_step_sums(z, labels)
    summed = sum(rank_step_sums(part, y) for part, y in halves)
    assert summed.shape == whole.shape == (rank_step_size(4),)
    # Gram and class table: the global batch exactly.
    gram_and_table = torch.cat([torch.arange(16), torch.arange(20, len(whole))])
    assert torch.allclose(summed[gram_and_table], whole[gram_and_table], rtol=1e-12, atol=1e-12)
    vectors = sum(
        step_vectors([torch.tensor(0.1)], [None], embedding_sums(p)[None])[0] for p, _ in halves
    )
    m = derive([vectors], dim=4, rank_sums={0: summed.numpy()})
    assert m["num_classes"][0] == len(set(labels.tolist()))
    assert m["within_class_variance_ratio"][0] == pytest.approx(within_over_total(z, labels))
    assert m["effective_rank"][0] == pytest.approx(rankme(z))

    # Pair sums: the pairs within each half (each DDP rank's batch), all of them.
    assert math.exp(m["uniformity"][0]) == pytest.approx(
        sum(math.exp(uniformity(p)) * len(p) * (len(p) - 1) for p, _ in halves)
        / sum(len(p) * (len(p) - 1) for p, _ in halves)
    )
    positives = [
        sum(1 for i in range(len(y)) for j in range(len(y)) if i != j and y[i] == y[j])
        for _, y in ((p, y.tolist()) for p, y in halves)
    ]
    assert m["alignment"][0] == pytest.approx(
        sum(alignment(p, y) * k for (p, y), k in zip(halves, positives, strict=True))
        / sum(positives)
    )


def test_degenerate_batches_give_defined_or_documented_values():
    z, _ = known_batch(6, n=12, dim=3)
    one_class = geometry(z, torch.zeros(12, dtype=torch.int64))
    assert one_class["num_classes"] == 1
    assert one_class["within_class_variance_ratio"] == pytest.approx(1.0)
    assert one_class["alignment"] == pytest.approx(alignment(z, torch.zeros(12)))
    distinct = geometry(z, torch.arange(12))
    assert distinct["num_classes"] == 12
    assert distinct["within_class_variance_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(distinct["alignment"])  # no positive pair: 0 would read as perfect
    single = geometry(z[:1], torch.tensor([3]))
    assert single["num_classes"] == 1
    assert all(math.isnan(single[k]) for k in LABEL_COLUMNS[1:])  # no spread, no pair
    point = geometry(torch.ones(8, 3, dtype=torch.float64), torch.arange(8) % 2)
    assert point["alignment"] == 0.0 and point["uniformity"] == 0.0  # collapsed: the maxima
    assert math.isnan(point["within_class_variance_ratio"])  # tr Σ_T = 0: undefined
    unlabelled = geometry(z, None)
    assert unlabelled["uniformity"] == pytest.approx(uniformity(z))
    assert all(math.isnan(unlabelled[k]) for k in LABEL_COLUMNS[:3])


def test_labels_share_a_class_row_modulo_the_table_size():
    z, _ = known_batch(7, n=12, dim=3)
    labels = torch.tensor([0, 5, 10, -1, 4, 9] * 2)  # with 5 rows: 0 ≡ 5 ≡ 10, −1 ≡ 4 ≡ 9
    assert geometry(z, labels, buckets=5)["num_classes"] == 2
    assert geometry(z, labels, buckets=1024)["num_classes"] == 6
    merged = geometry(z, labels.remainder(5), buckets=1024)
    assert geometry(z, labels, buckets=5)["within_class_variance_ratio"] == pytest.approx(
        merged["within_class_variance_ratio"]
    )


def test_triplet_statistics_are_built_by_field_name():
    fields = {name: torch.tensor(float(i)) for i, name in enumerate(functional.STATISTIC_FIELDS)}
    # Given in reverse order, stored in the canonical one.
    stats = functional.TripletStatistics.of(**dict(reversed(list(fields.items()))))
    assert stats.values.tolist() == list(range(len(functional.STATISTIC_FIELDS)))
    assert stats.num_hard.item() == functional.STATISTIC_FIELDS.index("num_hard")
    del fields["num_hard"]
    with pytest.raises(ValueError, match=r"missing \['num_hard'\], unknown \['num_harder'\]"):
        functional.TripletStatistics.of(**fields, num_harder=torch.tensor(0.0))
    with pytest.raises(ValueError, match=rf"must have shape \({len(fields) + 1},\)"):
        functional.TripletStatistics(torch.zeros(10))


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_probe_statistics_match_a_direct_computation(distance):
    z, labels = known_batch()
    got = probe_statistics(z, labels, distance).tolist()
    n = z.shape[0]
    z64 = z.double()
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if distance == "cosine":
        d = lambda i, j: 1 - F.cosine_similarity(z64[i], z64[j], dim=0).item()  # noqa: E731
    else:
        power = 2 if distance == "squared_euclidean" else 1
        d = lambda i, j: (z64[i] - z64[j]).norm().item() ** power  # noqa: E731
    spread = sum(d(i, j) for i, j in pairs) / len(pairs)
    hits = 0
    for i in range(n):  # leave-one-out 1-NN, ties to the lowest index
        nearest = min((j for j in range(n) if j != i), key=lambda j: (d(i, j), j))
        hits += int(labels[nearest] == labels[i])
    want = [
        spread,
        torch.var(z64, dim=0).mean().item(),
        torch.std(F.normalize(z64, dim=1), dim=0).mean().item(),
        hits / n,
    ]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_probe_statistics_of_degenerate_probes_are_defined():
    one = probe_statistics(torch.ones(1, 4), torch.tensor([0]), "euclidean").tolist()
    assert np.isnan(one[0]) and one[1:3] == [0.0, 0.0] and np.isnan(one[3])
    collapsed = probe_statistics(torch.ones(6, 4), None, "euclidean").tolist()
    assert collapsed[:3] == [0.0, 0.0, 0.0] and np.isnan(collapsed[3])  # no labels


def test_effective_rank_is_that_of_the_centred_batch():
    # Isotropic rows around a large common offset: uncentred they read as one direction.
    torch.manual_seed(0)
    z = 100.0 + torch.randn(256, 8, dtype=torch.float64)
    sums = rank_step_sums(z, None).numpy()
    m = derive([step_vectors([None], [None], embedding_sums(z)[None])[0]], dim=8,
               rank_sums={0: sums})  # fmt: skip
    uncentred = effective_rank(sums[:64].reshape(8, 8))
    assert uncentred < 1.5
    assert m["effective_rank"][0] == pytest.approx(rankme(z), rel=1e-9)
    assert m["effective_rank"][0] > 7.5


def test_loss_changes_of_mixed_precision_calls_are_exact_in_float64():
    # Under autocast a loop can log a float32 loss, then a bfloat16 one: a change of 1e-4
    # survives (bfloat16's step near 1 is 2⁻⁷ ≈ 0.008, so casting both to it would read 0).
    precise, rounded = torch.tensor(1.0001, dtype=torch.float32), torch.tensor(1.0).bfloat16()
    changes = loss_changes([precise, rounded])
    assert changes.dtype == torch.float64
    assert changes.tolist() == pytest.approx([float(precise) - 1.0, 1.0], rel=1e-6)
