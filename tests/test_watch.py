"""watch(): every loss signature, wrapped models, cadences, clean removal, live actions."""

from __future__ import annotations

import dataclasses
import itertools
import math
import socket
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import collapsewatch as cw
from collapsewatch.adapters import find_margin
from collapsewatch.command import command_name
from collapsewatch.demo import DigitsEmbedder, DigitsRun, load_digits_tensors, start_run
from collapsewatch.losses import functional
from tests import reference

DATA = load_digits_tensors()


def batch(seed: int = 0, n: int = 48):
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(DATA[1]), (n,), generator=g)
    return DATA[0][index], DATA[1][index]


def model(seed: int = 0, dim: int = 16) -> DigitsEmbedder:
    torch.manual_seed(seed)
    return DigitsEmbedder(dim)


def steps_of(path):
    return list(cw.load_run(path).metrics["step"])


def test_bundled_loss_records_the_statistics_of_its_own_pass(tmp_path):
    net, loss_fn = model(), cw.losses.BatchHardTripletLoss(margin=0.3)
    batches = [batch(i) for i in range(4)]
    with cw.watch(net, loss_fn, logdir=tmp_path, run="bundled", rank_every=2) as w:
        for x, y in batches:
            loss_fn(net(x), y).backward()  # no optimiser step: the embeddings stay known
    m = cw.load_run(w.path).metrics
    assert list(m["step"]) == [0, 1, 2, 3]
    assert m["batch_size"].dtype == "int64" and m["embedding_dim"].dtype == "int64"
    for row, (x, y) in zip(m.itertuples(), batches, strict=True):
        with torch.no_grad():
            z = net(x).double()
        want = reference.statistics(z, y, 0.3, "batch_hard", False, "euclidean")
        assert row.loss == pytest.approx(reference.batch_hard(z, y, 0.3, False, "euclidean").item())
        assert row.margin == 0.3
        for name in (
            "frac_easy",
            "frac_semihard",
            "frac_hard",
            "frac_positive_loss",
            "mean_pairwise_distance",
            "hardest_positive_mean",
        ):
            assert getattr(row, name) == pytest.approx(want[name], rel=1e-4, abs=1e-6), name
        assert row.embedding_variance == pytest.approx(torch.var(z, dim=0).mean().item())
        assert row.embedding_norm_mean == pytest.approx(1.0)  # L2-normalised model output
        if row.step % 2 == 0:
            singular = torch.linalg.svdvals(z.double() - z.double().mean(dim=0))  # centred
            p = singular / singular.sum() + 1e-7
            assert row.effective_rank == pytest.approx(
                math.exp(-(p * p.log()).sum().item()), rel=1e-6
            )
        else:
            assert math.isnan(row.effective_rank)


def test_torch_triplet_margin_loss_called_with_anchor_positive_negative(tmp_path):
    net, loss_fn = model(), torch.nn.TripletMarginLoss(margin=0.5)
    a, p, n = (batch(i, n=20)[0] for i in range(3))
    with cw.watch(net, loss_fn, logdir=tmp_path, run="tml") as w:
        loss_fn(net(a), net(p), net(n)).backward()
    row = cw.load_run(w.path).metrics.iloc[0]
    assert w.margin == 0.5
    with torch.no_grad():
        za, zp, zn = net(a).double(), net(p).double(), net(n).double()
    d_ap, d_an = (za - zp).norm(dim=1), (za - zn).norm(dim=1)
    assert row.batch_size == 60  # three model calls make one step's embeddings
    assert row.frac_hard == pytest.approx((d_an < d_ap).double().mean().item(), abs=1e-6)
    assert row.frac_positive_loss == pytest.approx(
        (d_ap - d_an + 0.5 > 0).double().mean().item(), abs=1e-6
    )
    assert row.loss == pytest.approx(torch.relu(d_ap - d_an + 0.5).mean().item(), rel=1e-4)


def test_pytorch_metric_learning_loss(tmp_path):
    pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
    loss_fn = pml_losses.TripletMarginLoss(margin=0.1)  # L2-normalises internally
    net = torch.nn.Linear(64, 8)  # raw, unnormalised outputs
    x, y = batch(1)
    with cw.watch(net, loss_fn, logdir=tmp_path, run="pml") as w:
        loss_fn(net(x), y).backward()
    row = cw.load_run(w.path).metrics.iloc[0]
    with torch.no_grad():
        z = F.normalize(net(x), dim=1).double()
    want = reference.statistics(z, y, 0.1, "batch_all", False, "euclidean")
    assert w.margin == 0.1
    for name in ("frac_easy", "frac_semihard", "frac_hard", "mean_pairwise_distance"):
        assert getattr(row, name) == pytest.approx(want[name], rel=1e-4, abs=1e-6), name


