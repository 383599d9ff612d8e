"""Resuming a run numbers its new steps after every loss call the run has seen, so each
recorded row holds the loss of the call that produced it, whatever the recording interval
(issue 21: rows were filed one step early when the last calls were not recorded)."""

from __future__ import annotations

import pytest
import torch

import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors

IMAGES, LABELS = load_digits_tensors()


class CallNumberLoss(torch.nn.Module):
    """A triplet loss whose value is shifted by the number of the call that computed it:
    the row a call is filed under must show that number."""

    def __init__(self, first_call: int = 0) -> None:
        super().__init__()
        self.inner = cw.losses.BatchAllTripletLoss(margin=0.2)
        self.margin = 0.2
        self.calls = first_call

    def forward(self, embeddings, labels):
        loss = self.inner(embeddings, labels) + 1000.0 * self.calls
        self.calls += 1
        return loss


def _fit(model, loss_fn, tmp_path, every, calls, **options):
    generator = torch.Generator().manual_seed(loss_fn.calls)
    with cw.watch(
        model, loss_fn, logdir=tmp_path, run="resumed", every=every, **options
    ) as watcher:
        for _ in range(calls):
            index = torch.randint(0, len(LABELS), (64,), generator=generator)
            loss_fn(model(IMAGES[index]), LABELS[index]).backward()
    return watcher


@pytest.mark.parametrize("every", [1, 4, 3, "auto"])
def test_every_row_holds_the_loss_of_its_own_call_across_a_resume(tmp_path, every):
    torch.manual_seed(0)
    model, loss_fn = DigitsEmbedder(16), CallNumberLoss()
    first = _fit(model, loss_fn, tmp_path, every, 10)
    assert first.step == 10
    second = _fit(model, loss_fn, tmp_path, every, 30, resume=True)
    assert second.step == 40
    run = cw.load_run(second.path)
    assert run.metadata["loss_calls"] == 40
    steps = run.metrics["step"].tolist()
    assert steps == sorted(set(steps)) and steps[0] == 0
    assert any(step >= 10 for step in steps)  # the resumed part was recorded
    for step, loss in zip(steps, run.metrics["loss"], strict=True):
        assert loss // 1000 == step, (step, loss)


def test_a_resumed_run_never_numbers_before_its_last_row(tmp_path):
    # A killed run may have committed rows without its final count of calls.
    torch.manual_seed(0)
    model, loss_fn = DigitsEmbedder(16), CallNumberLoss()
    _fit(model, loss_fn, tmp_path, 1, 6)
    from collapsewatch.store import RunWriter

    writer = RunWriter(tmp_path / "resumed.cwrun", {}, resume=True)
    writer.set_metadata({"loss_calls": 2})  # stale
    writer.commit()
    writer.close()
    resumed = _fit(model, loss_fn, tmp_path, 1, 1, resume=True)
    assert cw.load_run(resumed.path).metrics["step"].tolist() == list(range(7))


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 4, "auto"])
def test_lightnings_second_fit_files_every_row_under_its_own_call(tmp_path, every):
    pl = pytest.importorskip("lightning.pytorch")
    from collapsewatch.integrations.lightning import CollapseWatchCallback

    class Module(pl.LightningModule):
        def __init__(self, loss_fn):
            super().__init__()
            torch.manual_seed(0)
            self.encoder = DigitsEmbedder(16)
            self.loss_fn = loss_fn

        def training_step(self, batch, _):
            x, y = batch
            return self.loss_fn(self.encoder(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    loss_fn = CallNumberLoss()
    data = torch.utils.data.TensorDataset(IMAGES[:640], LABELS[:640])
    loader = torch.utils.data.DataLoader(data, batch_size=64)  # 10 steps an epoch
    callback = CollapseWatchCallback("loss_fn", model="encoder", run="lightning", every=every)
    for epochs in (1, 3):  # a second fit, as in fine-tuning: a new Trainer, the same run
        pl.Trainer(
            max_epochs=epochs,
            default_root_dir=tmp_path,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(Module(loss_fn), loader)
    run = cw.load_run(callback.path)
    assert loss_fn.calls == 40 and run.metadata["loss_calls"] == 40
    steps = run.metrics["step"].tolist()
    assert any(step >= 10 for step in steps)
    for step, loss in zip(steps, run.metrics["loss"], strict=True):
        assert loss // 1000 == step, (step, loss)
