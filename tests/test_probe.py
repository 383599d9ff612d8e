"""watch(probe=...): a fixed held-out batch through the model in eval mode, recorded as the
probe_* columns, without disturbing training (train mode, batch-norm statistics, the
recorded training rows)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import collapsewatch as cw
from collapsewatch.columns import PROBE_COLUMNS
from collapsewatch.detect import DetectorConfig
from collapsewatch.losses import BatchHardTripletLoss
from collapsewatch.statistics import probe_statistics


def model_with_dropout_and_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)
    )


def train(tmp_path, steps: int = 30, **options):
    model = model_with_dropout_and_batchnorm()
    loss_fn = BatchHardTripletLoss(margin=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=generator)
    y = torch.arange(32) % 4
    # Fixed intervals: "auto" ones follow timings, which the probe changes.
    fixed = {"every": 1, "difficulty_every": 1}
    with cw.watch(model, loss_fn, logdir=tmp_path, run="probed", **fixed, **options) as w:
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, cw.load_run(w.path)


def test_probe_rows_are_the_models_eval_mode_output_every_k_steps(tmp_path) -> None:
    probe_x = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    probe_y = torch.arange(40) % 4
    model, run = train(tmp_path, steps=21, probe=probe_x, probe_labels=probe_y, probe_every=10)
    assert model.training  # the probe put train mode back
    metrics = run.metrics.set_index("step")
    assert metrics[PROBE_COLUMNS[0]].dropna().index.tolist() == [0, 10, 20]
    unprobed = [s for s in range(21) if s not in (0, 10, 20)]
    assert metrics.loc[unprobed, list(PROBE_COLUMNS)].isna().all().all()
    assert run.metadata["probe_every"] == 10
    # Step 20's probe ran when the loss was called: after 20 optimizer steps and step 20's
    # forward pass (which moved the batch-norm statistics). Rebuild that model.
    reference, _ = train(tmp_path / "reference", steps=20)
    reference(torch.randn(32, 8, generator=torch.Generator().manual_seed(1)))
    reference.eval()
    with torch.no_grad():
        want = probe_statistics(reference(probe_x), probe_y, "euclidean").tolist()
    assert metrics.loc[20, list(PROBE_COLUMNS)].tolist() == pytest.approx(want, rel=1e-6)


def test_the_probe_leaves_training_untouched(tmp_path) -> None:
    probe_x = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    with_probe, run_with = train(tmp_path / "a", probe=probe_x, probe_every=5)
    without, run_without = train(tmp_path / "b")
    # Same weights and batch-norm running statistics: eval mode does not update them, and
    # dropout's random stream was not consumed by the probe.
    for (name, a), b in zip(
        with_probe.state_dict().items(), without.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    # The training rows are the same; only the probe columns differ.
    columns = [c for c in run_without.metrics.columns if c not in PROBE_COLUMNS and c != "time"]
    a, b = run_with.metrics[columns], run_without.metrics[columns]
    assert np.allclose(a.to_numpy(float), b.to_numpy(float), equal_nan=True)
    assert run_without.metrics[list(PROBE_COLUMNS)].isna().all().all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"probe_every": 0}, "probe_every must be a positive int"),
        ({"probe_labels": torch.arange(4)}, "probe_labels needs probe="),
        ({"probe": torch.randn(4, 8), "probe_labels": torch.rand(4)}, "1-D integer tensor"),
        (
            {"probe": torch.randn(4, 8), "probe_labels": torch.arange(5)},
            "5 labels for a probe of 4",
        ),
    ],
)
def test_bad_probe_options_are_named(tmp_path, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        cw.watch(nn.Linear(8, 4), BatchHardTripletLoss(), logdir=tmp_path, **options)


def test_a_probe_the_model_cannot_take_is_said_once_and_training_goes_on(tmp_path) -> None:
    with pytest.warns(RuntimeWarning, match="the probe batch cannot be evaluated") as caught:
        _, run = train(tmp_path, steps=12, probe=torch.randn(5, 3), probe_every=5)
    assert sum("probe batch" in str(w.message) for w in caught) == 1
    assert len(run.metrics) == 12 and run.metrics["probe_mean_pairwise_distance"].isna().all()
    assert not math.isnan(run.metrics["mean_pairwise_distance"].iloc[-1])


def rows_hidden_by_dropout(probe: bool) -> pd.DataFrame:
    """A run whose training batches stay at 0.23 × their peak spread (dropout on) with the
    loss on the margin, while the model in eval mode maps the probe to one point."""
    steps = range(120)
    frame = pd.DataFrame(
        {
            "step": steps,
            "time": 0.0,
            "margin": 5.0,
            "loss_margin_ratio": [1.6 if s < 20 else 1.01 for s in steps],
            "mean_pairwise_distance": [1.9 if s < 20 else 0.44 for s in steps],
        }
    )
    frame["probe_mean_pairwise_distance"] = np.nan
    if probe:
        at = frame["step"] % 10 == 0
        frame.loc[at, "probe_mean_pairwise_distance"] = [
            1.5 if s < 20 else 0.019 for s in frame.loc[at, "step"]
        ]
    return frame


def test_the_detector_judges_contraction_on_the_probe() -> None:
    assert cw.analyze(rows_hidden_by_dropout(probe=False)).state == "healthy"
    verdict = cw.analyze(rows_hidden_by_dropout(probe=True))
    assert verdict.state == "collapsed"
    # Contracted from the first probe at 0.019 (step 20): confirmed one window later.
    assert verdict.onset_step == 20 + DetectorConfig().window
    collapse = next(e for e in verdict.events if e.kind == "collapsed")
    assert "held-out probe" in collapse.message
    assert collapse.evidence["probe_mean_pairwise_distance"] == 0.019
    assert collapse.evidence["peak_probe_mean_pairwise_distance"] == 1.5
