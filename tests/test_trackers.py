"""watch(log_to=...) and `collapsewatch export`, read back from each tracker's own files.

One collapsing digits run (batch-hard at lr 0.5) is logged live to TensorBoard, W&B in
offline mode, MLflow on a local SQLite store and a plain callable; every tracker's files are
read back with the tracker's own reader and compared with the run file.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import wandb
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
from torch.utils.tensorboard import SummaryWriter
from wandb.proto import wandb_internal_pb2

import collapsewatch as cw
from collapsewatch.cli import main
from collapsewatch.demo import DigitsEmbedder, DigitsRun, load_digits_tensors, start_run
from collapsewatch.trackers import PREFIX, require

STEPS = 120
DATA = load_digits_tensors()


def metric_columns(metrics: pd.DataFrame) -> list[str]:
    """The columns a tracker receives: those measured at least once (NaN is left out, so
    the probe columns of a run without a probe send nothing)."""
    return [c for c in metrics.columns if c not in ("step", "time") and metrics[c].notna().any()]


def measured(metrics: pd.DataFrame, column: str) -> pd.DataFrame:
    """The rows where ``column`` was measured: what a tracker should have received."""
    values = metrics[["step", "time", column]].astype({column: "float64"})
    return values[values[column].notna()]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    received = []
    with pytest.MonkeyPatch.context() as patch:
        # Offline and local only: no network, no login, nothing outside tmp.
        patch.setenv("WANDB_MODE", "offline")
        # wandb-core puts its own debug logs under XDG_CACHE_HOME.
        for variable in (
            "WANDB_DIR",
            "WANDB_CACHE_DIR",
            "WANDB_CONFIG_DIR",
            "WANDB_DATA_DIR",
            "XDG_CACHE_HOME",
        ):
            patch.setenv(variable, str(root))
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        writer = SummaryWriter(root / "tensorboard")
        wandb_run = wandb.init(project="collapsewatch-test", settings=wandb.Settings(console="off"))
        with mlflow.start_run() as mlflow_run:
            trainer = start_run(
                DigitsRun("batch-hard", lr=0.5),
                logdir=root / "runs",
                data=DATA,
                on_collapse="ignore",
                every=1,
                rank_every=25,
                snapshot_every=50,
                snapshot_size=64,
                log_to=[writer, wandb_run, mlflow, lambda metrics, step: received.append(step)],
            )
            with trainer.watcher:
                for _ in range(STEPS):
                    trainer.step()
        writer.close()
        wandb_dir = Path(wandb_run.dir).parent
        wandb_run.finish()
        yield {
            "root": root,
            "run": cw.load_run(trainer.watcher.path),
            "tensorboard": root / "tensorboard",
            "wandb": wandb_dir,
            "mlflow": mlflow.MlflowClient(),
            "mlflow_run_id": mlflow_run.info.run_id,
            "received": received,
        }


def test_the_run_collapsed_and_records_its_trackers(tracked):
    run = tracked["run"]
    assert "collapsed" in run.events["kind"].tolist()
    assert list(run.metadata["log_to"]) == ["tensorboard", "wandb", "mlflow", "callable"]
    # effective_rank is measured every 25 steps only: the NaN rows test the skipping.
    assert run.metrics["effective_rank"].isna().sum() > STEPS / 2
    assert list(run.snapshot_steps) == [0, 50, 100]


def read_tensorboard(logdir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_has_the_run_files_curves_events_and_projector(tracked):
    run, board = tracked["run"], read_tensorboard(tracked["tensorboard"])
    assert sorted(board.Tags()["scalars"]) == sorted(
        PREFIX + c for c in metric_columns(run.metrics)
    )
    for column in metric_columns(run.metrics):
        expected = measured(run.metrics, column)
        scalars = board.Scalars(PREFIX + column)
        assert [s.step for s in scalars] == expected["step"].tolist()
        # TensorBoard stores float32 scalars, with the run's own wall times.
        assert [s.value for s in scalars] == expected[column].astype(np.float32).tolist()
        assert [s.wall_time for s in scalars] == expected["time"].tolist()
    texts = board.Tensors(PREFIX + "events/text_summary")
    assert [t.step for t in texts] == run.events["step"].tolist()
    for text, event in zip(texts, run.events.itertuples(), strict=True):
        body = text.tensor_proto.string_val[0].decode()
        assert event.kind in body and event.message in body and event.suggestion in body

    config = projector(tracked["tensorboard"])
    assert len(config.embeddings) == len(run.snapshot_steps)
    for embedding, step in zip(config.embeddings, run.snapshot_steps, strict=True):
        snapshot = run.snapshot(step)
        folder = tracked["tensorboard"] / embedding.tensor_path
        vectors = np.loadtxt(folder, dtype=np.float32, delimiter="\t")
        np.testing.assert_array_equal(vectors, snapshot.embeddings)
        labels = (tracked["tensorboard"] / embedding.metadata_path).read_text().split()
        assert labels == [str(label) for label in snapshot.labels.tolist()]


def projector(logdir: Path) -> ProjectorConfig:
    return text_format.Parse((logdir / "projector_config.pbtxt").read_text(), ProjectorConfig())


def wandb_records(run_dir: Path) -> list[wandb_internal_pb2.Record]:
    """The records of an offline run's ``.wandb`` file.

    It is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks of chunks with
    a 7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST) of ``Record`` protos;
    wandb ships the protos but no reader any more.
    """
    (path,) = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_offline_run_has_the_curves_alerts_and_tables(tracked):
    run, records = tracked["run"], wandb_records(tracked["wandb"])
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    metric_rows = [r for r in rows if PREFIX + "embeddings/path" not in r]
    assert [r[PREFIX + "step"] for r in metric_rows] == run.metrics["step"].tolist()
    for column in metric_columns(run.metrics):
        expected = measured(run.metrics, column)
        logged = [
            (r[PREFIX + "step"], r[PREFIX + column]) for r in metric_rows if PREFIX + column in r
        ]
        assert logged == list(zip(expected["step"], expected[column], strict=True))

    alerts = [r.alert for r in records if r.WhichOneof("record_type") == "alert"]
    assert [a.title for a in alerts] == [
        f"collapsewatch: {e.kind} at step {e.step}" for e in run.events.itertuples()
    ]
    collapsed = next(a for a in alerts if "collapsed at" in a.title)
    assert collapsed.level == "ERROR" and "scaled" in collapsed.text

    tables = [r for r in rows if PREFIX + "embeddings/path" in r]
    assert [t[PREFIX + "step"] for t in tables] == list(run.snapshot_steps)
    for table in tables:
        snapshot = run.snapshot(table[PREFIX + "step"])
        content = json.loads(
            (tracked["wandb"] / "files" / table[PREFIX + "embeddings/path"]).read_text()
        )
        assert content["columns"] == [
            "label",
            *(f"d{i}" for i in range(snapshot.embeddings.shape[1])),
        ]
        assert [row[0] for row in content["data"]] == snapshot.labels.tolist()
        assert [row[1:] for row in content["data"]] == snapshot.embeddings.tolist()


def test_mlflow_run_has_the_curves_and_the_collapse_tags(tracked):
    run, client, run_id = tracked["run"], tracked["mlflow"], tracked["mlflow_run_id"]
    for column in metric_columns(run.metrics):
        expected = measured(run.metrics, column)
        history = sorted(client.get_metric_history(run_id, PREFIX + column), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == list(
            zip(expected["step"], expected[column], strict=True)
        )
        assert [m.timestamp for m in history] == [round(t * 1000) for t in expected["time"]]
    tags = client.get_run(run_id).data.tags
    for event in run.events.itertuples():
        tag = tags[f"{PREFIX}event/{event.step}/{event.kind}"]
        assert event.message in tag
    assert tags[PREFIX + "state"] == run.events["state"].iloc[-1]


def test_a_callable_gets_every_recorded_step(tracked):
    assert tracked["received"] == tracked["run"].metrics["step"].tolist()


def test_a_callable_gets_the_prefixed_metrics_without_nan(tmp_path):
    received = {}
    trainer = start_run(
        DigitsRun("callable"),
        logdir=tmp_path,
        data=DATA,
        on_collapse="ignore",
        rank_every=5,
        log_to=lambda metrics, step: received.setdefault(step, metrics),
    )
    with trainer.watcher:
        for _ in range(12):
            trainer.step()
    metrics = cw.load_run(trainer.watcher.path).metrics
    for row in metrics.to_dict("records"):
        step = row.pop("step")
        del row["time"]
        assert received[step] == {PREFIX + k: float(v) for k, v in row.items() if not pd.isna(v)}
    assert PREFIX + "effective_rank" in received[5] and PREFIX + "effective_rank" not in received[6]


def test_a_failing_sink_warns_once_and_neither_training_nor_the_run_file_stops(tmp_path):
    def broken(metrics, step):
        raise ConnectionError("tracker unreachable")

    received = []
    trainer = start_run(
        DigitsRun("failing"),
        logdir=tmp_path,
        data=DATA,
        on_collapse="ignore",
        every=1,
        commit_every=5,
        log_to=[broken, lambda metrics, step: received.append(step)],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trainer.watcher:
            for _ in range(30):
                trainer.step()
    failures = [w for w in caught if "logging to callable failed" in str(w.message)]
    assert len(failures) == 1 and "tracker unreachable" in str(failures[0].message)
    assert "run file is unaffected" in str(failures[0].message)
    run = cw.load_run(trainer.watcher.path)
    assert run.metrics["step"].tolist() == list(range(30)) == received
    assert run.metadata["status"] == "finished"


def test_unsupported_targets_are_rejected_before_anything_is_written(tmp_path):
    model, loss_fn = DigitsEmbedder(), cw.losses.BatchHardTripletLoss()
    with pytest.raises(TypeError, match=r"log_to does not support builtins\.int"):
        cw.watch(model, loss_fn, logdir=tmp_path, run="bad", log_to=[lambda m, s: None, 42])
    with pytest.raises(TypeError, match=r"builtins\.str"):
        cw.watch(model, loss_fn, logdir=tmp_path, run="bad", log_to="tensorboard")
    assert mlflow.active_run() is None
    with pytest.raises(ValueError, match=r"mlflow\.start_run\(\)"):
        cw.watch(model, loss_fn, logdir=tmp_path, run="bad", log_to=mlflow)
    assert list(tmp_path.iterdir()) == []
    # The hooks were never attached: the loss still trains without a watcher.
    loss_fn(model(DATA[0][:32]), DATA[1][:32]).backward()


def test_export_to_tensorboard_replays_through_the_live_sink(tracked, tmp_path):
    run = tracked["run"]
    assert main(["export", str(run.path), "--to", "tensorboard", str(tmp_path / "tb")]) == 0
    live, exported = read_tensorboard(tracked["tensorboard"]), read_tensorboard(tmp_path / "tb")
    assert exported.Tags()["scalars"] == live.Tags()["scalars"]
    for tag in live.Tags()["scalars"]:
        assert exported.Scalars(tag) == live.Scalars(tag)
    text = PREFIX + "events/text_summary"
    assert [(t.step, t.wall_time, t.tensor_proto.string_val) for t in exported.Tensors(text)] == [
        (t.step, t.wall_time, t.tensor_proto.string_val) for t in live.Tensors(text)
    ]
    config = projector(tracked["tensorboard"])
    assert projector(tmp_path / "tb") == config and len(config.embeddings) == 3
    for embedding in config.embeddings:
        for name in (embedding.tensor_path, embedding.metadata_path):
            exported_file = (tmp_path / "tb" / name).read_text()
            assert exported_file == (tracked["tensorboard"] / name).read_text()


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_export_metrics_table(tracked, tmp_path, kind):
    run, output = tracked["run"], tmp_path / "out" / f"metrics.{kind}"
    assert main(["export", str(run.path), "--to", kind, str(output)]) == 0
    table = pd.read_csv(output) if kind == "csv" else pd.read_parquet(output)
    pd.testing.assert_frame_equal(table, run.metrics, check_dtype=kind == "parquet")


def test_a_missing_extra_is_named(tracked, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'collapsewatch\[parquet\]'"):
        require("pyarrow", "parquet")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    run = str(tracked["run"].path)
    assert main(["export", run, "--to", "tensorboard", str(tmp_path / "tb")]) == 2
    assert "pip install 'collapsewatch[tensorboard]'" in capsys.readouterr().err
    assert main(["export", run, "--to", "parquet", str(tmp_path / "m.parquet")]) == 2
    assert "pip install 'collapsewatch[parquet]'" in capsys.readouterr().err
    assert not (tmp_path / "m.parquet").exists()


def test_importing_collapsewatch_imports_no_tracker():
    code = (
        "import sys, collapsewatch, collapsewatch.trackers, collapsewatch.cli; "
        "print([m for m in ('tensorboard', 'wandb', 'mlflow') if m in sys.modules])"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"
