"""Real storage faults: a tmpfs that fills, read-only and permission-denied directories, and
two processes racing to create one run. The monitor never raises out of training for them."""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import collapsewatch as cw
from collapsewatch.losses import BatchHardTripletLoss
from collapsewatch.store import RunStorageError, RunWriter, load_run, run_path


def _mount(directory: Path, options: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not permitted'})")


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (a tmpfs), unmounted afterwards."""
    directory = tmp_path / "disk"
    _mount(directory, "size=2m")
    yield directory
    subprocess.run(["umount", "-l", str(directory)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def _train(watcher_loss, model, steps, generator):
    for _ in range(steps):
        x = torch.randn(32, 8, generator=generator)
        y = torch.arange(32) % 4
        watcher_loss(model(x), y).backward()


def _watch(logdir, run="run", **options):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    loss = BatchHardTripletLoss(margin=0.2)
    watcher = cw.watch(
        model,
        loss,
        logdir=logdir,
        run=run,
        every=1,
        snapshot_every=0,
        commit_every=10,
        rank_every=0,
        **options,
    )
    return watcher, model, loss


def test_a_disk_that_fills_and_frees_loses_no_row(small_disk):
    generator = torch.Generator().manual_seed(1)
    watcher, model, loss = _watch(small_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(loss, model, 40, generator)
        watcher.flush(wait=True)
        filler = _fill(small_disk)
        _train(loss, model, 60, generator)  # every commit of these fails: disk full
        watcher.flush(wait=True)
        assert watcher._pipeline._pending.rows == 60
        filler.unlink()  # space comes back: the next commit writes the held rows too
        _train(loss, model, 20, generator)
        watcher.close()
    full = [str(w.message) for w in caught if "disk is full" in str(w.message)]
    assert len(full) == 1 and str(watcher.path) in full[0]
    assert not [w for w in caught if "closing run" in str(w.message)]
    run = load_run(watcher.path)
    assert run.metrics["step"].tolist() == list(range(120))
    assert run.metadata["status"] == "finished"


def test_a_disk_full_at_close_is_one_warning_not_an_exception(small_disk):
    generator = torch.Generator().manual_seed(2)
    after_the_block = False
    with pytest.warns(RuntimeWarning) as caught:
        with _watch(small_disk)[0] as watcher:
            model, loss = watcher.model, watcher.loss_fn
            _train(loss, model, 30, generator)
            watcher.flush(wait=True)
            _fill(small_disk)
            _train(loss, model, 25, generator)
        after_the_block = True  # e.g. torch.save(model): the user's code goes on
    assert after_the_block
    closing = [str(w.message) for w in caught if "closing run" in str(w.message)]
    assert len(closing) == 1
    assert str(watcher.path) in closing[0]
    assert "25 recorded steps (steps 30-54) were not written (the disk is full)" in closing[0]
    # What was committed before the disk filled is intact and readable.
    assert load_run(watcher.path).metrics["step"].tolist() == list(range(30))


def test_a_start_on_a_full_disk_names_the_cause_and_leaves_nothing(small_disk):
    filler = _fill(small_disk)
    with pytest.raises(RunStorageError, match="disk is full") as raised:
        _watch(small_disk, run="named")
    assert str(run_path(small_disk, "named")) in str(raised.value)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    filler.unlink()
    watcher = _watch(small_disk, run="named")[0]  # the name is free
    watcher.close()
    assert load_run(watcher.path).metadata["status"] == "finished"


def test_a_read_only_file_system_is_named(tmp_path):
    directory = tmp_path / "ro"
    _mount(directory, "ro,size=1m")
    try:
        with pytest.raises(RunStorageError, match="the file system is read-only") as raised:
            RunWriter(run_path(directory, "run"), {})
        assert str(run_path(directory, "run")) in str(raised.value)
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def _create_as(user: int | None, path: str, results) -> None:
    if user is not None:  # root writes anywhere: try it as an unprivileged user
        os.setgid(user)
        os.setuid(user)
    try:
        RunWriter(path, {})
        results.put("created")
    except RunStorageError as error:
        results.put(str(error))


def test_a_permission_denied_directory_is_named():
    directory = Path(tempfile.mkdtemp(prefix="collapsewatch-locked-", dir="/tmp"))
    try:
        directory.chmod(0o555)
        target = str(directory / "run.cwrun")
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        user = 65534 if os.geteuid() == 0 else None
        child = context.Process(target=_create_as, args=(user, target, results))
        child.start()
        child.join(30)
        assert results.get(timeout=5).startswith(
            f"cannot create run file {target!r}: permission denied"
        )
        assert list(directory.iterdir()) == []
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory)


def _race(path: str, start, results) -> None:
    start.wait()
    try:
        RunWriter(path, {"who": os.getpid()}).close()
        results.put("won")
    except Exception as error:
        results.put(type(error).__name__)


def test_two_processes_racing_on_one_name_one_wins_one_gets_file_exists(tmp_path):
    context = multiprocessing.get_context("fork")
    for trial in range(25):
        path = str(run_path(tmp_path, f"race{trial}"))
        start, results = context.Event(), context.Queue()
        racers = [context.Process(target=_race, args=(path, start, results)) for _ in range(2)]
        for racer in racers:
            racer.start()
        start.set()
        for racer in racers:
            racer.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in racers)
        assert outcomes == ["FileExistsError", "won"], f"trial {trial}: {outcomes}"
        run = load_run(path)
        assert run.metadata["status"] == "finished"
        assert run.metadata["who"] in {r.pid for r in racers}
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".cwrun")]
    assert leftovers == []
