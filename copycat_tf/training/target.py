"""Train the target ("oracle") on problem-domain data and export it as a SavedModel."""

from __future__ import annotations

import dataclasses
import os

import tensorflow as tf
from absl import logging

from copycat_tf.data import batches, problem_domain
from copycat_tf.errors import UserInputError
from copycat_tf.models import registry
from copycat_tf.recipe import TargetRecipe, TrainConfig
from copycat_tf.training import export, runtime, trainer
from copycat_tf.workdir import atomic_write_json, init_workdir

METRICS_FILE = "metrics.json"


@dataclasses.dataclass
class TrainTargetConfig:
    """Everything `run_train_target` needs.

    Attributes:
      pd_data: problem-domain spec (see data.problem_domain).
      model: registry name.
      workdir: the run's directory (resumes when it holds a checkpoint).
      model_base_path: export root; "" means <workdir>/models.
      model_name: exported model's name.
      version: export version; None picks the next free one.
      data_dir: data directory for fashion_mnist / tfds specs.
      image_size: (H, W) to resize the PD images to, or None.
      weights: optional local weights file for the model.
      train: training hyper-parameters (default: the TargetRecipe's).
    """

    pd_data: str
    model: str
    workdir: str
    model_base_path: str = ""
    model_name: str = "target"
    version: int | None = None
    data_dir: str | None = None
    image_size: tuple[int, int] | None = None
    weights: str | None = None
    train: TrainConfig | None = None


def run_train_target(
    cfg: TrainTargetConfig, strategy: tf.distribute.Strategy | None = None, flags_text: str = ""
) -> dict:
    """Trains the target, writes test metrics, exports the SavedModel.

    A re-run with the same workdir resumes training and, when the run was already
    exported, reuses that export instead of writing another version.

    Returns:
      Summary dict: test metrics, export path, workdir paths.

    Raises:
      UserInputError: bad data spec, model name, workdir or export directory.
    """
    if cfg.train is None:
        cfg = dataclasses.replace(cfg, train=TargetRecipe().train_config())
    spec = problem_domain.parse_pd_spec(cfg.pd_data)
    if cfg.model not in registry.MODELS:
        raise UserInputError(
            f"unknown --model {cfg.model!r}; valid names: {', '.join(sorted(registry.MODELS))}"
        )
    base = cfg.model_base_path or os.path.join(cfg.workdir, "models")
    if export.previous_export(cfg.workdir) is None:
        export.check_export_location(base, cfg.model_name, cfg.version)
    identity = {
        "verb": "train_target",
        "pd_data": cfg.pd_data,
        "model": cfg.model,
        "image_size": list(cfg.image_size) if cfg.image_size else None,
    }
    init_workdir(cfg.workdir, identity, flags_text)

    domain = problem_domain.load_problem_domain(
        spec, data_dir=cfg.data_dir, image_size=cfg.image_size, seed=cfg.train.seed
    )
    logging.info(
        "problem domain %s: %s examples, %d classes, input %s",
        domain.name,
        domain.sizes,
        domain.num_classes,
        domain.input_shape,
    )
    try:
        registry.build_model(cfg.model, domain.input_shape, domain.num_classes, cfg.weights)
    except ValueError as e:
        raise UserInputError(str(e)) from e

    hparams = {
        "model": cfg.model,
        "pd_data": cfg.pd_data,
        **{k: v for k, v in dataclasses.asdict(cfg.train).items() if k != "verbose"},
    }
    result = trainer.train_classifier(
        lambda: registry.build_model(
            cfg.model, domain.input_shape, domain.num_classes, cfg.weights
        ),
        domain.split("train"),
        domain.split("validation"),
        num_train=domain.sizes["train"],
        class_names=domain.class_names,
        input_shape=domain.input_shape,
        workdir=cfg.workdir,
        config=cfg.train,
        strategy=strategy,
        hparams=hparams,
    )
    if not runtime.is_chief(strategy):
        return trainer.worker_summary(strategy, cfg.workdir, result)
    test = trainer.evaluate_model(
        result.model,
        batches.eval_batches(domain.split("test"), 512, cache=False),
        domain.num_classes,
    )
    with tf.summary.create_file_writer(
        os.path.join(cfg.workdir, trainer.TENSORBOARD_DIR, "eval")
    ).as_default():
        tf.summary.scalar("test/accuracy", test["accuracy"], step=result.best_epoch)
        tf.summary.scalar("test/macro_f1", test["macro_f1"], step=result.best_epoch)

    export_dir = export.export_once(
        cfg.workdir,
        lambda: export.export_classifier(
            result.model,
            domain.class_names,
            domain.input_shape,
            base,
            cfg.model_name,
            version=cfg.version,
            description={"role": "target", "pd_data": cfg.pd_data, "workdir": cfg.workdir},
        ),
    )
    summary = {
        "pd_data": cfg.pd_data,
        "model": cfg.model,
        "class_names": domain.class_names,
        "input_shape": list(domain.input_shape),
        "best_epoch": result.best_epoch,
        "epochs_done": len(result.history),
        "train_seconds": trainer.history_seconds(result.history),
        "train_seconds_this_run": round(result.train_seconds, 1),
        "test": test,
        "export_dir": export_dir,
        "workdir": cfg.workdir,
    }
    atomic_write_json(os.path.join(cfg.workdir, METRICS_FILE), summary)
    return summary


def format_summary(summary: dict) -> str:
    """The few lines a user wants after train_target."""
    if "worker" in summary:
        return trainer.format_worker_summary(summary)
    test = summary["test"]
    return "\n".join(
        [
            f"target {summary['model']} on {summary['pd_data']} "
            f"(best epoch {summary['best_epoch']} of {summary['epochs_done']})",
            f"  test accuracy  {test['accuracy']:.4f}",
            f"  test macro-F1  {test['macro_f1']:.4f}   ({test['num_examples']} images)",
            f"  SavedModel     {summary['export_dir']}",
            f"  metrics        {os.path.join(summary['workdir'], METRICS_FILE)}",
            f"  TensorBoard    tensorboard --logdir "
            f"{os.path.join(summary['workdir'], trainer.TENSORBOARD_DIR)}",
        ]
    )
