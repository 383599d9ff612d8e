"""CollapseWatchCallback end to end: a tiny random BERT as a Sentence Transformer, trained
on sentences made from scikit-learn's digits by SentenceTransformerTrainer and by the plain
HF Trainer, offline (a local WordPiece vocabulary; nothing is downloaded)."""

from __future__ import annotations

import functools
import math
import os

# Before transformers is imported: its hub client reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer import losses, modules  # noqa: E402
from sentence_transformers.sentence_transformer.trainer import (  # noqa: E402
    SentenceTransformerTrainer,
)
from sentence_transformers.sentence_transformer.training_args import (  # noqa: E402
    SentenceTransformerTrainingArguments,
)
from sklearn.datasets import load_digits  # noqa: E402

import collapsewatch as cw  # noqa: E402
from collapsewatch.adapters import find_distance, find_margin  # noqa: E402
from collapsewatch.columns import PROBE_COLUMNS  # noqa: E402
from collapsewatch.integrations.sentence_transformers import CollapseWatchCallback  # noqa: E402
from collapsewatch.statistics import probe_statistics  # noqa: E402

Distances = losses.BatchHardTripletLossDistanceFunction

# Batch-hard at a high learning rate pulls every sentence onto one point (loss at the
# margin 5 from step ~50); batch-all at a lower one spreads them out.
COLLAPSING = (losses.BatchHardTripletLoss, 5e-2)
HEALTHY = (losses.BatchAllTripletLoss, 5e-3)
STEPS = 120


def _digit_sentence(pixels) -> str:
    """One word per inked pixel: its index and whether it is dark or light."""
    return " ".join(f"p{i}{'h' if v >= 8 else 'l'}" for i, v in enumerate(pixels) if v >= 4)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A randomly initialised one-layer BERT and its WordPiece tokenizer, saved locally."""
    root = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += [f"p{i}{shade}" for i in range(64) for shade in "hl"]
    # vocab= (a mapping): transformers 5 ignores vocab_file= and would tokenise every
    # sentence to [UNK]s, leaving only the sentence lengths to learn from.
    tokenizer = transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    assert len(tokenizer) == len(words)
    assert (
        tokenizer.unk_token_id not in tokenizer(_digit_sentence(load_digits().data[0]))["input_ids"]
    )
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    return root / "bert"


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    sentences = [_digit_sentence(pixels) for pixels in data.data]
    return datasets.Dataset.from_dict({"sentence": sentences, "label": data.target.tolist()})


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sentence_model(bert_dir) -> SentenceTransformer:
    transformer = modules.Transformer(str(bert_dir), max_seq_length=72)
    pooling = modules.Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


class Recorder(transformers.TrainerCallback):
    """Stands for a report_to integration: keeps a copy of every log it is shown."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


class TripletModel(torch.nn.Module):
    """How a Sentence Transformer trains under the plain HF Trainer: forward returns the loss."""

    def __init__(self, encoder, loss_fn):
        super().__init__()
        self.encoder = encoder
        self.loss_fn = loss_fn

    def forward(self, labels, **features):
        return {"loss": self.loss_fn([features], labels)}


def _train(
    tmp_path,
    kind,
    model,
    loss,
    dataset,
    callbacks,
    steps=STEPS,
    lr=5e-2,
    eval_dataset=None,
    **arguments,
):
    """Train with SentenceTransformerTrainer ("st") or the plain HF Trainer ("hf")."""
    options = {
        "output_dir": str(tmp_path / "out"),
        "max_steps": steps,
        "per_device_train_batch_size": 32,
        "learning_rate": lr,
        "lr_scheduler_type": "constant",
        "logging_steps": 10,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
        **arguments,
    }
    if kind == "st":
        trainer = SentenceTransformerTrainer(
            model=model,
            args=SentenceTransformerTrainingArguments(**options),
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            loss=loss,
            callbacks=callbacks,
        )
    else:

        def collate(rows):
            features = model.tokenize([row["sentence"] for row in rows])
            return {**features, "labels": torch.tensor([row["label"] for row in rows])}

        trainer = transformers.Trainer(
            model=TripletModel(model, loss),
            args=transformers.TrainingArguments(remove_unused_columns=False, **options),
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            data_collator=collate,
            callbacks=callbacks,
        )
    trainer.train()
    return trainer


