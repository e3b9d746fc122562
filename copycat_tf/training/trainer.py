"""The one trainer for targets and copycats: Keras fit with resumable, atomic checkpoints.

Workdir layout (one workdir per run; re-running with it resumes):

  checkpoints/epoch-NNNN.weights.h5   model + optimizer state after epoch NNNN
  checkpoints/best.weights.h5         weights of the best epoch by `TrainConfig.monitor`
  checkpoints/state.json              epochs done, history, best epoch (written last)
  tensorboard/train, tensorboard/eval summaries (train/loss, eval/accuracy, ...)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import weakref
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from copycat_tf import viz
from copycat_tf.data import augment, batches
from copycat_tf.evaluation import metrics
from copycat_tf.recipe import TrainConfig
from copycat_tf.workdir import atomic_write_json

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
BEST_WEIGHTS = "best.weights.h5"
TENSORBOARD_DIR = "tensorboard"
_PREDICT_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
      model: the model holding the best epoch's weights.
      history: one dict per epoch (epoch, train/*, eval/* metrics).
      best_epoch: 1-based epoch whose weights `model` holds.
      resumed_from: epochs already done when this call started (0 for a fresh run).
      train_seconds: wall time spent in fit by this call.
    """

    model: keras.Model
    history: list[dict]
    best_epoch: int
    resumed_from: int
    train_seconds: float


