"""Run files for the dashboard tests, written with the store's public RunWriter."""

from __future__ import annotations

import math
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from collapsewatch.store import Event, RunWriter

MARGIN = 0.2
DIM = 8


def metrics_frame(
    steps: Sequence[int] | np.ndarray,
    *,
    collapse_at: int | None = None,
    recover_at: int | None = None,
    diverge_at: int | None = None,
    seed: int = 0,
    t0: float | None = None,
) -> pd.DataFrame:
    """Every metric column for ``steps``: healthy values, or collapsed ones from
    ``collapse_at`` until ``recover_at`` (distances ~0, loss/margin = 1), or, from
    ``diverge_at``, a blow-up (loss/margin 1e14 then NaN, embedding variance 1e39)."""
    steps = np.asarray(steps, dtype=np.int64)
    n = len(steps)
    rng = np.random.default_rng(seed)
    collapsed = np.zeros(n, dtype=bool)
    if collapse_at is not None:
        collapsed = steps >= collapse_at
        if recover_at is not None:
            collapsed &= steps < recover_at
    ratio = np.where(collapsed, 1.0, 0.5 + 0.1 * rng.random(n))
    mpd = np.where(collapsed, 0.002, 0.5 + 0.05 * rng.random(n))
    rank_steps = steps % 10 == 0
    rank = np.where(rank_steps, np.where(collapsed, 1.1, 6.5), np.nan)
    start = time.time() - n if t0 is None else t0
    frame = pd.DataFrame(
        {
            "step": steps,
            "time": start + np.arange(n, dtype=float),
            "loss": ratio * MARGIN,
            "margin": MARGIN,
            "loss_margin_ratio": ratio,
            "embedding_variance": mpd**2 / (2 * DIM),
            "mean_pairwise_distance": mpd,
            "mean_between_class_distance": 1.1 * mpd,  # same-class pairs are the closer ones
            "frac_easy": np.where(collapsed, 0.0, 0.5),
            "frac_semihard": np.where(collapsed, 0.0, 0.3),
            "frac_hard": np.where(collapsed, 1.0, 0.2),
            "frac_positive_loss": np.where(collapsed, 1.0, 0.5),
            "hardest_positive_mean": mpd,
            "hardest_negative_mean": mpd,
            "embedding_norm_mean": 1.0,
            "std_of_l2_normalized": np.where(collapsed, 0.001, 1 / math.sqrt(DIM)),
            "effective_rank": rank,
            "nonfinite_count": 0.0,
            "embedding_dim": float(DIM),
            "batch_size": 32.0,
            "num_valid_triplets": 32.0,
            # Class geometry, measured with the rank.
            "num_classes": np.where(rank_steps, 4.0, np.nan),
            "within_class_variance_ratio": np.where(
                rank_steps, np.where(collapsed, 0.95, 0.3), np.nan
            ),
            "alignment": np.where(rank_steps, np.where(collapsed, 0.0, 0.6), np.nan),
            "uniformity": np.where(rank_steps, np.where(collapsed, 0.0, -2.2), np.nan),
        }
    )
    if diverge_at is not None:
        blown = steps >= diverge_at
        ratio = np.where(steps >= diverge_at + 3, np.nan, 1e14)
        frame.loc[blown, ["loss_margin_ratio", "loss"]] = np.c_[ratio, ratio * MARGIN][blown]
        frame.loc[blown, "embedding_variance"] = 1e39
        frame.loc[blown, "mean_pairwise_distance"] = np.inf
        for column in ("std_of_l2_normalized", "frac_easy", "frac_semihard", "frac_hard"):
            frame.loc[blown, column] = np.nan
        frame.loc[blown, "nonfinite_count"] = float(DIM)
    return frame


def collapsed_event(step: int, since: int | None = None) -> Event:
    return Event(
        step=step,
        kind="collapsed",
        state="collapsed",
        message="Embeddings collapsed: every input maps to about one point.",
        suggestion="Lower the learning rate.",
        evidence={
            "loss_margin_ratio": 1.0,
            "mean_pairwise_distance": 0.002,
            "peak_mean_pairwise_distance": 0.55,
            "since_step": step if since is None else since,
        },
    )


def recovered_event(step: int) -> Event:
    return Event(
        step=step,
        kind="recovered",
        state="healthy",
        message="The embeddings spread out again.",
        evidence={"mean_pairwise_distance": 0.4},
    )


def diverged_event(step: int) -> Event:
    return Event(
        step=step,
        kind="diverged",
        state="diverged",
        message="The loss is not finite and the embeddings blew up.",
        suggestion="Lower the learning rate.",
        evidence={"nonfinite_count": float(DIM)},
    )


def warning_event(step: int) -> Event:
    return Event(
        step=step,
        kind="warning",
        state="warning",
        message="Mean pairwise distance is falling fast.",
        suggestion="Watch it.",
        evidence={"mean_pairwise_distance": 0.05},
    )


