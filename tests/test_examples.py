"""Smoke tests of examples/: each script runs with few steps and does what it says.

Every example runs as a script (``sys.executable examples/NAME.py``, from the repository
root) into a temporary log directory; the assertions read the run file it wrote. The
"skips without the optional package" paths run in-process with the package hidden.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import collapsewatch as cw
from tests.recorded import assert_recorded

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<name>`` as a script from the repository root."""
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def check(result: subprocess.CompletedProcess[str], code: int = 0) -> str:
    """The script's stdout, after asserting its exit status (showing its output if wrong)."""
    assert result.returncode == code, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>`` afresh (module-level imports run again)."""
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def only_run(logdir: Path) -> cw.Run:
    """The single run under ``logdir``."""
    runs = cw.list_runs(logdir)
    assert len(runs) == 1, runs
    return cw.load_run(runs[0])


# ------------------------------------------------------------------- digits_collapse.py
@pytest.fixture(scope="module")
def collapsed_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, cw.Run]:
    """digits_collapse.py without --scaled for 80 steps: (stdout, stderr, its run)."""
    logdir = tmp_path_factory.mktemp("digits")
    result = run_example("digits_collapse.py", "--steps", 80, "--logdir", logdir)
    return check(result), result.stderr, only_run(logdir)


@pytest.mark.slow
def test_digits_collapse_is_flagged(collapsed_digits: tuple[str, str, cw.Run]) -> None:
    stdout, stderr, run = collapsed_digits
    assert_recorded(run, 80)
    assert run.metadata["status"] == "finished" and run.metadata["config"]["scaled"] is False
    verdict = cw.analyze(run.metrics)
    assert verdict.collapsed and verdict.state == "collapsed" and verdict.onset_step < 60
    assert f"run: {run.path}" in stdout
    assert f"verdict: collapsed (collapse flagged at step {verdict.onset_step})" in stdout
    # The live warning is raised once and points at the example's own loss line.
    assert stderr.count("CollapseWarning") == 1 and "digits_collapse.py" in stderr


@pytest.mark.slow
def test_digits_collapse_scaled_stays_healthy(tmp_path: Path) -> None:
    stdout = check(
        run_example("digits_collapse.py", "--scaled", "--steps", 80, "--logdir", tmp_path)
    )
    run = only_run(tmp_path)
    assert_recorded(run, 80)
    assert run.metadata["config"]["scaled"] is True
    assert run.metadata["config"]["lr"] == 0.05
    verdict = cw.analyze(run.metrics)
    assert not verdict.collapsed and verdict.state == "healthy"
    last = run.metrics[run.metrics["step"] >= 70]
    assert last["loss_margin_ratio"].max() < 0.5  # trains off the plateau
    assert "verdict: healthy" in stdout


# --------------------------------------------------------------------- mnist_triplet.py
def write_fake_mnist(folder: Path, n: int = 640) -> None:
    """``n`` MNIST-format images (scikit-learn digits upscaled 8×8 → 24×24, padded to 28×28)
    and labels as raw IDX files: images gzipped, labels not, to read both kinds."""
    images, labels = load_digits(return_X_y=True)
    small = (images[:n] / 16 * 255).round().astype(np.uint8).reshape(n, 8, 8)
    big = np.kron(small, np.ones((3, 3), np.uint8))
    big = np.pad(big, ((0, 0), (2, 2), (2, 2)))
    folder.mkdir(parents=True)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + big.tobytes())
    header = struct.pack(">II", 0x801, n)
    (folder / "train-labels-idx1-ubyte").write_bytes(header + labels[:n].astype(np.uint8).tobytes())


@pytest.mark.slow
def test_mnist_trains_on_raw_idx_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_fake_mnist(data / "MNIST" / "raw")  # torchvision's layout
    logdir = tmp_path / "runs"
    stdout = check(
        run_example("mnist_triplet.py", "--data-dir", data, "--steps", 3, "--logdir", logdir)
    )
    run = only_run(logdir)
    assert list(run.metrics["step"]) == [0, 1, 2]
    assert run.metadata["loss_class"] == "BatchAllTripletLoss" and run.metadata["margin"] == 0.2
    assert run.metadata["model_class"] == "EmbeddingNet"
    # 640 images: a batch of 512, the last 128, then the second epoch starts.
    assert list(run.metrics["batch_size"]) == [512, 128, 512]
    assert set(run.metrics["embedding_dim"]) == {50}
    assert run.metrics["embedding_norm_mean"].to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert "trained 3 steps on 640 images" in stdout


def test_mnist_without_data_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    result = run_example("mnist_triplet.py", "--data-dir", tmp_path, "--logdir", tmp_path / "r")
    check(result, code=2)
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith(f"MNIST not found under {tmp_path}")
    assert "train-images-idx3-ubyte[.gz]" in message and "MNIST/raw" in message
    assert not (tmp_path / "r").exists()  # no run was started


def test_embedding_net_imports_from_the_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.mnist_triplet import EmbeddingNet

    net = EmbeddingNet()
    out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 50)
    assert out.norm(dim=1).detach().numpy() == pytest.approx(1.0, abs=1e-5)
    assert EmbeddingNet(out_dim=8, normalize=False)(torch.rand(2, 1, 28, 28)).shape == (2, 8)


# ---------------------------------------------------------------------- pml_interop.py
@pytest.mark.slow
def test_pml_interop_records_triplet_fractions(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_metric_learning")
    args = ("--steps", 20, "--miner", "semihard", "--logdir", tmp_path)
    stdout = check(run_example("pml_interop.py", *args))
    run = only_run(tmp_path)
    assert_recorded(run, 20)
    assert run.metadata["loss_class"] == "TripletMarginLoss" and run.metadata["margin"] == 0.2
    assert (run.metrics["num_valid_triplets"] > 0).all()
    # Difficulty is counted on the steps its interval picks (all of the first eight).
    m = run.metrics.dropna(subset=["frac_hard"])
    assert list(m["step"][:8]) == list(range(8))
    fractions = m["frac_easy"] + m["frac_semihard"] + m["frac_hard"]
    assert fractions.to_numpy() == pytest.approx(1.0, abs=1e-6)
    assert (m["frac_hard"] > 0).any() and (m["frac_easy"] > 0).all()
    assert "semi-hard" in stdout and "verdict: healthy" in stdout


def test_pml_interop_skips_without_pml(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_metric_learning", None)  # import fails
    example = load_example("pml_interop.py")
    assert example.main(["--steps", "2", "--logdir", str(tmp_path)]) == 0
    assert "skipping: " in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------- lightning_callback.py
@pytest.mark.slow
def test_lightning_callback_writes_a_run(tmp_path: Path) -> None:
    pytest.importorskip("lightning.pytorch")
    stdout = check(run_example("lightning_callback.py", "--steps", 8, "--logdir", tmp_path))
    run = only_run(tmp_path)
    assert list(run.metrics["step"]) == list(range(8))
    assert run.metadata["status"] == "finished"
    assert run.metadata["model_class"] == "DigitsTriplets"
    assert run.metadata["loss_class"] == "BatchHardTripletLoss"
    assert f"run: {run.path} (8 steps)" in stdout


def test_lightning_callback_skips_without_lightning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    example = load_example("lightning_callback.py")
    assert example.main(["--steps", "2", "--logdir", str(tmp_path)]) == 0
    assert "pip install lightning" in capsys.readouterr().out
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ ddp_two_processes.py
@pytest.mark.slow
def test_ddp_two_processes_write_one_run(tmp_path: Path) -> None:
    args = ("--steps", 5, "--batch-size", 64, "--run", "ddp", "--logdir", tmp_path)
    stdout = check(run_example("ddp_two_processes.py", *args))
    run = only_run(tmp_path)  # one file, not one per rank
    assert run.path == tmp_path / "ddp.cwrun"
    assert run.metadata["world_size"] == 2 and run.metadata["status"] == "finished"
    assert list(run.metrics["step"]) == list(range(5))
    assert set(run.metrics["batch_size"]) == {128}  # the global batch: 2 ranks × 64
    assert stdout.count("world_size: 2") == 1  # printed by rank 0 only
    assert "verdict: " in stdout


# ---------------------------------------------------------------------------- posthoc.py
@pytest.mark.slow  # through the collapsed_digits fixture
def test_posthoc_plots_a_saved_run(
    collapsed_digits: tuple[str, str, cw.Run], tmp_path: Path
) -> None:
    run = collapsed_digits[2]
    html = tmp_path / "plot.html"
    stdout = check(run_example("posthoc.py", run.path, "-o", html))
    page = html.read_text()
    assert 'class="plotly-graph-div"' in page
    # plotly.js is inlined, not fetched from a CDN: the file works offline.
    assert '<script src="https://cdn.plot.ly' not in page and len(page) > 1_000_000
    onset = cw.analyze(run.metrics).onset_step
    assert f"verdict: collapsed (collapse spans: steps {onset}–end)" in stdout
    assert f"step {onset} collapsed: Collapse at step {onset}" in stdout
    assert "mean_pairwise_distance" in stdout and f"plot: {html}" in stdout


def test_posthoc_without_a_run_trains_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    example = load_example("posthoc.py")
    assert example.main(["--steps", "40", "--logdir", str(tmp_path)]) == 0
    run = only_run(tmp_path)
    assert_recorded(run, 40)
    html = run.path.with_suffix(".html")  # the default output: next to the run
    assert 'class="plotly-graph-div"' in html.read_text()
    assert "verdict: collapsed" in capsys.readouterr().out


# --------------------------------------------------------------------- optuna_sweep.py
@pytest.mark.slow
def test_optuna_sweep_runs_both_sweeps_over_the_same_grid(tmp_path: Path) -> None:
    # The pruning itself is tested on a real study in tests/test_optuna.py; here the script:
    # both sweeps visit the same configurations, count every step, and the exit status says
    # whether any trial was pruned (or kept) against the held-out truth.
    pytest.importorskip("optuna")
    done = run_example("optuna_sweep.py", "--trials", 3, "--steps", 30, "--logdir", tmp_path)
    assert done.returncode in (0, 1), done.stderr
    lines = done.stdout.strip().splitlines()
    rows = [line.split() for line in lines[1:-1]]
    assert len(rows) == 3 and len({tuple(row[:3]) for row in rows}) == 3
    summary = lines[-1]
    assert "without pruning:" in summary and ", 90 steps; with pruning:" in summary
    wrong = int(summary.rsplit(";", 1)[1].split()[0])
    assert done.returncode == (1 if wrong else 0)
    assert len(list(tmp_path.rglob("*.cwrun"))) == 6
