"""A run file written by an earlier collapsewatch (schema 1, version 0.1.0) stays readable.

``tests/data/schema1-batch-hard-collapsed.cwrun`` is frozen: the demo's collapsing
batch-hard run (digits, lr 0.5, margin 0.2), 120 steps at every=1, rank_every=10,
snapshots of 64 rows every 40 steps, as written by collapsewatch 0.1.0. Columns are added to
the metrics table over time by ``ALTER TABLE``; every reader (store, detector, CLI, dashboard,
report) must keep reading files that lack the newer ones. Never regenerate it: add a new
frozen file when the schema changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import collapsewatch as cw
from collapsewatch.cli import main as cli_main

FROZEN = Path(__file__).parent / "data" / "schema1-batch-hard-collapsed.cwrun"
# The columns schema 1 wrote, as of collapsewatch 0.1.0.
SCHEMA1_COLUMNS = [
    *("step", "time", "loss", "margin", "loss_margin_ratio", "embedding_variance"),
    *("mean_pairwise_distance", "frac_easy", "frac_semihard", "frac_hard"),
    *("frac_positive_loss", "hardest_positive_mean", "hardest_negative_mean"),
    *("embedding_norm_mean", "std_of_l2_normalized", "effective_rank", "num_classes"),
    *("within_class_variance_ratio", "alignment", "uniformity", "nonfinite_count"),
    *("embedding_dim", "batch_size", "num_valid_triplets"),
]
STORED_ONSET = 28  # the collapse event 0.1.0 wrote live


@pytest.fixture
def frozen(tmp_path: Path) -> Path:
    """A copy, so nothing a reader does can touch the committed file."""
    return Path(shutil.copy(FROZEN, tmp_path / FROZEN.name))


def test_the_store_reads_every_part(frozen: Path) -> None:
    run = cw.load_run(frozen)
    assert run.metadata["collapsewatch_version"] == "0.1.0"
    assert run.metadata["status"] == "finished"
    assert list(run.metrics.columns) == SCHEMA1_COLUMNS
    assert run.metrics["step"].tolist() == list(range(120))
    assert run.metrics["margin"].eq(0.2).all()
    collapse = run.events[run.events["kind"] == "collapsed"]
    assert collapse["step"].tolist() == [STORED_ONSET]
    assert run.snapshot_steps == (0, 40, 80)
    snapshot = run.snapshot(40)
    assert snapshot.embeddings.shape == (64, 32) and snapshot.labels.shape == (64,)


def test_the_detector_still_judges_it_collapsed(frozen: Path) -> None:
    verdict = cw.analyze(frozen)
    assert verdict.state == "collapsed"
    assert verdict.collapsed_at_end
    # Replayed by today's detector, from the columns schema 1 has: the onset may move with
    # the rules, but not far from what was seen live.
    assert abs(verdict.onset_step - STORED_ONSET) <= 10


def test_the_cli_analyses_it(frozen: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["analyze", str(frozen), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["state"] == "collapsed"
    assert printed["last_step"] == 119


def test_the_dashboard_and_the_report_draw_it(frozen: Path, tmp_path: Path) -> None:
    from collapsewatch.dashboard.data import RunCache, run_id_of
    from collapsewatch.dashboard.report import write_report

    cache = RunCache(frozen.parent)
    view = cache.view(run_id_of(frozen.parent, frozen))
    assert len(view.metrics) == 120
    projection = cache.projection(view.run_id, 80, "pca")
    assert projection.n_points == 64 and projection.xy.shape == (64, 2)
    # Collapsed by step 80: the points sit far closer together than at step 0.
    assert projection.radius < 0.1 * projection.reference_radius
    output = write_report(cw.load_run(frozen), cw.analyze(frozen), tmp_path / "report.html")
    page = output.read_text(encoding="utf-8")
    assert "schema1-batch-hard-collapsed" in page and "collapsed" in page