def write_run(
    logdir: Path,
    name: str,
    *,
    steps: int | Sequence[int] = 50,
    collapse_at: int | None = None,
    recover_at: int | None = None,
    diverge_at: int | None = None,
    seed: int = 0,
    events: Sequence[Event] | None = None,
    snapshots: Sequence[int] = (),
    columns: Sequence[str] | None = None,
    status: str = "finished",
    metadata: dict | None = None,
) -> Path:
    """A closed run file ``logdir/name.cwrun``; collapse events are added to match."""
    path = Path(logdir) / f"{name}.cwrun"
    step_values = np.arange(steps) if isinstance(steps, int) else np.asarray(steps)
    frame = metrics_frame(
        step_values,
        collapse_at=collapse_at,
        recover_at=recover_at,
        diverge_at=diverge_at,
        seed=seed,
    )
    if columns is not None:
        frame = frame[["step", "time", *columns]]
    writer = RunWriter(path, {"margin": MARGIN, "embedding_dim": DIM, **(metadata or {})})
    writer.append_metrics(frame)
    if events is None:
        events = []
        if collapse_at is not None:
            events.append(collapsed_event(collapse_at))
        if recover_at is not None:
            events.append(recovered_event(recover_at))
        if diverge_at is not None:
            events.append(diverged_event(diverge_at))
    if events:
        writer.append_events(events)
    for step in snapshots:
        writer.add_snapshot(step, *snapshot_arrays(step, collapse_at))
    writer.close(status)
    return path


def snapshot_arrays(
    step: int, collapse_at: int | None, n: int = 60, classes: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points in ``classes`` clusters in DIM dimensions, shrunk ×1000 once collapsed."""
    rng = np.random.default_rng(step)
    labels = np.arange(n) % classes
    centres = np.random.default_rng(1).normal(0, 1, (classes, DIM))
    x = centres[labels] + 0.2 * rng.normal(0, 1, (n, DIM))
    if collapse_at is not None and step >= collapse_at:
        x = 1e-3 * x + 3.0
    return x.astype(np.float32), labels.astype(np.int64)


def settle(logdir: Path, seconds: float = 10.0) -> None:
    """Date every file under ``logdir`` ``seconds`` back, as if last written then: the
    dashboard trusts a file's stamp to say "unchanged" only once it has settled."""
    when = time.time() - seconds
    for path in logdir.rglob("*"):
        if path.is_file():
            os.utime(path, (when, when))


def write_broken(logdir: Path, name: str = "broken", kind: str = "garbage") -> Path:
    """A ``.cwrun`` that is not a readable run: random bytes, or a foreign SQLite file."""
    path = Path(logdir) / f"{name}.cwrun"
    if kind == "garbage":
        path.write_bytes(b"this is not a sqlite database" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE t (x)")
        db.commit()
        db.close()
    else:
        raise ValueError(kind)
    return path


# The runs a reader must be able to read, each alone or side by side: case -> what to write.
READABILITY_CASES = ("healthy", "collapsed", "margin-free", "diverged", "ten runs")
# Traces with data each panel shows for one run holding every metric.
FULL_PANELS = {"loss": 1, "spread": 3, "difficulty": 2, "rank": 2, "sphere": 1, "geometry": 3}


def write_case(logdir: Path, case: str) -> tuple[list[str], dict[str, int]]:
    """Write ``case``'s runs into ``logdir``; return their run ids and, per panel key, how
    many traces with data the panels must show for them."""
    if case == "healthy":
        write_run(logdir, "healthy", steps=60, snapshots=[0, 50])
        return ["healthy.cwrun"], FULL_PANELS
    if case == "collapsed":
        write_run(logdir, "collapsed", steps=60, collapse_at=30, snapshots=[0, 40])
        return ["collapsed.cwrun"], FULL_PANELS
    if case == "margin-free":
        columns = ["loss", "mean_pairwise_distance", "embedding_variance"]
        write_run(logdir, "margin-free", steps=60, columns=columns, metadata={"margin": None})
        return ["margin-free.cwrun"], {"loss": 1, "spread": 2}
    if case == "diverged":
        write_run(logdir, "healthy", steps=60)
        write_run(logdir, "diverged", steps=60, diverge_at=40, seed=1)
        return ["diverged.cwrun", "healthy.cwrun"], {k: 2 * v for k, v in FULL_PANELS.items()}
    if case == "ten runs":
        names = [f"run{i:02d}" for i in range(10)]
        for i, name in enumerate(names):
            collapse_at = 10 + 5 * i if i % 3 == 0 else None
            write_run(logdir, name, steps=60, collapse_at=collapse_at, seed=i)
        return [f"{n}.cwrun" for n in names], {k: 10 * v for k, v in FULL_PANELS.items()}
    raise ValueError(case)
