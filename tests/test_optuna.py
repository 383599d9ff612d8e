"""Optuna: a real study (in memory and in SQLite) whose collapsing trials are pruned at the
onset, checked against each trial's own held-out embeddings, never against collapsewatch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors, random_batches

optuna = pytest.importorskip("optuna")
from collapsewatch.integrations.optuna import ATTRIBUTE_PREFIX, watch_trial  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 120
IMAGES, LABELS = load_digits_tensors()
SPLIT = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(0))
TRAIN, HELD_OUT = SPLIT[:1400], SPLIT[1400:]


def held_out_spread(model: torch.nn.Module) -> float:
    """Mean distance of the held-out embeddings to their centroid."""
    with torch.no_grad():
        z = model(IMAGES[HELD_OUT]).numpy()
    return float(np.linalg.norm(z - z.mean(axis=0), axis=1).mean())


def make_objective(logdir, truth):
    def objective(trial: optuna.Trial) -> float:
        scaled = trial.suggest_categorical("scaled", [False, True])
        margin = trial.suggest_categorical("margin", [0.2, 0.5])
        torch.manual_seed(0)
        model = DigitsEmbedder()
        initial = held_out_spread(model)
        loss_fn = cw.losses.BatchHardTripletLoss(margin=margin, scaled=scaled)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        batches = random_batches(len(TRAIN), 256, torch.Generator().manual_seed(0))
        steps = 0
        try:
            with watch_trial(trial, model, loss_fn, logdir=logdir, every=1):
                for _ in range(STEPS):
                    index = TRAIN[next(batches)]
                    loss = loss_fn(model(IMAGES[index]), LABELS[index])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    steps += 1
        finally:
            # Truth from the trial's own model, whether it finished or was pruned.
            truth[trial.number] = (held_out_spread(model) / initial, steps)
        return held_out_spread(model)

    return objective


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_collapsing_trials_are_pruned_at_their_onset_and_healthy_ones_finish(tmp_path, storage):
    url = None if storage == "memory" else f"sqlite:///{tmp_path / 'study.db'}"
    space = {"scaled": [False, True], "margin": [0.2, 0.5]}
    study = optuna.create_study(
        study_name="sweep",
        storage=url,
        direction="maximize",
        sampler=optuna.samplers.GridSampler(space, seed=0),
    )
    truth: dict[int, tuple[float, int]] = {}
    study.optimize(make_objective(tmp_path / "runs", truth), n_trials=4)
    trials = study.get_trials()
    assert len(trials) == 4
    for trial in trials:
        shrunk, steps_run = truth[trial.number]
        attrs = {k.removeprefix(ATTRIBUTE_PREFIX): v for k, v in trial.user_attrs.items()}
        run = cw.load_run(attrs["run"])
        if trial.params["scaled"]:
            # The scaled variant spreads out: never pruned, judged healthy.
            assert shrunk > 0.5
            assert trial.state == optuna.trial.TrialState.COMPLETE
            assert attrs["state"] == "healthy" and attrs["pruned_at_step"] is None
            assert run.metadata["status"] == "finished" and steps_run == STEPS
        else:
            # Plain batch-hard at lr 0.5 collapses: the held-out points shrink to a speck.
            assert shrunk < 0.05
            assert trial.state == optuna.trial.TrialState.PRUNED
            assert attrs["state"] == "collapsed"
            assert run.metadata["status"] == "pruned"
            # Pruned at the onset: within one commit (5 recorded steps) of it, long before
            # the budget ran out.
            onset = attrs["onset_step"]
            assert onset <= attrs["pruned_at_step"] <= onset + 6
            assert steps_run == attrs["pruned_at_step"] < STEPS // 2
            assert run.metadata["config"]["optuna_trial"] == trial.number


def test_without_pruning_the_verdict_is_still_recorded(tmp_path):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(trial):
        torch.manual_seed(0)
        model = DigitsEmbedder()
        loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        batches = random_batches(len(TRAIN), 256, torch.Generator().manual_seed(0))
        with watch_trial(trial, model, loss_fn, logdir=tmp_path, prune=False, every=1):
            for _ in range(80):
                index = TRAIN[next(batches)]
                loss = loss_fn(model(IMAGES[index]), LABELS[index])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return 0.0

    study.optimize(objective, n_trials=1)
    (trial,) = study.get_trials()
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.user_attrs[ATTRIBUTE_PREFIX + "state"] == "collapsed"
    assert trial.user_attrs[ATTRIBUTE_PREFIX + "last_step"] == 79


def test_on_collapse_is_watch_trials_own(tmp_path):
    trial = optuna.create_study().ask()
    with (
        pytest.raises(ValueError, match="sets on_collapse itself"),
        watch_trial(trial, DigitsEmbedder(), cw.losses.BatchHardTripletLoss(), on_collapse="raise"),
    ):
        pass
