"""The recorded metric columns, declared once: name, label, format and what each needs.

Every medium (statistics, detector evidence, CLI, report, dashboard, trackers) reads column
metadata from :data:`COLUMNS` rather than restating it, so adding a column is one
:class:`Column` here plus the code that computes it (``statistics.derive_metrics``). This
module imports neither torch nor numpy: the read side uses it without paying for them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

Direction = Literal["low", "high"]


@dataclass(frozen=True)
class Column:
    """One column of a run's metrics table.

    Attributes:
        name: the column's name in the run file.
        label: how a person reads it (axis titles, tables, hover text).
        fmt: a format spec for its values (``format(value, fmt)``, d3 in plotly).
        needs_labels: NaN for loss calls without labels (explicit triplets, unknown calls).
        needs_margin: NaN for margin-free losses.
        rank_step: measured only on rank steps (``rank_every``), NaN in between.
        probe: measured on the held-out probe batch (``watch(probe=...)``) every
            ``probe_every`` steps, NaN in between and without a probe.
        bad: the direction in which the value signals collapse ("low": contraction, lost
            rank; "high": the loss on its plateau, non-finite entries), or None.
    """

    name: str
    label: str
    fmt: str = ".4g"
    needs_labels: bool = False
    needs_margin: bool = False
    rank_step: bool = False
    probe: bool = False
    bad: Direction | None = None


COLUMNS: tuple[Column, ...] = (
    Column("step", "step", "d"),
    Column("time", "time", ".3f"),
    Column("loss", "loss"),
    Column("margin", "margin", ".4g"),
    Column("loss_margin_ratio", "loss / margin", ".4f", bad="high"),
    Column("embedding_variance", "embedding variance", bad="low"),
    Column("mean_pairwise_distance", "mean pairwise distance", bad="low"),
    Column(
        "mean_between_class_distance", "mean distance between classes", needs_labels=True, bad="low"
    ),
    Column("frac_easy", "easy", ".1%", needs_margin=True),
    Column("frac_semihard", "semi-hard", ".1%", needs_margin=True),
    Column("frac_hard", "hard", ".1%"),
    Column("frac_positive_loss", "positive-loss share", ".1%", needs_margin=True),
    Column("hardest_positive_mean", "hardest positive distance"),
    Column("hardest_negative_mean", "hardest negative distance", bad="low"),
    Column("embedding_norm_mean", "mean embedding norm"),
    Column("std_of_l2_normalized", "std of L2-normalised", bad="low"),
    Column("effective_rank", "effective rank", ".3g", rank_step=True, bad="low"),
    Column("num_classes", "classes in the batch", ".0f", needs_labels=True, rank_step=True),
    Column(
        "within_class_variance_ratio",
        "within-class variance share",
        ".3f",
        needs_labels=True,
        rank_step=True,
    ),
    Column("alignment", "alignment", ".3f", needs_labels=True, rank_step=True),
    Column("uniformity", "uniformity", ".3f", rank_step=True),
    Column("nonfinite_count", "non-finite entries", "d", bad="high"),
    Column("nonfinite_loss_count", "non-finite losses", "d", bad="high"),
    # The loss's step-to-step noise from every loss call (the plateau band's width).
    Column("loss_margin_ratio_step_change", "loss / margin step-to-step change", ".4f"),
    Column("embedding_dim", "dimensions", "d"),
    Column("batch_size", "batch size", "d"),
    Column("num_valid_triplets", "valid triplets", ".0f"),
    # watch(probe=...): a fixed held-out batch through the model in eval mode, every
    # probe_every steps (dropout and augmentation off: what the model really does).
    Column("probe_mean_pairwise_distance", "probe mean pairwise distance", probe=True, bad="low"),
    Column("probe_embedding_variance", "probe embedding variance", probe=True, bad="low"),
    Column("probe_std_of_l2_normalized", "probe std of L2-normalised", probe=True, bad="low"),
    Column("probe_knn_accuracy", "probe kNN accuracy", ".3f", probe=True, bad="low"),
)

BY_NAME: dict[str, Column] = {column.name: column for column in COLUMNS}

METRIC_COLUMNS: tuple[str, ...] = tuple(column.name for column in COLUMNS)
"""Every recorded column, in the run file's order."""

LABEL_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.needs_labels)
"""Columns that need the labels of the rows: NaN for calls without them (explicit
(anchor, positive, negative) triplets, unrecognised arguments)."""

MARGIN_RELATIVE: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.needs_margin)
"""Columns defined through the margin m: NaN for a margin-free loss (frac_hard, d_an < d_ap,
needs none)."""

RANK_STEP_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.rank_step)
"""Columns measured on rank steps only, together (one Gram and one class table)."""


PROBE_COLUMNS: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.probe)
"""Columns of the held-out probe batch, in the order ``statistics.probe_statistics``
returns them."""


def label(name: str) -> str:
    """A column's label, or its name where it is not a known column."""
    column = BY_NAME.get(name)
    return column.label if column is not None else name.replace("_", " ")


def format_number(value: Any, digits: int = 4) -> str:
    """A value for people (CLI, report, dashboard): ``digits`` significant digits, an integer
    in full with thousands separators, "–" for a missing one (None, NaN, a bool), "inf" and
    "-inf" as such, anything else as ``str``."""
    if value is None or isinstance(value, bool):
        return "–"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        value = float(value)
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}g}"  # inf and -inf format as themselves
    return str(value)


def healthy_std_of_l2_normalized(dim: int) -> float:
    """1/√D: the value of ``std_of_l2_normalized`` for isotropic embeddings."""
    return 1.0 / math.sqrt(dim)