@pytest.mark.parametrize("kind", ["st", "hf"])
@pytest.mark.parametrize(
    ("configuration", "expected"), [(COLLAPSING, "collapsed"), (HEALTHY, "healthy")]
)
def test_verdict_and_logs(tmp_path, bert_dir, digits, kind, configuration, expected):
    loss_class, lr = configuration
    model = _sentence_model(bert_dir)
    loss = loss_class(model)
    recorder = Recorder()
    # The recorder comes first, as the trainer's own report_to callbacks do: it must see
    # the metrics all the same.
    callback = CollapseWatchCallback(run="run", on_collapse="ignore", every=1)
    trainer = _train(tmp_path, kind, model, loss, digits, [recorder, callback], lr=lr)

    assert callback.path == tmp_path / "out" / "collapsewatch" / "run.cwrun"
    run = cw.load_run(callback.path)
    verdict = cw.analyze(callback.path)
    assert verdict.state == expected == run.metadata["state"]
    assert list(run.metrics["step"]) == list(range(STEPS))  # every loss call, step 0 too
    assert run.metrics["mean_pairwise_distance"].notna().all()
    # Labels found inside the loss call: triplets counted on every step, difficulty on
    # (at least) the first eight, before its interval is chosen.
    assert run.metrics["num_valid_triplets"].gt(0).all()
    assert run.metrics["frac_hard"].head(8).notna().all()
    # Found by the callback, not passed by the test.
    assert run.metadata["margin"] == 5.0
    assert run.metadata["distance"] == "euclidean"
    assert run.metadata["loss_class"] == loss_class.__name__
    assert run.metadata["model_class"] == "SentenceTransformer"
    assert run.metadata["config"]["margin_attribute"].endswith(".triplet_margin")
    assert run.metadata["config"]["distance_metric"] == "euclidean_distance"
    assert run.metadata["config"]["embedding_key"] == "sentence_embedding"
    assert run.metadata["status"] == "finished"

    logged = [log for log in recorder.logs if "loss" in log]  # the training logs
    assert len(logged) == STEPS // 10  # logging_steps=10
    assert all("collapsewatch/step" in log for log in recorder.logs)  # every log has them
    metrics = run.metrics.set_index("step")
    for log in logged:
        row = metrics.loc[log["collapsewatch/step"]]
        assert log["collapsewatch/mean_pairwise_distance"] == pytest.approx(
            row["mean_pairwise_distance"]
        )
        assert log["collapsewatch/loss"] == pytest.approx(row["loss"])
    # Each log reports the last step recorded before it: the logs are current.
    assert logged[-1]["collapsewatch/step"] == STEPS - 1
    assert logged[-1]["collapsewatch/state"] == {"collapsed": 2, "healthy": 0}[expected]
    history = [h for h in trainer.state.log_history if "collapsewatch/state" in h]
    assert history[-1]["collapsewatch/state"] == logged[-1]["collapsewatch/state"]
    if expected == "collapsed":
        assert 30 <= verdict.onset_step <= 90
    else:
        # Not vacuous: the embeddings spread out, so they had a spread to lose.
        distances = run.metrics["mean_pairwise_distance"]
        assert verdict.events == () and distances.max() > 2 * distances.iloc[0]


