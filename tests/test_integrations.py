"""The Lightning callback and watch() under torch.distributed (two gloo processes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder, load_digits_tensors
from collapsewatch.losses import functional

RANK_BATCH = {0: 40, 1: 24}  # unequal on purpose: the last batch of an epoch often is


def _rank_batch(rank):
    images, labels = load_digits_tensors()
    g = torch.Generator().manual_seed(100 + rank)
    index = torch.randint(0, len(labels), (RANK_BATCH[rank],), generator=g)
    return images[index], labels[index]


def _ddp_worker(rank, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(DigitsEmbedder(8))
        loss_fn = cw.losses.BatchHardTripletLoss()
        x, y = _rank_batch(rank)
        # difficulty_every=1: under DDP "auto" counts every 10th step, and every row is checked.
        with cw.watch(model, loss_fn, logdir=f"{tmp}/runs", rank_every=1, difficulty_every=1) as w:
            for _ in range(3):
                loss_fn(model(x), y).backward()  # no optimiser step: embeddings stay known
        with torch.no_grad():
            np.save(f"{tmp}/embeddings{rank}.npy", model(x).double().numpy())
        with open(f"{tmp}/path{rank}.json", "w") as f:
            json.dump(str(w.path), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_statistics_describe_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    paths = [json.loads((tmp_path / f"path{r}.json").read_text()) for r in (0, 1)]
    assert paths[0] == paths[1]  # every rank reports the same run
    assert [p.name for p in cw.list_runs(tmp_path / "runs")] == [paths[0].split("/")[-1]]
    run = cw.load_run(paths[0])
    assert run.metadata["world_size"] == 2
    z = [torch.from_numpy(np.load(tmp_path / f"embeddings{r}.npy")) for r in (0, 1)]
    both = torch.cat(z)
    singular = torch.linalg.svdvals(both - both.mean(dim=0))  # the global batch, centred
    p = singular / singular.sum() + 1e-7
    labels = [_rank_batch(r)[1] for r in (0, 1)]
    losses, stats = zip(
        *(
            functional.batch_hard_triplet_loss(zr, yr, return_statistics=True)
            for zr, yr in zip(z, labels, strict=True)
        ),
        strict=True,
    )
    summed = stats[0].values + stats[1].values
    for row in run.metrics.itertuples():
        assert row.embedding_variance == pytest.approx(torch.var(both, dim=0).mean().item())
        assert row.effective_rank == pytest.approx(math.exp(-(p * p.log()).sum().item()))
        assert row.batch_size == 64
        assert row.loss == pytest.approx((losses[0] + losses[1]).item() / 2, rel=1e-5)
        assert row.num_valid_triplets == summed[0].item()
        assert row.frac_hard == pytest.approx(
            functional.ratios_of(summed)[
                list(functional.STATISTIC_RATIOS).index("frac_hard")
            ].item(),
            rel=1e-6,
        )


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from collapsewatch.integrations.lightning import CollapseWatchCallback

    images, labels = load_digits_tensors()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = DigitsEmbedder(16)
            self.loss_fn = cw.losses.BatchHardTripletLoss()

        def forward(self, x):
            return self.encoder(x)

        def training_step(self, batch, _):
            x, y = batch
            return self.loss_fn(self(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", self.loss_fn(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = torch.utils.data.TensorDataset(images[:512], labels[:512])
    loader = torch.utils.data.DataLoader(data, batch_size=64)
    callback = CollapseWatchCallback("loss_fn", run="lightning", every=2)

    def trainer(**options):
        return pl.Trainer(
            max_epochs=1,
            default_root_dir=tmp_path,
            callbacks=[callback],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **options,
        )

    trainer(limit_val_batches=2).fit(Module(), loader, loader)
    assert callback.path == tmp_path / "collapsewatch" / "lightning.cwrun"
    run = cw.load_run(callback.path)
    assert list(run.metrics["step"]) == [0, 2, 4, 6]  # 8 training steps; validation is not
    assert run.metadata["status"] == "finished" and run.metadata["model_class"] == "Module"
    # A second fit() with the same callback (a new Trainer, as in fine-tuning) continues the
    # run instead of failing on the taken name.
    trainer(limit_val_batches=0).fit(Module(), loader)
    run = cw.load_run(callback.path)
    assert list(run.metrics["step"]) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert run.metadata["status"] == "finished" and len(run.metadata["resumed"]) == 1
