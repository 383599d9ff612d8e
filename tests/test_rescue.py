"""on_collapse="rescue": restore the last healthy state, apply a remedy, train on.

Truth from the embeddings of a held-out split, never from the detector: the demo's
collapsing run (digits, batch-hard, SGD lr 0.5 with momentum, margin 0.2, L2-normalised)
shrinks the held-out points to a speck; rescued, it must end spread out with the kNN
accuracy of a run that used the scaled variant from the start.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

import collapsewatch as cw
from collapsewatch.cli import main as cli_main
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors, random_batches
from collapsewatch.rescue import RESCUE_FAILED, RESCUED, Rescue, RescueContext

pytestmark = pytest.mark.slow
IMAGES, LABELS = load_digits_tensors()
ORDER = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(0))
TRAIN, HELD_OUT = ORDER[:1400], ORDER[1400:]
STEPS = 200


def embed(model, part):
    with torch.no_grad():
        return model(IMAGES[part]).numpy()


def held_out_spread(model) -> float:
    z = embed(model, HELD_OUT)
    return float(np.linalg.norm(z - z.mean(axis=0), axis=1).mean())


def knn_accuracy(model) -> float:
    knn = KNeighborsClassifier(5).fit(embed(model, TRAIN), LABELS[TRAIN].numpy())
    return float(knn.score(embed(model, HELD_OUT), LABELS[HELD_OUT].numpy()))


def train(tmp_path, name, *, scaled=False, steps=STEPS, on_collapse="ignore", scheduler=None):
    """Train the demo's collapsing configuration; ``on_collapse`` may also be a function of
    the optimizer that makes a Rescue."""
    torch.manual_seed(0)
    model = DigitsEmbedder()
    loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2, scaled=scaled)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = scheduler(opt) if scheduler else None
    batches = random_batches(len(TRAIN), 256, torch.Generator().manual_seed(0))
    options = {"optimizer": opt, "scheduler": sched} if on_collapse == "rescue" else {}
    if callable(on_collapse):
        on_collapse = on_collapse(opt)
    with cw.watch(
        model, loss_fn, logdir=tmp_path, run=name, every=1, on_collapse=on_collapse, **options
    ) as w:
        for _ in range(steps):
            index = TRAIN[next(batches)]
            loss = loss_fn(model(IMAGES[index]), LABELS[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model, loss_fn, opt, cw.load_run(w.path)


@pytest.fixture(scope="module")
def initial_spread():
    torch.manual_seed(0)
    return held_out_spread(DigitsEmbedder())


def test_a_rescued_run_ends_like_the_scaled_run_and_an_unrescued_one_collapses(
    tmp_path, initial_spread, capsys
):
    plain, _, _, plain_run = train(tmp_path, "plain")
    rescued, loss_fn, _, rescued_run = train(tmp_path, "rescued", on_collapse="rescue")
    scaled, _, _, _ = train(tmp_path, "scaled", scaled=True)
    # Without rescue: collapsed, from the held-out embeddings.
    assert held_out_spread(plain) < 0.05 * initial_spread
    # Rescued: spread out again, and as good a retrieval model as the scaled run.
    assert held_out_spread(rescued) > 0.5 * initial_spread
    assert abs(knn_accuracy(rescued) - knn_accuracy(scaled)) <= 0.02
    assert loss_fn.scaled  # the first remedy
    events = rescued_run.events
    (rescue,) = events[events["kind"] == RESCUED].itertuples()
    collapse = events[events["kind"] == "collapsed"].iloc[0]
    assert rescue.evidence["restored_step"] <= collapse["evidence"]["since_step"]
    assert collapse["step"] <= rescue.step <= collapse["step"] + 10  # the next decision step
    assert "scaled variant" in rescue.message and rescue.evidence["attempt"] == 1
    verdict = cw.analyze(rescued_run)
    # The collapse span closes: recovered once the restored embeddings spread out.
    assert not verdict.collapsed_at_end and verdict.recovered_step is not None
    assert verdict.collapse_spans[0][1] > rescue.step
    # Every medium that lists events lists the rescue: the CLI's JSON and the trackers'.
    assert cli_main(["analyze", str(rescued_run.path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [e["kind"] for e in printed["events"]].count(RESCUED) == 1
    from collapsewatch import trackers

    class Recording:
        kind = "recording"

        def __init__(self) -> None:
            self.events: list = []

        def log_metrics(self, frame) -> None:
            pass

        def log_events(self, events) -> None:
            self.events += events

        def log_snapshot(self, step, embeddings, labels) -> None:
            pass

        def close(self) -> None:
            pass

    sink = Recording()
    trackers.replay(rescued_run.path, [sink])
    assert [e.kind for e in sink.events].count(RESCUED) == 1
    assert cw.analyze(plain_run).collapsed_at_end


def test_remedies_run_in_order_and_the_rescue_gives_up_when_they_are_used_up(tmp_path):
    restored = []

    def nothing(context: RescueContext) -> str:
        restored.append({k: v.clone() for k, v in context.model.state_dict().items()})
        return "changed nothing"

    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in DigitsEmbedder().state_dict().items()}
    _, loss_fn, _, run = train(
        tmp_path, "stubborn", steps=160, on_collapse=lambda opt: Rescue(opt, remedies=[nothing])
    )
    kinds = run.events["kind"].tolist()
    assert kinds.count(RESCUED) == 1 and kinds.count(RESCUE_FAILED) == 1
    assert kinds.index(RESCUED) < kinds.index(RESCUE_FAILED)
    assert not loss_fn.scaled  # the only remedy given was used, nothing else
    # The first rescue restored the state before any training (the collapse began at once).
    assert all(torch.equal(restored[0][k], initial[k]) for k in initial)
    assert cw.analyze(run).collapsed_at_end


def test_halving_the_learning_rate_reaches_the_scheduler(tmp_path):
    def after_scaled(context: RescueContext) -> None:
        return None  # does not apply: the next remedy is tried

    def rescue_with_halving(opt):
        return Rescue(opt, remedies=[after_scaled, cw.rescue.halve_learning_rate])

    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1000)  # noqa: E731
    _, _, opt, run = train(
        tmp_path, "halved", steps=60, on_collapse=rescue_with_halving, scheduler=scheduler
    )
    rescue = run.events[run.events["kind"] == RESCUED].iloc[0]
    assert "0.5 → 0.25" in rescue["message"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.25)


def test_rescue_needs_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match="needs the run's optimizer"):
        cw.watch(DigitsEmbedder(), cw.losses.BatchHardTripletLoss(), on_collapse="rescue")
    with pytest.raises(ValueError, match="are for on_collapse='rescue'"):
        cw.watch(
            DigitsEmbedder(),
            cw.losses.BatchHardTripletLoss(),
            optimizer=torch.optim.SGD(DigitsEmbedder().parameters(), lr=0.1),
        )
    with pytest.raises(TypeError, match="Optimizer"):
        Rescue("sgd")


def _flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().copy()


def _ddp_worker(rank: int, store: str, out: str) -> None:
    """One of two gloo ranks training the collapsing configuration with a rescue."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(DigitsEmbedder())
        np.save(f"{out}/initial-{rank}.npy", _flat(model))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2)

        def record_then_scale(context: RescueContext) -> str | None:
            np.save(f"{out}/restored-{rank}.npy", _flat(context.model))
            return cw.rescue.use_scaled_variant(context)

        rescue = Rescue(opt, remedies=[record_then_scale])
        shard = TRAIN[rank::2]
        batches = random_batches(len(shard), 128, torch.Generator().manual_seed(rank))
        with cw.watch(model, loss_fn, logdir=out, run="ddp-rescue", on_collapse=rescue):
            for _ in range(80):
                index = shard[next(batches)]
                loss = loss_fn(model(IMAGES[index]), LABELS[index])
                opt.zero_grad()
                loss.backward()
                opt.step()
        np.save(f"{out}/final-{rank}.npy", _flat(model))
        with open(f"{out}/scaled-{rank}.txt", "w") as file:
            file.write(str(loss_fn.scaled))
    finally:
        dist.destroy_process_group()


