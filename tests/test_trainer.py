"""The trainer end to end on a tiny config: checkpoints, resume, TensorBoard, learning."""

import dataclasses
import json
import os

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from copycat_tf.data import problem_domain
from copycat_tf.models import registry
from copycat_tf.recipe import Recipe
from copycat_tf.training import trainer


def _fit(domain, workdir, epochs, **overrides):
    settings = {
        "batch_size": 16,
        "learning_rate": 3e-3,
        "verbose": 0,
        "augment": "none",
        "min_steps": 0,
    }
    settings.update(overrides)
    config = dataclasses.replace(Recipe().train_config(), epochs=epochs, **settings)
    return trainer.train_classifier(
        lambda: registry.build_model("small_cnn", domain.input_shape, domain.num_classes),
        domain.split("train"),
        domain.split("validation"),
        num_train=domain.sizes["train"],
        class_names=domain.class_names,
        input_shape=domain.input_shape,
        workdir=workdir,
        config=config,
        hparams={"model": "small_cnn"},
    )


def _tags(directory):
    acc = event_accumulator.EventAccumulator(directory, size_guidance={"tensors": 0})
    acc.Reload()
    return set(acc.Tags()["tensors"])


@pytest.fixture
def domain(fashion_dir):
    return problem_domain.load_problem_domain("fashion_mnist", data_dir=fashion_dir)


def test_train_checkpoint_resume_and_summaries(domain, tmp_path):
    workdir = str(tmp_path / "run")
    first = _fit(domain, workdir, epochs=2)
    assert first.resumed_from == 0 and len(first.history) == 2
    ckpt = os.path.join(workdir, trainer.CHECKPOINT_DIR)
    with open(os.path.join(ckpt, trainer.STATE_FILE)) as f:
        state = json.load(f)
    assert state["epoch"] == 2 and state["latest"] == "epoch-0002.weights.h5"
    assert sorted(f for f in os.listdir(ckpt) if f.endswith(".h5")) == [
        "best.weights.h5",
        "epoch-0002.weights.h5",
    ]

    second = _fit(domain, workdir, epochs=3)
    assert second.resumed_from == 2
    assert [h["epoch"] for h in second.history] == [1, 2, 3]
    # The optimizer state came back too: after 3 epochs the cosine schedule is at its end
    # (alpha * peak), which it would not be had the step counter restarted at 0.
    assert second.history[2]["train/learning_rate"] == pytest.approx(3e-3 * 0.01, rel=1e-3)

    third = _fit(domain, workdir, epochs=3)  # nothing left to do
    assert third.resumed_from == 3 and third.train_seconds < 60

    tb = os.path.join(workdir, trainer.TENSORBOARD_DIR)
    assert {"train/loss", "train/accuracy", "train/learning_rate", "train/samples"} <= _tags(
        os.path.join(tb, "train")
    )
    assert {"eval/loss", "eval/accuracy", "eval/macro_f1"} <= _tags(os.path.join(tb, "eval"))
    plugins = set()
    for name in os.listdir(os.path.join(tb, "eval")):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(tb, "eval", name)):
            for value in event.summary.value:
                plugins.add(value.metadata.plugin_data.plugin_name)
    assert "hparams" in plugins


def test_learning_loss_falls_and_beats_chance(domain, tmp_path):
    result = _fit(domain, str(tmp_path / "run"), epochs=6)
    losses = [h["train/loss"] for h in result.history]
    assert losses[-1] < losses[0]
    test = trainer.evaluate_model(
        result.model,
        domain.split("test").batch(64).map(lambda x, y: (tf.cast(x, "float32"), y)),
        domain.num_classes,
    )
    assert test["accuracy"] > 0.5  # chance is 0.1


def test_min_steps_stretches_epochs_patience_and_warmup():
    config = dataclasses.replace(
        Recipe().train_config(), epochs=10, patience=3, warmup_epochs=1.0, min_steps=5000
    )
    assert config.stretched(512) == config  # 10 epochs of 512 steps are enough
    longer = config.stretched(100)  # 10 x 100 steps are not: 50 epochs
    assert (longer.epochs, longer.patience, longer.warmup_epochs) == (50, 15, 5.0)
    assert config.stretched(99).epochs == 51  # at least min_steps, never fewer
    off = dataclasses.replace(config, min_steps=0)
    assert off.stretched(1) == off
    # The quick demo and the NPD+PD fine-tuning train their epochs as given.
    assert Recipe().quick().train_config().min_steps == 0
    assert Recipe().finetune_config().min_steps == 0 < Recipe().train_config().min_steps