class MarginLoss(torch.nn.Module):
    """Any loss called as (embeddings, labels) with a `margin` attribute."""

    def __init__(self, margin=0.25):
        super().__init__()
        self.margin = margin

    def forward(self, embeddings, labels):
        return functional.batch_all_triplet_loss(embeddings, labels, self.margin)


def test_any_labelled_loss_gets_difficulty_fractions_computed_by_watch(tmp_path):
    net, loss_fn = model(), MarginLoss()
    x, y = batch(2)
    with cw.watch(net, loss_fn, logdir=tmp_path, run="generic") as w:
        loss_fn(embeddings=net(x), labels=y).backward()  # keyword call
    row = cw.load_run(w.path).metrics.iloc[0]
    with torch.no_grad():
        want = reference.statistics(net(x).double(), y, 0.25, "batch_all", False, "euclidean")
    assert row.frac_hard == pytest.approx(want["frac_hard"], rel=1e-4)
    assert row.num_valid_triplets == want["num_valid_triplets"]


def test_a_loss_without_a_margin_is_watched_margin_free(tmp_path):
    class NoMargin(torch.nn.Module):
        def forward(self, embeddings, labels):
            return embeddings.pow(2).sum()

    net, loss_fn, (x, y) = model(), NoMargin(), batch(5)
    with pytest.warns(RuntimeWarning, match="NoMargin has no margin") as caught:
        w = cw.watch(net, loss_fn, logdir=tmp_path, run="free")
    assert len(caught) == 1 and "0.2" not in str(caught[0].message)  # no invented margin
    with w:
        loss_fn(net(x), y)
    row = cw.load_run(w.path).metrics.iloc[0]
    assert w.margin is None and cw.load_run(w.path).metadata["margin"] is None
    for column in ("margin", "loss_margin_ratio", "frac_easy", "frac_semihard"):
        assert math.isnan(row[column]), column
    with torch.no_grad():
        z = net(x).double()
    want = reference.statistics(z, y, 1.0, "batch_all", False, "euclidean")
    assert row.frac_hard == pytest.approx(want["frac_hard"], rel=1e-4)  # needs no margin
    assert row.loss == pytest.approx(z.pow(2).sum().item(), rel=1e-5)
    with cw.watch(net, NoMargin(), logdir=tmp_path, margin=0.7) as w:
        pass
    assert w.margin == 0.7 and cw.load_run(w.path).metadata["margin"] == 0.7


@pytest.mark.parametrize(
    ("attributes", "margin", "plateau"),
    [
        ({"triplet_margin": 5.0}, 5.0, 5.0),  # sentence-transformers
        ({"pos_margin": 0.0, "neg_margin": 1.0}, 1.0, 1.0),  # PML ContrastiveLoss
        ({"pos_margin": 0.2, "neg_margin": 1.0}, 0.8, 1.0),
        ({"margin": 0.3, "smooth_loss": True}, 0.3, math.log1p(math.exp(0.3))),  # PML smooth
        ({"smooth_loss": True}, None, math.log(2)),
    ],
)
def test_margin_and_plateau_are_found_under_other_names(attributes, margin, plateau):
    loss_fn = torch.nn.Module()
    for name, value in attributes.items():
        setattr(loss_fn, name, value)
    spec = find_margin(loss_fn, None)
    assert spec.margin == margin and spec.plateau == pytest.approx(plateau)


def test_bad_arguments(tmp_path):
    net, loss_fn = model(), cw.losses.BatchAllTripletLoss()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        cw.watch(net, lambda e, y: e.sum(), logdir=tmp_path)
    with pytest.raises(ValueError, match="every"):
        cw.watch(net, loss_fn, logdir=tmp_path, every=0)
    with pytest.raises(ValueError, match="on_collapse"):
        cw.watch(net, loss_fn, logdir=tmp_path, on_collapse="explode")
    with pytest.raises(ValueError, match="run name"):
        cw.watch(net, loss_fn, logdir=tmp_path, run="../outside")
    with cw.watch(net, loss_fn, logdir=tmp_path, run="taken"):
        loss_fn(net(batch()[0]), batch()[1])
    hooks = dict(net._forward_hooks)
    with pytest.raises(FileExistsError, match=r"'taken' already exists .*resume=True.*run= out"):
        cw.watch(net, loss_fn, logdir=tmp_path, run="taken")
    assert dict(net._forward_hooks) == hooks  # nothing was attached