def test_a_rescue_under_ddp_restores_identical_weights_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    load = lambda name: [np.load(tmp_path / f"{name}-{rank}.npy") for rank in (0, 1)]  # noqa: E731
    initial, restored, final = load("initial"), load("restored"), load("final")
    # Rank 0 decided, both ranks restored the same state: the one before training began.
    assert np.array_equal(restored[0], restored[1])
    assert np.array_equal(restored[0], initial[0])
    assert np.array_equal(final[0], final[1])
    assert [(tmp_path / f"scaled-{rank}.txt").read_text() for rank in (0, 1)] == ["True"] * 2
    run = cw.load_run(tmp_path / "ddp-rescue.cwrun")
    assert run.metadata["world_size"] == 2
    assert run.events["kind"].tolist().count(RESCUED) == 1


def test_the_lightning_callback_rescues_with_the_trainers_optimizer(tmp_path, initial_spread):
    pl = pytest.importorskip("lightning.pytorch")
    from collapsewatch.integrations.lightning import CollapseWatchCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.encoder = DigitsEmbedder()
            self.loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2)

        def forward(self, x):
            return self.encoder(x)

        def training_step(self, batch, _):
            x, y = batch
            return self.loss_fn(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    index = torch.cat([TRAIN[torch.randperm(len(TRAIN))[:256]] for _ in range(120)])
    data = torch.utils.data.TensorDataset(IMAGES[index], LABELS[index])
    callback = CollapseWatchCallback("loss_fn", run="lightning-rescue", on_collapse="rescue")
    module = Module()
    pl.Trainer(
        max_steps=120,
        default_root_dir=tmp_path,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, torch.utils.data.DataLoader(data, batch_size=256))
    run = cw.load_run(callback.path)
    assert run.events["kind"].tolist().count(RESCUED) == 1
    assert module.loss_fn.scaled
    module.eval()
    assert held_out_spread(module.encoder) > 0.5 * initial_spread


def test_a_divergence_is_rescued_by_halving_the_learning_rate(tmp_path):
    # A blow-up injected at step 45 (the weights of the last layer set to inf, as an lr
    # spike would): the run diverges, the rescue restores a finite copy and halves the
    # learning rate (the scaled variant does not fit a divergence), and training goes on.
    torch.manual_seed(0)
    model = DigitsEmbedder()
    loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2, scaled=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = random_batches(len(TRAIN), 256, torch.Generator().manual_seed(0))
    with cw.watch(
        model,
        loss_fn,
        logdir=tmp_path,
        run="blow-up",
        every=1,
        optimizer=opt,
        on_collapse="rescue",
    ) as w:
        for step in range(100):
            if step == 45:
                with torch.no_grad():
                    model.layers[-1].weight.fill_(float("inf"))
            index = TRAIN[next(batches)]
            loss = loss_fn(model(IMAGES[index]), LABELS[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    events = cw.load_run(w.path).events
    kinds = events["kind"].tolist()
    assert "diverged" in kinds and kinds.count(RESCUED) == 1
    rescue = events[events["kind"] == RESCUED].iloc[0]
    assert "divergence" in rescue["message"] and "halved the learning rate" in rescue["message"]
    assert rescue["evidence"]["restored_step"] <= 45
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert np.isfinite(embed(model, HELD_OUT)).all()


def test_a_compiled_model_is_rescued_like_the_eager_one(tmp_path):
    """torch.compile wraps the model (an OptimizedModule whose state_dict keys carry
    ``_orig_mod.``): the checkpoint and the restore go through the module that trains."""
    torch.manual_seed(0)
    eager = DigitsEmbedder()
    model = torch.compile(eager, backend="aot_eager")
    loss_fn = cw.losses.BatchHardTripletLoss(margin=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batches = random_batches(len(TRAIN), 256, torch.Generator().manual_seed(0))
    with cw.watch(
        model, loss_fn, logdir=tmp_path, run="compiled", every=1, on_collapse="rescue",
        optimizer=opt,
    ) as w:  # fmt: skip
        for _ in range(STEPS):
            index = TRAIN[next(batches)]
            loss = loss_fn(model(IMAGES[index]), LABELS[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = cw.load_run(w.path)
    assert RESCUED in run.events["kind"].tolist() and loss_fn.scaled
    assert cw.analyze(run).state == "healthy"
    # The truth, from the eager module the compiled one wraps (the same weights).
    assert held_out_spread(eager) > 0.3 and knn_accuracy(eager) > 0.9