class BundledBatchHard(torch.nn.Module):
    """losses.BatchHardTripletLoss's objective, computed by collapsewatch's own loss from the
    embeddings (the call watch() has always understood)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.triplet = cw.losses.BatchHardTripletLoss(margin=5.0)

    def forward(self, sentence_features, labels):
        return self.triplet(self.model(sentence_features[0])["sentence_embedding"], labels)


def test_onset_matches_the_bundled_loss(tmp_path, bert_dir, digits):
    onsets = []
    for name, make_loss in [
        ("st", losses.BatchHardTripletLoss),
        ("bundled", BundledBatchHard),
    ]:
        model = _sentence_model(bert_dir)
        loss = make_loss(model)
        watched = loss.triplet if name == "bundled" else None
        callback = CollapseWatchCallback(watched, run=name, on_collapse="ignore", every=1)
        _train(tmp_path / name, "st", model, loss, digits, [callback])
        onsets.append(cw.analyze(callback.path).onset_step)
    assert None not in onsets and abs(onsets[0] - onsets[1]) <= 10, onsets


def test_on_collapse_stop_ends_training_and_reports_to_tensorboard(tmp_path, bert_dir, digits):
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = _sentence_model(bert_dir)
    callback = CollapseWatchCallback(run="stop", on_collapse="stop")
    with pytest.warns(cw.CollapseWarning, match="Stopping training"):
        trainer = _train(
            tmp_path,
            "st",
            model,
            losses.BatchHardTripletLoss(model),
            digits,
            [callback],
            steps=400,
            report_to=["tensorboard"],
        )
    onset = cw.analyze(callback.path).onset_step
    assert callback.collapse is not None and callback.collapse.step == onset
    # Acted on at the first log after the onset (logging_steps=10), then one more step.
    assert onset < trainer.state.global_step <= onset + 12
    (events,) = (tmp_path / "out").rglob("events.out.tfevents.*")
    scalars = tensorboard.EventAccumulator(str(events)).Reload()
    # TensorBoardCallback comes before ours in the trainer's list, yet got the metrics.
    assert {"train/collapsewatch/mean_pairwise_distance", "train/collapsewatch/state"} <= set(
        scalars.Tags()["scalars"]
    )
    assert scalars.Scalars("train/collapsewatch/state")[-1].value == 2


def test_found_margin_and_distance():
    """watch() reads sentence-transformers' margin and distance_metric by itself."""
    model = torch.nn.Linear(2, 2)  # never called: the losses only store it

    def distance(loss):
        return find_distance(loss, None).distance

    assert distance(losses.BatchHardTripletLoss(model)) == "euclidean"
    for metric, expected in [
        (Distances.eucledian_distance, "euclidean"),
        (Distances.cosine_distance, "cosine"),
        (functools.partial(Distances.euclidean_distance, squared=True), "squared_euclidean"),
    ]:
        assert distance(losses.BatchAllTripletLoss(model, distance_metric=metric)) == expected
    with pytest.raises(ValueError, match="distance='euclidean'"):
        distance(losses.BatchHardTripletLoss(model, distance_metric=lambda e: e @ e.T))
    spec = find_margin(losses.BatchHardTripletLoss(model, margin=0.3), None)
    assert (spec.margin, spec.plateau) == (0.3, 0.3) and spec.source.endswith("triplet_margin")
    assert find_margin(losses.BatchSemiHardTripletLoss(model, margin=2), None).margin == 2.0
    # It inherits triplet_margin=5 but computes softplus(d_ap − d_an): no margin, and a
    # collapsed batch sits at ln 2.
    soft = find_margin(losses.BatchHardSoftMarginTripletLoss(model), None)
    assert soft.margin is None and soft.plateau == pytest.approx(math.log(2))
    assert find_margin(torch.nn.MSELoss(), None).plateau is None


