"""WatchOptions: a Watcher exists only validated, whether watch() or its caller builds it."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

import collapsewatch as cw
from collapsewatch.demo import DigitsEmbedder
from collapsewatch.options import WatchOptions
from collapsewatch.watch import Watcher, watch

BAD_OPTIONS = [
    {"every": 0},
    {"difficulty_every": "sometimes"},
    {"overhead": 0},
    {"commit_every": 0},
    {"commit_interval": 0},
    {"rank_every": -1},
    {"snapshot_size": 1.5},
    {"on_collapse": "explode"},
    {"on_collapse": "rescue"},  # without an optimizer
    {"scheduler": object()},  # without on_collapse="rescue"
    {"probe_every": 0},
    {"probe_labels": torch.zeros(3, dtype=torch.long)},  # without a probe
    {"probe": torch.zeros(4, 64), "probe_labels": torch.zeros(3, dtype=torch.long)},
    {"run": "../outside"},
    {"log_to": object()},
]


def _error_of(build) -> tuple[type[BaseException], str]:
    with pytest.raises((ValueError, TypeError)) as caught:
        build()
    return caught.type, str(caught.value)


@pytest.mark.parametrize("bad", BAD_OPTIONS, ids=[", ".join(bad) for bad in BAD_OPTIONS])
def test_a_watcher_built_directly_gets_the_errors_watch_gives(tmp_path: Path, bad: dict) -> None:
    net, loss_fn = DigitsEmbedder(8), cw.losses.BatchHardTripletLoss()
    options = {"logdir": tmp_path, "run": "r", **bad}
    from_watch = _error_of(lambda: watch(net, loss_fn, **options))
    directly = _error_of(lambda: Watcher(net, loss_fn, WatchOptions(**options)))
    assert directly == from_watch
    assert not net._forward_hooks and not loss_fn._forward_pre_hooks  # nothing attached
    assert list(tmp_path.iterdir()) == []  # no run file


def test_a_watcher_needs_modules_and_a_watch_options(tmp_path: Path) -> None:
    net, loss_fn = DigitsEmbedder(8), cw.losses.BatchHardTripletLoss()
    not_a_module = lambda e, y: e.sum()  # noqa: E731
    assert _error_of(lambda: Watcher(net, not_a_module, WatchOptions())) == _error_of(
        lambda: watch(net, not_a_module)
    )
    kind, message = _error_of(lambda: Watcher(net, loss_fn, {"logdir": tmp_path}))  # type: ignore[arg-type]  # the mistake tested
    assert kind is TypeError and "WatchOptions" in message and "dict" in message


def test_watch_takes_exactly_the_options_of_watch_options() -> None:
    """watch()'s keyword arguments and WatchOptions' fields are one list: same names, same
    order, same defaults (so neither can drift from the other)."""
    keywords = [
        (p.name, p.default)
        for p in inspect.signature(watch).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    fields = [(f.name, f.default) for f in dataclasses.fields(WatchOptions) if f.init]
    assert keywords == fields


def test_options_are_frozen_with_their_defaults_filled_in(tmp_path: Path) -> None:
    options = WatchOptions(logdir=str(tmp_path))
    assert options.logdir == tmp_path and options.commit_every == 50
    assert options.action == "warn" and options.sinks == ()
    assert options.detector == cw.DetectorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.commit_every = 0  # type: ignore[misc]  # the mistake tested
    optimizer = torch.optim.SGD(DigitsEmbedder(8).parameters(), lr=0.1)
    rescuing = WatchOptions(on_collapse="rescue", optimizer=optimizer)
    assert isinstance(rescuing.action, cw.Rescue) and rescuing.action.optimizer is optimizer
    assert rescuing.commit_every == 1  # a collapse is acted on within one interval
    # Replacing a field validates again, from the options as given.
    with pytest.raises(ValueError, match="commit_every must be an integer ≥ 1, got 0"):
        dataclasses.replace(rescuing, commit_every=0)
    assert dataclasses.replace(rescuing, commit_every=3).commit_every == 3


def test_a_watcher_built_directly_records_as_watch_does(tmp_path: Path) -> None:
    images = torch.randn(8, 32, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(32) % 4
    paths = []
    for make in (
        lambda net, loss: watch(net, loss, logdir=tmp_path, run="watch", every=2),
        lambda net, loss: Watcher(net, loss, WatchOptions(logdir=tmp_path, run="direct", every=2)),
    ):
        torch.manual_seed(0)
        net, loss_fn = DigitsEmbedder(8), cw.losses.BatchHardTripletLoss()
        with make(net, loss_fn) as watcher:
            for x in images:
                loss_fn(net(x), labels).backward()
        paths.append(watcher.path)
    via_watch, direct = (cw.load_run(path).metrics.drop(columns="time") for path in paths)
    assert list(direct["step"]) == [0, 2, 4, 6]
    assert direct.equals(via_watch)