@dataclasses.dataclass
class Output:
    embedding: torch.Tensor
    logits: torch.Tensor


class MultiOutput(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.body = kind, model()

    def forward(self, x):
        z = self.body(x)
        logits = z[:, :3]
        return {
            "tuple": (z, logits),
            "dict": {"embedding": z, "logits": logits},
            "dataclass": Output(z, logits),
        }[self.kind]


PICKERS = {
    "tuple": lambda out: out[0],
    "dict": lambda out: out["embedding"],
    "dataclass": lambda out: out.embedding,
}


@pytest.mark.parametrize("kind", ["tuple", "dict", "dataclass"])
def test_embedding_picker_for_structured_outputs(tmp_path, kind):
    net, loss_fn = MultiOutput(kind), cw.losses.BatchHardTripletLoss()
    x, y = batch(3)
    with cw.watch(net, loss_fn, logdir=tmp_path, run=kind, embedding=PICKERS[kind]) as w:
        loss_fn(PICKERS[kind](net(x)), y).backward()
    assert cw.load_run(w.path).metrics.iloc[0].embedding_dim == 16
    if kind == "dict":  # a known key ("embedding") is found without a picker
        with cw.watch(net, loss_fn, logdir=tmp_path, run="dict-unpicked") as w:
            loss_fn(net(x)["embedding"], y)
        assert cw.load_run(w.path).metrics.iloc[0].embedding_dim == 16
        return
    # Unreadable: one warning naming the fix; training goes on, statistics come from the
    # loss's own inputs.
    with cw.watch(net, loss_fn, logdir=tmp_path, run=f"{kind}-unpicked") as w:
        with pytest.warns(RuntimeWarning, match="embedding=") as caught:
            for _ in range(2):
                loss_fn(PICKERS[kind](net(x)), y)
        assert len([c for c in caught if "embedding=" in str(c.message)]) == 1
    assert list(cw.load_run(w.path).metrics["embedding_dim"]) == [16, 16]


def test_removing_the_hooks_leaves_model_and_loss_as_they_were(tmp_path):
    net, loss_fn = model(), cw.losses.BatchHardTripletLoss(statistics=False)
    hooks_before = (
        dict(net._forward_hooks),
        dict(loss_fn._forward_hooks),
        dict(loss_fn._forward_pre_hooks),
    )
    x, y = batch(4)
    plain = loss_fn(net(x), y)
    w = cw.watch(net, loss_fn, logdir=tmp_path, run="hooks")
    watched = loss_fn(net(x), y)
    w.close()
    assert torch.equal(plain, watched)
    assert (
        dict(net._forward_hooks),
        dict(loss_fn._forward_hooks),
        dict(loss_fn._forward_pre_hooks),
    ) == hooks_before
    assert loss_fn.statistics is False
    loss_fn(net(x), y)  # no longer recorded
    assert steps_of(w.path) == [0]
    w.close()  # idempotent


def test_model_wrapped_by_torch_compile(tmp_path):
    net = torch.compile(model(), backend="eager")
    loss_fn = cw.losses.BatchHardTripletLoss()
    x, y = batch(5)
    with cw.watch(net, loss_fn, logdir=tmp_path, run="compiled") as w:
        for _ in range(3):
            loss_fn(net(x), y).backward()
    m = cw.load_run(w.path).metrics
    assert list(m["step"]) == [0, 1, 2] and (m["batch_size"] == 48).all()
    with torch.no_grad():
        z = net(x).double()
    assert m["embedding_variance"].iloc[0] == pytest.approx(torch.var(z, dim=0).mean().item())


def test_autocast(tmp_path):
    net, loss_fn = model(), cw.losses.BatchAllTripletLoss()
    x, y = batch(6)
    with cw.watch(net, loss_fn, logdir=tmp_path, run="autocast") as w:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = net(x)
            loss = loss_fn(z, y)
        assert z.dtype == torch.bfloat16
        loss.backward()
    row = cw.load_run(w.path).metrics.iloc[0]
    assert row.nonfinite_count == 0 and math.isfinite(row.loss)
    assert row.embedding_variance == pytest.approx(
        torch.var(z.detach().double(), dim=0).mean().item()
    )


def test_every_rank_every_and_snapshots(tmp_path):
    net, loss_fn = model(), cw.losses.BatchHardTripletLoss()
    x, y = batch(7)
    with cw.watch(
        net,
        loss_fn,
        logdir=tmp_path,
        run="cadence",
        every=3,
        rank_every=4,
        snapshot_every=5,
        snapshot_size=10,
    ) as w:
        for _ in range(13):
            loss_fn(net(x), y).backward()
    run = cw.load_run(w.path)
    assert list(run.metrics["step"]) == [0, 3, 6, 9, 12]
    ranked = run.metrics.dropna(subset=["effective_rank"])["step"]
    assert list(ranked) == [0, 6, 12]  # recorded steps at least 4 apart
    assert run.snapshot_steps == (0, 6, 12)
    snapshot = run.snapshot(6)
    assert snapshot.embeddings.shape == (10, 16)
    assert list(snapshot.labels) == y[:10].tolist()


def test_validation_calls_are_not_steps(tmp_path):
    net, loss_fn = model(), cw.losses.BatchHardTripletLoss()
    x, y = batch(8)
    with cw.watch(net, loss_fn, logdir=tmp_path, run="val") as w:
        loss_fn(net(x), y).backward()
        with torch.no_grad():
            loss_fn(net(x), y)
        loss_fn(net(x), y).backward()
    assert steps_of(w.path) == [0, 1]


class NaNAfter(torch.nn.Module):
    """Embeddings with NaN rows from the given call on."""

    def __init__(self, start):
        super().__init__()
        self.body, self.calls, self.start = model(), 0, start

    def forward(self, x):
        z = self.body(x)
        self.calls += 1
        if self.calls > self.start:
            z = torch.cat([z[:2] * float("nan"), z[2:]])
        return z


def test_nan_embeddings_are_recorded_not_dropped(tmp_path):
    net, loss_fn = NaNAfter(start=2), cw.losses.BatchHardTripletLoss()
    x, y = batch(9)
    with cw.watch(net, loss_fn, logdir=tmp_path, run="nan") as w:
        for _ in range(4):
            try:
                loss_fn(net(x), y).backward()
            except ValueError as error:  # the bundled loss refuses NaN rows
                assert "rows 0, 1" in str(error)
    run = cw.load_run(w.path)
    m = run.metrics
    assert list(m["step"]) == [0, 1, 2, 3]
    assert list(m["nonfinite_count"]) == [0, 0, 32, 32]
    assert math.isnan(m["loss"].iloc[2])  # the loss never returned
    assert m["batch_size"].iloc[2] == 48 and math.isfinite(m["embedding_variance"].iloc[2])
    assert list(m["nonfinite_loss_count"]) == [0, 0, 1, 1]
    diverged = run.events[run.events["kind"] == "diverged"]
    assert list(diverged["step"]) == [2] and list(diverged["state"]) == ["diverged"]


class NaNBurst(torch.nn.Module):
    """Embeddings with NaN rows at the calls in ``bad`` (0-based), finite otherwise."""

    def __init__(self, bad):
        super().__init__()
        self.body, self.calls, self.bad = model(), 0, set(bad)

    def forward(self, x):
        z = self.body(x)
        if self.calls in self.bad:
            z = torch.cat([z[:1] * float("nan"), z[1:]])
        self.calls += 1
        return z


def test_non_finite_values_at_unrecorded_steps_are_written_with_the_next_recorded_row(tmp_path):
    # every=4 records steps 0, 4, 8, 12; a NaN burst at steps 5–6 (embeddings, and a NaN loss
    # from a loss that does not refuse them) must still show at step 8.
    net, loss_fn = NaNBurst(bad=[5, 6]), torch.nn.TripletMarginLoss(margin=0.2)
    x, _ = batch(2)
    with cw.watch(net, loss_fn, logdir=tmp_path, run="burst", every=4) as w:
        for _ in range(13):
            z = net(x)
            loss_fn(z[:16], z[16:32], z[32:]).backward()
    m = cw.load_run(w.path).metrics
    assert list(m["step"]) == [0, 4, 8, 12]
    assert list(m["nonfinite_count"]) == [0, 0, 2 * 16, 0]  # two rows of D = 16
    assert list(m["nonfinite_loss_count"]) == [0, 0, 2, 0]
    verdict = cw.analyze(w.path)
    assert verdict.diverged_step == 8


def test_on_collapse_actions(tmp_path):
    def collapsing(run, on_collapse):
        return start_run(
            DigitsRun("c", lr=0.5),
            logdir=tmp_path,
            run=run,
            commit_every=5,
            on_collapse=on_collapse,
        )

    trainer = collapsing("raise", "raise")
    with pytest.raises(cw.CollapseError, match="Collapse at step") as raised, trainer.watcher:
        for _ in range(100):
            trainer.step()
    assert raised.value.event.kind == "collapsed"
    assert trainer.watcher.step < 100  # training was stopped
    assert cw.load_run(trainer.watcher.path).metadata["status"] == "failed"

    seen = []
    trainer = collapsing("callback", seen.append)
    with trainer.watcher:
        for _ in range(100):
            trainer.step()
    assert [e.kind for e in seen] == ["collapsed"]

    trainer = collapsing("warn", "warn")
    with warnings.catch_warnings(record=True) as caught, trainer.watcher:
        warnings.simplefilter("always")
        for _ in range(100):
            trainer.step()
    collapse = [w for w in caught if issubclass(w.category, cw.CollapseWarning)]
    assert len(collapse) == 1 and "Collapse at step" in str(collapse[0].message)

    trainer = collapsing("ignore", "ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error", cw.CollapseWarning)
        with trainer.watcher:
            for _ in range(100):
                trainer.step()
    assert trainer.watcher.state == "collapsed"


def test_two_watchers_in_one_process(tmp_path):
    first, second = model(0), model(1)
    loss_a, loss_b = cw.losses.BatchHardTripletLoss(), cw.losses.BatchAllTripletLoss(margin=0.4)
    x, y = batch(10)
    with (
        cw.watch(first, loss_a, logdir=tmp_path, run="a") as wa,
        cw.watch(second, loss_b, logdir=tmp_path, run="b") as wb,
    ):
        for i in range(5):
            loss_a(first(x), y).backward()
            if i % 2 == 0:
                loss_b(second(x), y).backward()
    a, b = cw.load_run(wa.path), cw.load_run(wb.path)
    assert len(a.metrics) == 5 and len(b.metrics) == 3
    assert (a.metrics["margin"] == 0.2).all() and (b.metrics["margin"] == 0.4).all()
    assert a.metrics["embedding_variance"].iloc[0] != b.metrics["embedding_variance"].iloc[0]
    assert sorted(p.name for p in cw.list_runs(tmp_path)) == ["a.cwrun", "b.cwrun"]


def test_metadata_and_default_name(tmp_path):
    net, loss_fn = model(), cw.losses.BatchHardTripletLoss(margin=0.3)
    with cw.watch(net, loss_fn, logdir=tmp_path, config={"lr": 0.1, "note": "x"}) as w:
        pass
    meta = cw.load_run(w.path).metadata
    assert w.path.parent == tmp_path and "batchhardtripletloss" in w.name
    assert meta["config"] == {"lr": 0.1, "note": "x"}
    assert (meta["model_class"], meta["loss_class"]) == ("DigitsEmbedder", "BatchHardTripletLoss")
    assert meta["world_size"] == 1 and meta["margin"] == 0.3
    assert meta["torch_version"] == torch.__version__ and meta["status"] == "finished"


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize(
    "loss_class", [cw.losses.BatchHardTripletLoss, cw.losses.BatchAllTripletLoss]
)
def test_a_watched_cuda_step_never_synchronises(tmp_path, loss_class):
    net = model().cuda()
    loss_fn = loss_class(check_finite=False)
    optimizer = torch.optim.Adam(net.parameters())
    x, y = (t.cuda() for t in batch(11, n=256))
    with cw.watch(
        net, loss_fn, logdir=tmp_path, run="sync", commit_every=4, rank_every=3, snapshot_every=5
    ) as w:
        for _ in range(3):  # warm-up: lazy initialisation may synchronise once
            loss = loss_fn(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(12):
                loss = loss_fn(net(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(cw.load_run(w.path).metrics) == 15


DASHBOARD_SCRIPT = """
import sys, time, urllib.request
import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder
logdir, port = sys.argv[1], int(sys.argv[2])
first = cw.watch(DigitsEmbedder(), cw.losses.BatchHardTripletLoss(), logdir=logdir,
                 dashboard=port)
second = cw.watch(DigitsEmbedder(), cw.losses.BatchAllTripletLoss(), logdir=logdir,
                  dashboard=port)  # the same server is reused, the URL not printed again
from collapsewatch.dashboard_process import RUNNING  # the URL is printed once it answers
assert [d.announced.wait(120) for d in RUNNING.values()] == [True]
for _ in range(240):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
            print("status", page.status, flush=True)
            break
    except OSError:
        time.sleep(0.25)
"""


KILLED_SCRIPT = (
    DASHBOARD_SCRIPT
    + """
import os, signal
os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no cleanup
"""
)


@pytest.mark.slow
@pytest.mark.parametrize("script", [DASHBOARD_SCRIPT, KILLED_SCRIPT], ids=["exits", "killed"])
def test_dashboard_option_serves_from_a_child_process(tmp_path, script):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = result.stdout.splitlines()
    assert lines.count(f"collapsewatch dashboard: http://127.0.0.1:{port}") == 1
    assert "status 200" in lines
    reopen = (
        "collapsewatch: the dashboard stopped with training; reopen it with:"
        f" {command_name()} dashboard {tmp_path}"
    )
    assert lines.count(reopen) == (script == DASHBOARD_SCRIPT)  # a killed process says nothing
    # The server goes away with the training process, however that ends.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        pytest.fail("the dashboard outlived the training process")


class _CosineReportingLoss(torch.nn.Module):
    """A foreign loss (not a TripletLoss) that follows ReportsStatistics: batch-all under the
    cosine distance, which it does not advertise, so watch() would compute Euclidean
    statistics if it recomputed them instead of reading the ones handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.margin = 0.3
        self.statistics, self.difficulty, self.last_stats = False, True, None
        self.switches: list[tuple[bool, bool]] = []

    def forward(self, embeddings, labels):
        self.switches.append((self.statistics, self.difficulty))
        loss, self.last_stats = functional.triplet_loss(
            embeddings,
            labels,
            self.margin,
            mining="batch_all",
            distance="cosine",
            with_statistics=self.statistics,
            with_difficulty=self.difficulty,
        )
        return loss


def test_any_loss_can_hand_watch_its_own_statistics(tmp_path):
    net, loss_fn = model(), _CosineReportingLoss()
    assert isinstance(loss_fn, cw.losses.ReportsStatistics)
    batches = [batch(i) for i in range(6)]
    with cw.watch(net, loss_fn, logdir=tmp_path, run="protocol", every=2, difficulty_every=1) as w:
        for x, y in batches:
            loss_fn(net(x), y).backward()
    # Switched on for the recorded steps only, and put back as it was found.
    assert [on for on, _ in loss_fn.switches] == [True, False] * 3
    assert (loss_fn.statistics, loss_fn.difficulty) == (False, True)
    m = cw.load_run(w.path).metrics
    assert list(m["step"]) == [0, 2, 4]
    for row in m.itertuples():
        x, y = batches[row.step]
        with torch.no_grad():
            z = net(x).double()
        want = reference.statistics(z, y, 0.3, "batch_all", False, "cosine")
        euclidean = reference.statistics(z, y, 0.3, "batch_all", False, "euclidean")
        assert want["mean_pairwise_distance"] != pytest.approx(euclidean["mean_pairwise_distance"])
        for name in ("mean_pairwise_distance", "frac_hard", "frac_semihard", "frac_easy"):
            assert getattr(row, name) == pytest.approx(want[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("every", [1, 4])
def test_the_loss_noise_column_counts_every_loss_call_at_any_interval(tmp_path, every):
    # loss_margin_ratio_step_change: the mean |Δ loss| / margin between consecutive loss
    # calls since the previous recorded row, recorded or not; checked against the losses
    # the training loop itself saw.
    net, loss_fn = model(3), cw.losses.BatchHardTripletLoss(margin=0.2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    with cw.watch(net, loss_fn, logdir=tmp_path, run="noise", every=every) as w:
        for step in range(13):
            x, y = batch(step)
            loss = loss_fn(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    m = cw.load_run(w.path).metrics
    recorded = list(m["step"])
    assert recorded == list(range(0, 13, every))
    change = m["loss_margin_ratio_step_change"].to_numpy()
    assert math.isnan(change[0])  # no call before the first
    for row, (previous, step) in enumerate(itertools.pairwise(recorded), start=1):
        calls = range(previous + 1, step + 1)
        want = sum(abs(losses[t] - losses[t - 1]) for t in calls) / len(calls) / 0.2
        assert change[row] == pytest.approx(want, rel=1e-5), step
