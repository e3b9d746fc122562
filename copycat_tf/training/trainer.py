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
from copycat_tf.training import runtime
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


def worker_summary(strategy, workdir: str, result: TrainResult) -> dict:
    """What a multi-worker run's non-chief worker reports (the chief writes the files)."""
    return {
        "worker": runtime.task_name(strategy),
        "workdir": workdir,
        "best_epoch": result.best_epoch,
        "epochs_done": len(result.history),
    }


def format_worker_summary(summary: dict) -> str:
    return (
        f"{summary['worker']}: trained {summary['epochs_done']} epoch(s) with the chief, "
        f"which writes the checkpoints, TensorBoard and the export into {summary['workdir']}"
    )


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
    """Per-epoch bookkeeping: NaN guard, evaluation, summaries, atomic checkpoints (files
    written by the chief only: the other workers of a multi-worker run keep the same
    state, so they take the same decisions)."""

    def __init__(
        self, ckpt_dir, writers, eval_batches, num_classes, monitor, patience, state, chief=True
    ):
        super().__init__()
        self.chief = chief
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
        if self.chief:
            tmp = os.path.join(self.ckpt_dir, f".tmp-{name}")
            self.model.save_weights(tmp)
            os.replace(tmp, os.path.join(self.ckpt_dir, name))
        state = self.state
        state["history"].append(record)
        value = record[f"eval/{self.monitor}"]
        if state["best_epoch"] == 0 or value > state["best_value"]:
            if self.chief:
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
        if self.chief:
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


def soft_targets(config: TrainConfig) -> bool:
    """Whether the training batches' targets are score vectors (soft labels or mixup)."""
    return config.soft_labels or config.mixup > 0


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
    multi_worker = runtime.is_multi_worker(strategy)
    chief = runtime.is_chief(strategy)
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
    stretched = config.stretched(steps_per_epoch)
    if stretched is not config:
        config = stretched
        logging.info(
            "%d steps per epoch: %d epochs (patience %d) for at least %d steps (--min_steps)",
            steps_per_epoch,
            config.epochs,
            config.patience,
            config.min_steps,
        )
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
        if soft_targets(config):
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
        if chief
        else tf.summary.create_noop_writer()
        for split in ("train", "eval")
    }
    if resumed_from == 0 and chief:
        _write_start_summaries(writers, train_ds, class_names, hparams or {})

    augmenter = augment.build_augmenter(config.augment, input_shape, seed=config.seed)
    train_batches = batches.training_batches(
        train_ds,
        config.batch_size,
        augmenter,
        config.shuffle_buffer,
        config.seed,
        config.cache,
        mixup=config.mixup,
        num_classes=len(class_names),
    )
    eval_batches = batches.eval_batches(eval_ds, max(config.batch_size, 256))
    keeper = _EpochKeeper(
        ckpt_dir,
        writers,
        eval_batches,
        len(class_names),
        config.monitor,
        config.patience,
        state,
        chief,
    )
    start = time.monotonic()
    if resumed_from < config.epochs and not state.get("stopped_early"):
        if multi_worker:  # Keras 3's fit does not run under MultiWorkerMirroredStrategy
            _fit_multi_worker(
                model, strategy, train_batches, keeper, config, resumed_from, steps_per_epoch
            )
        else:
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
    if multi_worker:  # the best weights in a model of this process alone, to export
        model = build_model()
    model.load_weights(os.path.join(ckpt_dir, BEST_WEIGHTS))
    return TrainResult(
        model=model,
        history=state["history"],
        best_epoch=int(state["best_epoch"]),
        resumed_from=resumed_from,
        train_seconds=train_seconds,
    )


def _fit_multi_worker(model, strategy, train_batches, keeper, config, first_epoch, steps):
    """The epochs of `model.fit` as a custom loop over `strategy.run`: each worker reads
    its share of every (full) global batch (auto-sharded by data), gradients are all-reduced,
    and `keeper` does the per-epoch bookkeeping on every worker (files on the chief). All
    workers meet after each epoch's checkpoint, so none reads a file not yet written."""
    optimizer = model.optimizer
    if soft_targets(config):
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # Full global batches only, across epoch boundaries: a partial batch would be traced
    # again on some workers and not others, and their all-reduces would no longer match.
    full = train_batches.unbatch().repeat().batch(config.batch_size, drop_remainder=True)
    iterator = iter(strategy.experimental_distribute_dataset(full.with_options(options)))
    total = tf.distribute.ReduceOp.SUM

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = tf.cast(model(x, training=True), tf.float32)
            loss = tf.nn.compute_average_loss(
                loss_fn(y, logits), global_batch_size=config.batch_size
            )
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        labels = tf.argmax(y, axis=-1) if soft_targets(config) else tf.cast(y, tf.int64)
        hits = tf.equal(tf.argmax(logits, axis=-1), labels)
        return loss, tf.reduce_sum(tf.cast(hits, tf.float32)), tf.cast(tf.shape(x)[0], tf.float32)

    @tf.function
    def train_step(iterator):
        per_replica = strategy.run(step, args=next(iterator))
        return [strategy.reduce(total, value, axis=None) for value in per_replica]

    @tf.function
    def barrier():
        return strategy.reduce(total, strategy.run(lambda: tf.constant(1.0)), axis=None)

    keeper.set_model(model)
    for epoch in range(first_epoch, config.epochs):
        keeper.on_epoch_begin(epoch)
        loss_sum = hits = seen = 0.0
        for i in range(steps):
            loss, correct, n = (float(v) for v in train_step(iterator))
            keeper.on_train_batch_end(i, {"loss": loss})
            loss_sum, hits, seen = loss_sum + loss, hits + correct, seen + n
        keeper.on_epoch_end(epoch, {"loss": loss_sum / steps, "accuracy": hits / max(seen, 1.0)})
        barrier()
        if model.stop_training:
            break