def test_which_loss_to_watch(tmp_path, bert_dir, digits):
    small = digits.select(range(128))
    # Two Dataset objects: sentence-transformers tags each with its name in place.
    dataset = datasets.DatasetDict({"hard": small, "all": digits.select(range(128, 256))})
    model = _sentence_model(bert_dir)
    loss = {"hard": losses.BatchHardTripletLoss(model), "all": losses.BatchAllTripletLoss(model)}
    with pytest.raises(ValueError, match=r"one loss per dataset .*loss='<dataset name>'"):
        _train(tmp_path / "a", "st", model, loss, dataset, [CollapseWatchCallback()], steps=2)
    calls = {"hard": 0, "all": 0}
    for name, module in loss.items():
        module.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    callback = CollapseWatchCallback("all", run="all")
    _train(
        tmp_path / "b",
        "st",
        model,
        loss,
        dataset,
        [callback],
        steps=6,
        multi_dataset_batch_sampler="round_robin",
    )
    run = cw.load_run(callback.path)
    assert run.metadata["loss_class"] == "BatchAllTripletLoss"
    # Only the batches of the "all" dataset are its steps.
    assert calls["hard"] > 0 and len(run.metrics) == calls["all"] > 0
    first = calls["all"]
    # A second train() with the same callback continues the run it named.
    _train(tmp_path / "b", "st", model, loss, dataset, [callback], steps=4)
    run = cw.load_run(callback.path)
    assert list(run.metrics["step"]) == list(range(calls["all"])) and calls["all"] > first

    class TwoLosses(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hard, self.all = loss["hard"], loss["all"]

    with pytest.raises(ValueError, match="cannot tell which loss TwoLosses trains with"):
        transformers.Trainer(
            model=TwoLosses(),
            args=transformers.TrainingArguments(
                output_dir=str(tmp_path / "c"), max_steps=1, use_cpu=True, report_to="none"
            ),
            train_dataset=small,
            callbacks=[CollapseWatchCallback()],
        ).train()


@pytest.mark.parametrize("kind", ["st", "hf"])
def test_rescue_restores_and_halves_the_trainers_learning_rate(tmp_path, bert_dir, digits, kind):
    # A sentence-transformers loss has no scaled variant: the first remedy that applies is
    # halving the learning rate, which must reach the trainer's own optimizer and scheduler.
    model = _sentence_model(bert_dir)
    loss_class, lr = COLLAPSING
    callback = CollapseWatchCallback(run=f"rescue-{kind}", on_collapse="rescue", every=1)
    trainer = _train(tmp_path, kind, model, loss_class(model), digits, [callback], lr=lr)
    events = cw.load_run(callback.watcher.path).events
    rescues = events[events["kind"] == "rescued"]
    assert len(rescues) >= 1
    assert "halved the learning rate (0.05 → 0.025" in rescues["message"].iloc[0]
    assert trainer.optimizer.param_groups[0]["lr"] <= lr / 2
    assert all(base <= lr / 2 for base in trainer.lr_scheduler.base_lrs)


@pytest.mark.parametrize("every", [1, 4, "auto"])
@pytest.mark.parametrize("kind", ["st", "hf"])
def test_a_second_train_files_every_row_under_its_own_call(tmp_path, bert_dir, digits, kind, every):
    class CallNumberLoss(losses.BatchAllTripletLoss):
        """Batch-all, shifted by 1000 × the number of the call: the row must show it."""

        calls = 0

        def forward(self, sentence_features, labels):
            loss = super().forward(sentence_features, labels) + 1000.0 * self.calls
            self.calls += 1
            return loss

    model = _sentence_model(bert_dir)
    loss = CallNumberLoss(model)
    callback = CollapseWatchCallback(run=f"twice-{kind}", every=every)
    for steps in (10, 20):
        _train(tmp_path, kind, model, loss, digits, [callback], steps=steps, lr=5e-3)
    run = cw.load_run(callback.watcher.path)
    assert loss.calls == 30 and run.metadata["loss_calls"] == 30
    steps = run.metrics["step"].tolist()
    assert any(step >= 10 for step in steps)
    for step, value in zip(steps, run.metrics["loss"], strict=True):
        assert value // 1000 == step, (step, value)


def test_every_trainer_log_carries_the_latest_recorded_values(tmp_path, bert_dir, digits):
    # logging_steps=1 with every=4: 3 of 4 logs follow a step that was not recorded; they
    # still get the last recorded values, labelled with the step they belong to.
    model = _sentence_model(bert_dir)
    loss_class, _ = HEALTHY
    recorder = Recorder()
    callback = CollapseWatchCallback(run="every-log", every=4)
    trainer = _train(
        tmp_path,
        "st",
        model,
        loss_class(model),
        digits,
        [callback, recorder],
        steps=20,
        lr=5e-3,
        logging_steps=1,
    )
    logged = [log for log in recorder.logs if "loss" in log]
    assert len(logged) == 20
    assert all("collapsewatch/step" in log for log in logged)
    metrics = cw.load_run(callback.watcher.path).metrics.set_index("step")
    assert metrics.index.tolist() == list(range(0, 20, 4))
    for global_step, log in enumerate(logged, start=1):
        # After global_step optimizer steps (calls 0 … global_step − 1): the last recorded.
        step = log["collapsewatch/step"]
        assert step == max(s for s in metrics.index if s <= global_step - 1)
        assert log["collapsewatch/loss"] == pytest.approx(metrics.loc[step, "loss"])
    # The trainer's own history holds the same values.
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [(h["collapsewatch/step"], h["collapsewatch/loss"]) for h in history] == [
        (log["collapsewatch/step"], log["collapsewatch/loss"]) for log in logged
    ]


def test_in_batch_negatives_are_measured_on_what_the_loss_compares(tmp_path, bert_dir, digits):
    # MultipleNegativesRankingLoss embeds (anchor, positive) pairs itself and has no labels:
    # the spread of both sides is measured by cosine, as the loss compares them, on every
    # recorded row (it was NaN), and the warning says what is and is not recorded.
    rows = digits.select(range(640))
    pairs = datasets.Dataset.from_dict(
        {"anchor": rows["sentence"][::2], "positive": rows["sentence"][1::2]}
    )
    model = _sentence_model(bert_dir)
    callback = CollapseWatchCallback(run="mnrl", every=1)
    with pytest.warns(RuntimeWarning, match="the embeddings the model made during the call"):
        _train(
            tmp_path,
            "st",
            model,
            losses.MultipleNegativesRankingLoss(model),
            pairs,
            [callback],
            steps=8,
            lr=5e-3,
        )
    run = cw.load_run(callback.watcher.path)
    assert run.metadata["distance"] == "cosine"
    distances = run.metrics["mean_pairwise_distance"]
    assert distances.notna().all() and distances.between(0.0, 2.0).all()
    assert (run.metrics["batch_size"] == 64).all()  # both sides of 32 pairs
    assert run.metrics["num_classes"].isna().all()  # no labels: said, not invented


def test_a_probe_sees_the_eval_mode_model_through_the_callback(tmp_path, bert_dir, digits):
    # BERT's dropout (0.1) is on while training; the probe runs the model in eval mode.
    loss_class, lr = COLLAPSING
    model = _sentence_model(bert_dir)
    held_out = digits.select(range(1700, 1764))
    probe = model.tokenize(held_out["sentence"])
    callback = CollapseWatchCallback(
        run="probed",
        on_collapse="ignore",
        every=1,
        probe=probe,
        probe_labels=torch.tensor(held_out["label"]),
        probe_every=10,
    )
    _train(tmp_path, "st", model, loss_class(model), digits.select(range(1700)), [callback], lr=lr)
    run = cw.load_run(callback.path)
    probed = run.metrics.dropna(subset=["probe_mean_pairwise_distance"])
    assert probed["step"].tolist() == list(range(0, STEPS, 10))
    # The eval-mode truth the probe recorded: the held-out sentences fell together ...
    spread = probed["probe_mean_pairwise_distance"]
    assert spread.iloc[-1] < 0.1 * spread.max()
    assert probed["probe_knn_accuracy"].iloc[-1] < probed["probe_knn_accuracy"].max()
    # ... and the verdict says so.
    assert cw.analyze(run).state == "collapsed"


@pytest.mark.parametrize("kind", ["st", "hf"])
def test_the_callback_takes_its_probe_from_the_eval_dataset(tmp_path, bert_dir, digits, kind):
    # 50 steps of batch-hard: the model in eval mode (BERT's dropout 0.1 off) maps the
    # held-out sentences together. The probe is the eval dataset's first batch, found by the
    # callback.
    loss_class, lr = COLLAPSING
    model = _sentence_model(bert_dir)
    held_out = digits.select(range(1700, 1797))
    callback = CollapseWatchCallback(
        run=f"eval-probe-{kind}", on_collapse="ignore", every=1, eval_probe=True, probe_every=5
    )
    train_rows = digits.select(range(1700))
    trainer = _train(tmp_path, kind, model, loss_class(model), train_rows, [callback], steps=50,
                     lr=lr, eval_dataset=held_out, per_device_eval_batch_size=64)  # fmt: skip
    run = cw.load_run(callback.path)
    probed = run.metrics.dropna(subset=["probe_mean_pairwise_distance"])
    assert probed["step"].tolist() == list(range(0, 50, 5))
    # Step 0's probe: the untrained model in eval mode on the eval loader's first batch, with
    # its labels: the first 64 held-out rows for the HF Trainer; a seeded shuffle of them,
    # in a column per text field, for SentenceTransformerTrainer.
    if kind == "st":
        features, labels = trainer.collect_features(dict(next(iter(trainer.get_eval_dataloader()))))
        features = features[0]
    else:
        first = held_out.select(range(64))
        features, labels = model.tokenize(first["sentence"]), torch.tensor(first["label"])
    fresh = _sentence_model(bert_dir).eval()
    with torch.no_grad():
        rows = fresh(features)["sentence_embedding"]
    want = probe_statistics(rows, labels, run.metadata["distance"])
    assert probed[list(PROBE_COLUMNS)].iloc[0].tolist() == pytest.approx(want.tolist(), rel=1e-5)
    # The truth at the end, from the model in eval mode: the held-out sentences are one point
    # (margin 5); the probe saw it, and the verdict says so.
    model.eval()
    embeddings = model.encode(held_out["sentence"], convert_to_tensor=True)
    assert torch.cdist(embeddings, embeddings).mean() < 0.05
    spread = probed["probe_mean_pairwise_distance"]
    assert spread.iloc[-1] < 0.1 * spread.max()
    assert probed["probe_knn_accuracy"].notna().all()  # the eval batch's labels were taken
    assert cw.analyze(run).state == "collapsed"


def test_an_eval_probe_needs_an_eval_dataset(tmp_path, bert_dir, digits):
    model = _sentence_model(bert_dir)
    callback = CollapseWatchCallback(eval_probe=True)
    with pytest.raises(ValueError, match=r"eval_probe=.*needs the trainer's eval_dataset"):
        _train(tmp_path, "st", model, HEALTHY[0](model), digits, [callback], steps=1)
    with pytest.raises(ValueError, match="either eval_probe= or probe="):
        CollapseWatchCallback(eval_probe=True, probe=torch.zeros(2, 3))


def test_a_run_grouping_batches_by_label_is_not_told_to(tmp_path, bert_dir, digits):
    loss_class, lr = COLLAPSING
    model = _sentence_model(bert_dir)
    callback = CollapseWatchCallback(run="grouped", on_collapse="ignore", every=1)
    _train(
        tmp_path,
        "st",
        model,
        loss_class(model),
        digits,
        [callback],
        lr=lr,
        batch_sampler="group_by_label",
    )
    run = cw.load_run(callback.path)
    assert run.metadata["loss_traits"] == ["group_by_label"]
    live = [e.suggestion for e in run.events.itertuples() if e.kind == "collapsed"]
    replayed = [e.suggestion for e in cw.analyze(run).events if e.kind == "collapsed"]
    assert live and live == replayed
    assert "GROUP_BY_LABEL" not in live[0] and "BatchSemiHardTripletLoss" in live[0]
    assert "GROUP_BY_LABEL" in cw.detect.collapse_advice("sentence_transformers")


def _same_digit_pairs(digits, rows: int = 1500) -> datasets.Dataset:
    """(anchor, positive) sentences of the same digit: what MNRL learns from."""
    labels = digits["label"][:rows]
    by_digit: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_digit.setdefault(label, []).append(i)
    rng = np.random.default_rng(0)
    partner = [int(rng.choice(by_digit[label])) for label in labels]
    sentences = digits["sentence"]
    return datasets.Dataset.from_dict(
        {"anchor": sentences[:rows], "positive": [sentences[j] for j in partner]}
    )


@pytest.mark.parametrize(("lr", "expected"), [(0.2, "collapsed"), (5e-3, "healthy")])
def test_in_batch_negatives_plateau_at_ln_of_the_candidates(
    tmp_path, bert_dir, digits, lr, expected
):
    from sklearn.neighbors import KNeighborsClassifier

    model = _sentence_model(bert_dir)
    callback = CollapseWatchCallback(run="mnrl", on_collapse="ignore", every=1)
    with pytest.warns(RuntimeWarning, match=r"over ln\(in-batch candidates\)"):
        _train(
            tmp_path,
            "st",
            model,
            losses.MultipleNegativesRankingLoss(model),
            _same_digit_pairs(digits),
            [callback],
            lr=lr,
        )
    run = cw.load_run(callback.path)
    # B pairs (32; 28 in an epoch's last batch): each anchor is scored against B positives,
    # so ln B is the loss of identical embeddings, the plateau the ratio is taken against.
    pairs = run.metrics["batch_size"] / 2  # both sides were embedded
    assert set(pairs) == {32, 1500 % 32}
    ratio = run.metrics["loss"] / np.log(pairs)
    assert run.metrics["loss_margin_ratio"].to_numpy() == pytest.approx(ratio.to_numpy())
    # The truth, from the model in eval mode on held-out sentences.
    model.eval()
    embeddings = model.encode(digits["sentence"], convert_to_tensor=True, normalize_embeddings=True)
    held_out = embeddings[1500:]
    cosine = (1 - held_out @ held_out.T).mean().item()
    knn = KNeighborsClassifier(5).fit(embeddings[:1500].numpy(), digits["label"][:1500])
    accuracy = knn.score(held_out.numpy(), digits["label"][1500:])
    verdict = cw.analyze(run)
    assert verdict.state == expected
    if expected == "collapsed":
        # kNN on points within 0.01 of one another reads leftovers: well below healthy.
        assert cosine < 0.01 and accuracy < 0.5
        assert run.metrics["loss_margin_ratio"].iloc[-1] == pytest.approx(1, abs=0.01)
        assert verdict.onset_step <= 60
    else:
        assert cosine > 0.1 and accuracy > 0.7 and verdict.events == ()


def test_the_plateau_of_each_in_batch_negatives_call() -> None:
    def features(rows: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros(rows, 5, dtype=torch.long)}

    ranking = find_margin(
        losses.MultipleNegativesRankingLoss.__new__(losses.MultipleNegativesRankingLoss), None
    )
    assert ranking.in_batch and (ranking.margin, ranking.plateau) == (None, None)
    pairs, triplets = ([features(32)] * 2,), ([features(32)] * 3,)
    assert ranking.plateau_of_call(pairs) == pytest.approx(np.log(32))
    assert ranking.plateau_of_call(triplets) == pytest.approx(np.log(64))  # + hard negatives
    symmetric = find_margin(
        losses.MultipleNegativesSymmetricRankingLoss.__new__(
            losses.MultipleNegativesSymmetricRankingLoss
        ),
        None,
    )
    assert symmetric.plateau_of_call(triplets) == pytest.approx((np.log(64) + np.log(32)) / 2)
    assert ranking.plateau_of_call(([features(32), features(31)],)) is None  # ragged


QUERY, DOC = ("query_to_doc",), ("query_to_doc", "doc_to_query")


@pytest.mark.parametrize("feature_batches", [2, 3, 4])
@pytest.mark.parametrize(
    "hardness", [None, "in_batch_negatives", "hard_negatives", "all_negatives"]
)
@pytest.mark.parametrize(
    ("directions", "partition"),
    [
        (QUERY, "joint"),
        (QUERY, "per_direction"),
        (DOC, "joint"),
        (DOC, "per_direction"),  # MultipleNegativesSymmetricRankingLoss
        # query → query and doc → doc exclude pools without the positive: joint only.
        (("query_to_doc", "query_to_query"), "joint"),
        (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint"),
    ],
)
def test_the_ranking_plateau_is_the_real_loss_of_identical_embeddings(
    directions, partition, hardness, feature_batches
) -> None:
    """Every direction, partition and hardness setting of MultipleNegativesRankingLoss (v6):
    the per-call plateau against the loss itself on k batches of one repeated embedding."""
    loss = losses.MultipleNegativesRankingLoss(
        None,
        directions=directions,
        partition_mode=partition,
        hardness_mode=hardness,
        hardness_strength=0.0 if hardness is None else 2.0,
    )
    spec = find_margin(loss, None)
    assert spec.in_batch
    for rows in (3, 8):
        same = torch.randn(1, 6, generator=torch.Generator().manual_seed(rows)).repeat(rows, 1)
        want = loss.compute_loss_from_embeddings([same] * feature_batches, None).item()
        features = [{"input_ids": torch.zeros(rows, 5, dtype=torch.long)}] * feature_batches
        assert spec.plateau_of_call((features, None), {}) == pytest.approx(want, rel=1e-5)
    # A hardness penalty on a similarity other than cosine depends on the embeddings' norms:
    # no plateau is assumed, and the loss is watched without one.
    loss.similarity_fct = lambda a, b: a @ b.T
    assert find_margin(loss, None).in_batch == (hardness is None)
