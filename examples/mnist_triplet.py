"""MNIST with batch-all triplet loss (the triplet-loss tutorial's setup), watched for collapse.

The setup of the tutorial this project started from: its ``EmbeddingNet`` (three conv blocks,
then an MLP to a 50-D L2-normalised embedding), batches of 512, batch-all triplet loss with
margin 0.2, Adam at lr 1e-4. MNIST is read from ``--data-dir`` and never downloaded: with
torchvision installed its ``MNIST`` dataset is used, otherwise the raw IDX files are read
with numpy. Put ``train-images-idx3-ubyte`` and ``train-labels-idx1-ubyte`` (``.gz`` or
not) in ``--data-dir`` or in ``--data-dir/MNIST/raw`` (torchvision's layout).

    python examples/mnist_triplet.py --data-dir ~/data --steps 200
    python examples/mnist_triplet.py --data-dir ~/data --device cuda --steps 1000

Exits with status 2 and says where the files must be when they are not there.
``EmbeddingNet`` can be imported (``from examples.mnist_triplet import EmbeddingNet``, from
the repository root); importing this module does nothing else.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import collapsewatch as cw

IMAGES = "train-images-idx3-ubyte"
LABELS = "train-labels-idx1-ubyte"


class EmbeddingNet(nn.Module):
    """The tutorial's network: (N, 1, 28, 28) images → (N, ``out_dim``) embeddings.

    Three conv–ReLU–max-pool blocks (64, 128, 256 channels; 28 → 14 → 7 → 3), then
    Linear 2304 → 1024 → 256 → ``out_dim`` with ReLUs between; L2-normalised when
    ``normalize`` is set, so distances lie in [0, 2].
    """

    def __init__(self, out_dim: int = 50, normalize: bool = True) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.neck = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * 3 * 3, 1024),
            nn.ReLU(),
            nn.Linear(1024, 256),
            nn.ReLU(),
            nn.Linear(256, out_dim),
        )
        self.normalize = normalize

    def forward(self, x: Tensor) -> Tensor:
        x = self.neck(self.backbone(x))
        if self.normalize:
            x = nn.functional.normalize(x, dim=1)
        return x


class MnistNotFoundError(FileNotFoundError):
    """Neither torchvision nor the raw IDX files found MNIST under the data directory."""


def _read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzip or not) as a uint8 array of the shape its header gives."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_raw(data_dir: Path, name: str) -> Path | None:
    for folder in (data_dir, data_dir / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(data_dir: Path) -> tuple[Tensor, Tensor]:
    """MNIST's 60,000 training images as (N, 1, 28, 28) float in [0, 1], labels (N,) int64.

    Raises:
        MnistNotFoundError: the files are not under ``data_dir``. Nothing is ever downloaded.
    """
    try:
        from torchvision.datasets import MNIST
    except ImportError:  # optional: the raw files are read below without it
        pass
    else:
        try:
            dataset = MNIST(str(data_dir), train=True, download=False)
            return dataset.data.unsqueeze(1).float() / 255, dataset.targets
        except RuntimeError:  # "Dataset not found", e.g. only the gzipped train files
            pass
    images_path, labels_path = _find_raw(data_dir, IMAGES), _find_raw(data_dir, LABELS)
    if images_path is None or labels_path is None:
        raise MnistNotFoundError(
            f"MNIST not found under {data_dir}: put {IMAGES}[.gz] and {LABELS}[.gz] in "
            f"{data_dir} or in {data_dir / 'MNIST' / 'raw'} (this example never downloads)"
        )
    images, labels = _read_idx(images_path), _read_idx(labels_path)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(f"{images_path} and {labels_path} are not MNIST-shaped images/labels")
    return torch.from_numpy(images.copy()).unsqueeze(1).float() / 255, torch.from_numpy(
        labels.astype(np.int64)
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="MNIST's folder")
    parser.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    parser.add_argument("--logdir", default="runs/examples", help="where the run file goes")
    parser.add_argument("--run", help="run name (default: a timestamped name)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        images, labels = load_mnist(args.data_dir)
    except MnistNotFoundError as error:
        print(error, file=sys.stderr)
        return 2

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dataset = torch.utils.data.TensorDataset(images, labels)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True)
    model = EmbeddingNet(out_dim=50).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = cw.losses.BatchAllTripletLoss(margin=0.2)

    config = {"dataset": "mnist", "batch_size": args.batch_size, "lr": args.lr}
    step = 0
    with cw.watch(model, loss_fn, logdir=args.logdir, run=args.run, config=config) as w:
        while step < args.steps:  # epochs until --steps batches
            for x, y in loader:
                loss = loss_fn(model(x.to(device)), y.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step % 50 == 0:
                    print(f"step {step}: loss {loss.item():.4f}, {w.state}", flush=True)
                if step == args.steps:
                    break

    verdict = cw.analyze(w.path)
    print(f"run: {w.path}")
    print(f"trained {step} steps on {len(labels)} images; verdict: {verdict.state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