def test_min_steps_trains_more_epochs_on_a_small_training_set(domain, tmp_path):
    steps = -(-domain.sizes["train"] // 16)
    result = _fit(domain, str(tmp_path / "run"), epochs=1, min_steps=2 * steps + 1)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    # The learning-rate schedule spans the three epochs: at its end only after the last.
    assert result.history[2]["train/learning_rate"] == pytest.approx(3e-3 * 0.01, rel=1e-3)
    assert result.history[0]["train/learning_rate"] > 3e-3 * 0.5


def test_patience_stops_when_hold_out_agreement_stops_improving(domain, tmp_path):
    # Nothing is learnt at a learning rate of 0: epoch 1 stays the best.
    result = _fit(domain, str(tmp_path / "run"), epochs=6, learning_rate=0.0, patience=2)
    assert [h["epoch"] for h in result.history] == [1, 2, 3] and result.best_epoch == 1
    assert len(_fit(domain, str(tmp_path / "all"), epochs=3, learning_rate=0.0).history) == 3


def test_nan_loss_names_the_step(domain, tmp_path):
    with pytest.raises(FloatingPointError, match=r"epoch 1, step \d+"):
        _fit(domain, str(tmp_path / "run"), epochs=1, learning_rate=float("nan"))


def test_best_epoch_weights_are_restored(domain, tmp_path):
    result = _fit(domain, str(tmp_path / "run"), epochs=3)
    best = max(result.history, key=lambda h: h["eval/accuracy"])
    assert result.best_epoch == best["epoch"]
    batches = domain.split("validation").batch(64).map(lambda x, y: (tf.cast(x, "float32"), y))
    scores = trainer.evaluate_model(result.model, batches, domain.num_classes)
    assert scores["accuracy"] == pytest.approx(best["eval/accuracy"])


@pytest.mark.parametrize("name", ["flip", "geometric"])
def test_augmentation_keeps_images_and_labels_aligned(name):
    """Constant images whose value encodes the label stay constant under the augmenter
    (reflected borders), so any mix-up of images and labels would show."""
    import numpy as np

    from copycat_tf.data import augment, batches

    labels = np.arange(64) % 8
    images = np.repeat((20 * labels + 10).astype(np.uint8), 16 * 16).reshape(64, 16, 16, 1)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    augmenter = augment.build_augmenter(name, (16, 16, 1), seed=3)
    seen = 0
    for x, y in batches.training_batches(ds, 16, augmenter, shuffle_buffer=64, seed=1):
        x, y = x.numpy(), y.numpy()
        np.testing.assert_allclose(x.reshape(len(x), -1).mean(axis=1), 20 * y + 10, atol=0.5)
        seen += len(y)
    assert seen == 64


def test_mixup_mixes_images_and_targets_alike_and_anew_each_epoch():
    """Constant images whose value encodes the label: a mixed image's value must be the
    same mixture of the two values as its target is of the two labels."""
    import numpy as np

    from copycat_tf.data import batches

    labels = np.arange(64) % 4
    values = np.array([10.0, 80.0, 160.0, 240.0])
    images = np.repeat(values[labels].astype(np.uint8), 8 * 8).reshape(64, 8, 8, 1)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    pipeline = batches.training_batches(
        ds, 16, None, shuffle_buffer=64, seed=1, mixup=0.4, num_classes=4
    )
    epochs = []
    for _ in range(2):
        mixtures = []
        for x, y in pipeline:
            x, y = x.numpy(), y.numpy()
            assert y.shape == (len(x), 4)
            np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)
            np.testing.assert_allclose(x.reshape(len(x), -1).mean(axis=1), y @ values, atol=0.5)
            mixtures.append(y)
        epochs.append(np.concatenate(mixtures))
    assert (epochs[0].max(axis=1) < 0.99).mean() > 0.3  # most examples are mixed
    assert not np.allclose(epochs[0], epochs[1])  # new pairs and weights every epoch


def test_mixup_learns_from_integer_labels(domain, tmp_path):
    result = _fit(domain, str(tmp_path / "run"), epochs=6, mixup=0.4)
    test = trainer.evaluate_model(
        result.model,
        domain.split("test").batch(64).map(lambda x, y: (tf.cast(x, "float32"), y)),
        domain.num_classes,
    )
    assert test["accuracy"] > 0.5  # chance is 0.1