def predict_logits(model: keras.Model, batches: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` over (x, y) batches; returns (float32 logits [N, K], labels [N])."""
    step = _PREDICT_STEPS.get(model)
    if step is None:  # one traced function per model, not one per call

        @tf.function(reduce_retracing=True)
        def step(x):
            return tf.cast(model(x, training=False), tf.float32)

        _PREDICT_STEPS[model] = step
    logits, labels = [], []
    for x, y in batches:
        logits.append(step(x).numpy())
        labels.append(y.numpy())
    if not logits:
        raise ValueError("evaluation dataset is empty")
    return np.concatenate(logits), np.concatenate(labels)


def history_seconds(history: list[dict]) -> float:
    """Training wall time of a run from its per-epoch history (resumes included)."""
    return round(sum(h.get("seconds", 0.0) for h in history), 1)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean sparse softmax cross-entropy of integer labels under `logits`."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_z - shifted[np.arange(len(labels)), labels]))


def evaluate_model(model: keras.Model, batches: tf.data.Dataset, num_classes: int) -> dict:
    """Loss, accuracy, macro-F1 and per-class scores of `model` on labelled batches."""
    logits, labels = predict_logits(model, batches)
    result = metrics.classification_metrics(labels, logits.argmax(axis=1), num_classes)
    result["loss"] = cross_entropy(logits, labels.astype(np.int64))
    return result


class _EpochKeeper(keras.callbacks.Callback):
    """Per-epoch bookkeeping: NaN guard, evaluation, summaries, atomic checkpoints."""

    def __init__(self, ckpt_dir, writers, eval_batches, num_classes, monitor, patience, state):
        super().__init__()
        self.ckpt_dir = ckpt_dir
        self.writers = writers
        self.eval_batches = eval_batches
        self.num_classes = num_classes
        self.monitor = monitor
        self.patience = patience
        self.state = state
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch + 1
        self._epoch_start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss} at epoch {self._epoch}, step {batch + 1}; "
                "lower --learning_rate or check the training data"
            )

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        epoch += 1
        scores = evaluate_model(self.model, self.eval_batches, self.num_classes)
        record = {
            "epoch": epoch,
            "train/loss": float(logs.get("loss", float("nan"))),
            "train/accuracy": float(logs.get("accuracy", float("nan"))),
            "train/learning_rate": float(
                keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
            ),
            "eval/loss": scores["loss"],
            "eval/accuracy": scores["accuracy"],
            "eval/macro_f1": scores["macro_f1"],
            # Wall time of the epoch with its evaluation: summed over the history, the
            # training time of a run however often it was resumed.
            "seconds": round(time.monotonic() - self._epoch_start, 2),
        }
        for name, value in record.items():
            if "/" in name:
                split = name.split("/")[0]
                with self.writers[split].as_default():
                    tf.summary.scalar(name, value, step=epoch)
        for w in self.writers.values():
            w.flush()
        logging.info(
            "epoch %d: train/loss %.4f eval/accuracy %.4f eval/macro_f1 %.4f",
            epoch,
            record["train/loss"],
            record["eval/accuracy"],
            record["eval/macro_f1"],
        )
        self._checkpoint(epoch, record)

    def _checkpoint(self, epoch, record):
        # Weights first under a new name, then state.json pointing at them (atomic
        # replace): a kill at any moment leaves a state.json whose files all exist.
        name = f"epoch-{epoch:04d}.weights.h5"
        tmp = os.path.join(self.ckpt_dir, f".tmp-{name}")
        self.model.save_weights(tmp)
        os.replace(tmp, os.path.join(self.ckpt_dir, name))
        state = self.state
        state["history"].append(record)
        value = record[f"eval/{self.monitor}"]
        if state["best_epoch"] == 0 or value > state["best_value"]:
            best_tmp = os.path.join(self.ckpt_dir, ".tmp-" + BEST_WEIGHTS)
            shutil.copyfile(os.path.join(self.ckpt_dir, name), best_tmp)
            os.replace(best_tmp, os.path.join(self.ckpt_dir, BEST_WEIGHTS))
            state["best_epoch"], state["best_value"] = epoch, value
        previous = state.get("latest")
        state["epoch"], state["latest"] = epoch, name
        if self.patience and epoch - state["best_epoch"] >= self.patience:
            # Recorded before state.json is written, so a resumed run stops here too.
            state["stopped_early"] = True
            self.model.stop_training = True
            logging.info(
                "no better eval/%s for %d epochs: stopping after epoch %d (best %d)",
                self.monitor,
                self.patience,
                epoch,
                state["best_epoch"],
            )
        atomic_write_json(os.path.join(self.ckpt_dir, STATE_FILE), state)
        if previous and previous != name:
            _remove_quietly(os.path.join(self.ckpt_dir, previous))


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _write_start_summaries(writers, train_ds, class_names, hparams) -> None:
    from tensorboard.plugins.hparams import api as hp

    images, labels = next(iter(train_ds.take(32).batch(32)))
    labels = labels.numpy()
    if labels.ndim == 2:  # score vectors
        labels = labels.argmax(axis=1)
    titles = [class_names[int(y)] for y in labels]
    grid = viz.image_grid(images.numpy(), titles)
    with writers["train"].as_default():
        tf.summary.image("train/samples", grid[None], step=0)
    with writers["eval"].as_default():
        hp.hparams({k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))})


def train_classifier(
    build_model: Callable[[], keras.Model],
    train_ds: tf.data.Dataset,
    eval_ds: tf.data.Dataset,
    *,
    num_train: int,
    class_names: Sequence[str],
    input_shape: tuple[int, int, int],
    workdir: str,
    config: TrainConfig,
    strategy: tf.distribute.Strategy | None = None,
    hparams: dict | None = None,
) -> TrainResult:
    """Trains (or resumes training) a classifier and returns it with its best weights.

    Args:
      build_model: returns a new uncompiled Keras model emitting logits; called in the
        strategy's scope.
      train_ds: unbatched (uint8 image, target) training examples; the target is an int
        label, or a float score vector with config.soft_labels.
      eval_ds: unbatched (uint8 image, int label) examples for per-epoch evaluation and
        best-epoch selection.
      num_train: number of training examples (sets the learning-rate schedule).
      class_names: names of the labels, for TensorBoard.
      input_shape: (H, W, C) of the images.
      workdir: the run's directory; an existing checkpoint there is resumed.
      config: training hyper-parameters.
      strategy: tf.distribute strategy; default strategy when None.
      hparams: values logged once to TensorBoard's hparams dashboard.

    Returns:
      A TrainResult whose model holds the best epoch's weights.

    Raises:
      FloatingPointError: the loss became NaN or infinite (names the step).
    """
    strategy = strategy or tf.distribute.get_strategy()
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    os.makedirs(ckpt_dir, exist_ok=True)
    state_path = os.path.join(ckpt_dir, STATE_FILE)
    state = {"epoch": 0, "latest": None, "best_epoch": 0, "best_value": None, "history": []}
    if os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
    resumed_from = int(state["epoch"])

    keras.utils.set_random_seed(config.seed)
    steps_per_epoch = max(1, math.ceil(num_train / config.batch_size))
    with strategy.scope():
        model = build_model()
        warmup = round(config.warmup_epochs * steps_per_epoch)
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else config.learning_rate,
            decay_steps=max(1, steps_per_epoch * config.epochs - warmup),
            alpha=0.01,
            warmup_target=config.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
        if config.soft_labels:
            loss = keras.losses.CategoricalCrossentropy(from_logits=True)
            accuracy = keras.metrics.CategoricalAccuracy(name="accuracy")
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
            accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        model.compile(
            optimizer=keras.optimizers.AdamW(
                learning_rate=schedule, weight_decay=config.weight_decay
            ),
            loss=loss,
            metrics=[accuracy],
        )
        model.optimizer.build(model.trainable_variables)
    if state["latest"]:
        model.load_weights(os.path.join(ckpt_dir, state["latest"]))
        logging.info("resuming %s after epoch %d", workdir, resumed_from)

    writers = {
        split: tf.summary.create_file_writer(os.path.join(workdir, TENSORBOARD_DIR, split))
        for split in ("train", "eval")
    }
    if resumed_from == 0:
        _write_start_summaries(writers, train_ds, class_names, hparams or {})

    augmenter = augment.build_augmenter(config.augment, input_shape, seed=config.seed)
    train_batches = batches.training_batches(
        train_ds, config.batch_size, augmenter, config.shuffle_buffer, config.seed, config.cache
    )
    eval_batches = batches.eval_batches(eval_ds, max(config.batch_size, 256))
    keeper = _EpochKeeper(
        ckpt_dir, writers, eval_batches, len(class_names), config.monitor, config.patience, state
    )
    start = time.monotonic()
    if resumed_from < config.epochs and not state.get("stopped_early"):
        model.fit(
            train_batches,
            epochs=config.epochs,
            initial_epoch=resumed_from,
            callbacks=[keeper],
            shuffle=False,  # the pipeline shuffles
            verbose=config.verbose,
        )
    train_seconds = time.monotonic() - start
    for w in writers.values():
        w.close()
    model.load_weights(os.path.join(ckpt_dir, BEST_WEIGHTS))
    return TrainResult(
        model=model,
        history=state["history"],
        best_epoch=int(state["best_epoch"]),
        resumed_from=resumed_from,
        train_seconds=train_seconds,
    )
