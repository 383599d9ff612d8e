"""Advice that reads the run: never suggest what the run already does (the scaled variant,
batch-all, L2-normalised embeddings), live and replayed alike."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import collapsewatch as cw
from collapsewatch.detect import COLLAPSE_REMEDIES, CollapseDetector, analyze, collapse_advice
from collapsewatch.losses import BatchAllTripletLoss, BatchHardTripletLoss


def collapsing_rows(norm: float) -> pd.DataFrame:
    """Spread 0.5 for 10 steps, then stuck on the margin with every point together."""
    return pd.DataFrame(
        {
            "step": range(50),
            "time": 0.0,
            "loss_margin_ratio": [2.0] * 10 + [1.001] * 40,
            "margin": 0.2,
            "mean_pairwise_distance": [0.5] * 10 + [0.002] * 40,
            "embedding_norm_mean": norm,
        }
    )


def collapse_suggestion(detector: CollapseDetector, rows: pd.DataFrame) -> str:
    [collapse] = [e for e in detector.replay(rows) if e.kind == "collapsed"]
    return collapse.suggestion


def test_every_remedy_is_offered_to_a_run_that_does_none_of_them() -> None:
    for family, remedies in COLLAPSE_REMEDIES.items():
        advice = collapse_advice(family)
        assert advice[0].isupper() and advice.endswith(".")
        for remedy in remedies:
            assert remedy.text[1:] in advice, (family, remedy.text)  # first letter capitalised


@pytest.mark.parametrize(
    ("traits", "left_out"),
    [
        ({"scaled"}, "scaled=True"),
        ({"batch_all"}, "batch-all"),
        ({"normalized"}, "L2-normalise"),
    ],
)
def test_what_the_run_does_is_left_out(traits: set[str], left_out: str) -> None:
    assert left_out in collapse_advice("bundled")
    advice = collapse_advice("bundled", traits)
    assert left_out not in advice
    assert "ower the learning rate" in advice and advice.endswith(".")


def test_embeddings_of_norm_one_are_not_told_to_normalise() -> None:
    normalised = collapse_suggestion(CollapseDetector(), collapsing_rows(norm=1.0))
    assert "L2-normalise" not in normalised and "scaled=True" in normalised
    unnormalised = collapse_suggestion(CollapseDetector(), collapsing_rows(norm=0.37))
    assert "L2-normalise" in unnormalised


def test_pml_distance_that_normalises_is_not_told_to_normalise() -> None:
    advice = collapse_advice("pml_triplet", {"normalized"})
    assert "normalize_embeddings" not in advice and "semi-hard" in advice


def collapsing_run(tmp_path, loss_fn: torch.nn.Module, name: str):
    """A linear embedder driven to one point: every row identical after step 10."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    x = torch.randn(32, 8)
    y = torch.arange(32) % 4
    with cw.watch(model, loss_fn, logdir=tmp_path, run=name, every=1) as watcher:
        for step in range(60):
            if step == 10:
                with torch.no_grad():
                    model.weight.zero_()
                    model.bias.fill_(0.5)
            loss_fn(model(x), y)
    return watcher.path


@pytest.mark.filterwarnings("ignore::collapsewatch.CollapseWarning")
@pytest.mark.parametrize(
    ("loss_fn", "traits", "left_out"),
    [
        (BatchHardTripletLoss(margin=0.2, scaled=True), ["scaled"], "scaled=True"),
        (BatchAllTripletLoss(margin=0.2), ["batch_all"], "batch-all"),
        (BatchHardTripletLoss(margin=0.2, distance="cosine"), ["normalized"], "L2-normalise"),
    ],
)
def test_watch_records_the_traits_and_the_replay_advises_the_same(
    tmp_path, loss_fn: torch.nn.Module, traits: list[str], left_out: str
) -> None:
    path = collapsing_run(tmp_path, loss_fn, "run")
    run = cw.load_run(path)
    assert run.metadata["loss_traits"] == traits
    live = [e for e in run.events.itertuples() if e.kind == "collapsed"]
    replayed = [e for e in analyze(run).events if e.kind == "collapsed"]
    assert live and replayed
    assert live[0].suggestion == replayed[0].suggestion
    assert left_out not in live[0].suggestion and "ower the learning rate" in live[0].suggestion
