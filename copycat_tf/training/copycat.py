"""Train a copycat on a fake dataset (stolen labels), optionally fine-tune on PD data.

Stage 1 ("npd"): the copycat learns the stolen labels of the NPD fake dataset.
Stage 2 ("finetune", optional, the paper's NPD+PD): it is fine-tuned at a lower learning
rate on problem-domain images that the *target* labelled (a second `steal` run with
`--npd=pd:...`); ground-truth labels are never used.

Model selection needs no ground truth: a hold-out slice of each fake dataset (chosen by
query index) measures agreement with the stolen labels after every epoch.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from copycat_tf.data import augment as augment_lib
from copycat_tf.data import balance as balance_lib
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data import invariance
from copycat_tf.errors import UserInputError
from copycat_tf.models import registry
from copycat_tf.recipe import Recipe, TrainConfig
from copycat_tf.training import export, runtime, trainer
from copycat_tf.workdir import atomic_write_json, init_workdir

METRICS_FILE = "metrics.json"


@dataclasses.dataclass
class TrainCopycatConfig:
    """Everything `run_train_copycat` needs.

    Attributes:
      fake_dataset: steal output directories (several: one per steal worker).
      model: registry name of the copycat architecture.
      workdir: the run's directory (stages under npd/ and finetune/; resumes).
      model_base_path: export root; "" means <workdir>/models.
      model_name: exported model's name.
      version: export version; None picks the next free one.
      balance: "replicate" (2021 paper), "resample" or "none".
      max_replication: cap of a class's replication per epoch (0: none).
      soft_labels: train on the stored score vectors (needs steal --label_mode=scores or
        topk:K) instead of the hard labels.
      holdout_percent: share of each fake dataset held out for model selection.
      weights: optional local weights file to start from (e.g. ImageNet VGG-16).
      train: stage-1 hyper-parameters (default: the Recipe's).
      pd_fake_dataset: steal output directories of target-labelled PD images ([] = no
        NPD+PD stage).
      finetune: stage-2 hyper-parameters (default: the Recipe's, lower learning rate).
      class_names: names shipped with the export (default class_0, class_1, ...).
      max_records: train on the first N queries of the fake dataset only (0: all), e.g.
        to measure a smaller query budget on one stolen dataset.
    """

    fake_dataset: list[str]
    model: str
    workdir: str
    model_base_path: str = ""
    model_name: str = "copycat"
    version: int | None = None
    balance: str = Recipe.balance
    max_replication: float = Recipe.max_replication
    soft_labels: bool = False
    holdout_percent: int = Recipe.holdout_percent
    weights: str | None = None
    train: TrainConfig | None = None
    pd_fake_dataset: list[str] = dataclasses.field(default_factory=list)
    finetune: TrainConfig | None = None
    class_names: list[str] = dataclasses.field(default_factory=list)
    max_records: int = 0


def soft_target(image, label, scores):
    """(image, the answer's scores as a distribution): a served answer need not sum to 1
    (a target that rounds its probabilities, `--output_defense=round:D`, answers sums from
    0.7 to 1.2 at one decimal), and cross-entropy against such targets diverged (a copy
    trained on round:1 answers fell to chance). Scores summing to 0 give the label one-hot."""
    total = tf.reduce_sum(scores)
    one_hot = tf.one_hot(label, tf.shape(scores)[0], dtype=scores.dtype)
    return image, tf.where(total > 0, scores / tf.maximum(total, 1e-12), one_hot)


def training_split(
    data: fd.FakeData, percent: int, balance: str, soft: bool, seed: int, max_replication: float
):
    """(train dataset of one balanced epoch, held-out dataset, epoch size, class counts)."""
    held = fd.holdout_mask(data.query_indices, percent)
    if held.any():
        is_held = lambda image, label, scores, index: fd.holdout_mask(index, percent)  # noqa: E731
    else:  # a tiny dataset: hold out one record so model selection still has data
        only = int(data.query_indices[0])
        held = data.query_indices == only
        is_held = lambda image, label, scores, index: tf.equal(index, only)  # noqa: E731
    if held.all():
        raise UserInputError(
            f"fake dataset {data.directories} is too small to hold records out for model "
            "selection; steal more queries"
        )
    counts = np.bincount(data.labels[~held], minlength=data.num_classes)
    records = data.records()
    train = records.filter(lambda *r: tf.logical_not(is_held(*r)))
    # Decode once: the balanced sampler reads each class many times per epoch.
    train = train.map(lambda image, label, scores, index: (image, label, scores)).cache()
    train, targets = balance_lib.balanced(train, counts, balance, seed, max_replication)
    if soft:
        train = train.map(soft_target)
    else:
        train = train.map(lambda image, label, scores: (image, label))
    heldout = records.filter(is_held).map(lambda image, label, scores, index: (image, label))
    return train, heldout, int(targets.sum()), counts, targets, int(held.sum())


def _stage(
    name: str,
    data: fd.FakeData,
    cfg: TrainCopycatConfig,
    config: TrainConfig,
    build,
    strategy,
    class_names,
) -> tuple[trainer.TrainResult, dict]:
    config = dataclasses.replace(config, soft_labels=cfg.soft_labels, cache=False)
    probed = None
    if config.augment == augment_lib.AUTO:
        probed = invariance.analyse(data.query_indices, data.labels, data.probe)
        config = dataclasses.replace(config, augment="flip" if probed["flip"] else "none")
        logging.info("%s: --augment=auto -> %s (%s)", name, config.augment, probed["reason"])
    train, heldout, epoch_size, counts, targets, n_held = training_split(
        data, cfg.holdout_percent, cfg.balance, cfg.soft_labels, config.seed, cfg.max_replication
    )
    logging.info(
        "%s: %d records (%d held out); stolen labels per class %s -> %s per epoch (%s)",
        name,
        len(data.labels),
        n_held,
        counts.tolist(),
        targets.tolist(),
        cfg.balance,
    )
    result = trainer.train_classifier(
        build,
        train,
        heldout,
        num_train=epoch_size,
        class_names=class_names,
        input_shape=data.input_shape,
        workdir=os.path.join(cfg.workdir, name),
        config=config,
        strategy=strategy,
        hparams={
            "stage": name,
            "model": cfg.model,
            "balance": cfg.balance,
            "soft_labels": cfg.soft_labels,
            "records": len(data.labels),
            **{k: v for k, v in dataclasses.asdict(config).items() if k != "verbose"},
        },
    )
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    info = {
        "fake_dataset": data.directories,
        "records": len(data.labels),
        "heldout_records": n_held,
        "stolen_label_counts": counts.tolist(),
        "balanced_epoch_counts": targets.tolist(),
        "best_epoch": result.best_epoch,
        "epochs_done": len(result.history),
        "heldout_agreement": best["eval/accuracy"],
        "heldout_macro_f1": best["eval/macro_f1"],
        "train_seconds": trainer.history_seconds(result.history),
        "augment": config.augment,
        **({"invariance_probe": probed} if probed is not None else {}),
    }
    return result, info


def _check_dataset(data: fd.FakeData, cfg: TrainCopycatConfig, what: str) -> None:
    if cfg.soft_labels and not data.has_scores:
        raise UserInputError(
            f"--soft_labels needs score vectors, but {what} {data.directories} was stolen "
            "with --label_mode=hard; drop --soft_labels or steal with --label_mode=scores"
        )
    try:
        registry.build_model(cfg.model, data.input_shape, data.num_classes, cfg.weights)
    except ValueError as e:
        raise UserInputError(
            f"{what} {data.directories} (images {data.input_shape}, {data.num_classes} "
            f"classes) does not fit --model={cfg.model}: {e}"
        ) from e


def run_train_copycat(
    cfg: TrainCopycatConfig, strategy: tf.distribute.Strategy | None = None, flags_text: str = ""
) -> dict:
    """Trains (or resumes) the copycat, writes metrics.json, exports the SavedModel.

    Raises:
      UserInputError: bad fake dataset (missing, corrupt, unknown schema, incompatible),
        model, workdir or export directory.
    """
    recipe = Recipe()
    cfg = dataclasses.replace(
        cfg,
        train=cfg.train or recipe.train_config(),
        finetune=cfg.finetune or recipe.finetune_config(),
    )
    if cfg.model not in registry.MODELS:
        raise UserInputError(
            f"unknown --model {cfg.model!r}; valid names: {', '.join(sorted(registry.MODELS))}"
        )
    if cfg.balance not in balance_lib.BALANCE_MODES:
        raise UserInputError(
            f"--balance={cfg.balance!r}; valid: {', '.join(balance_lib.BALANCE_MODES)}"
        )
    if not 1 <= cfg.holdout_percent <= 50:
        raise UserInputError(f"--holdout_percent={cfg.holdout_percent}; expected 1..50")
    data = fd.load_fake_data(cfg.fake_dataset)
    if cfg.max_records:
        data = data.first(cfg.max_records)
    _check_dataset(data, cfg, "--fake_dataset")
    pd_data = None
    if cfg.pd_fake_dataset:
        pd_data = fd.load_fake_data(cfg.pd_fake_dataset)
        if (pd_data.input_shape, pd_data.num_classes) != (data.input_shape, data.num_classes):
            raise UserInputError(
                f"--pd_fake_dataset images {pd_data.input_shape} / {pd_data.num_classes} "
                f"classes differ from --fake_dataset {data.input_shape} / "
                f"{data.num_classes}: both must come from the same target"
            )
        _check_dataset(pd_data, cfg, "--pd_fake_dataset")
    class_names = cfg.class_names or [f"class_{i}" for i in range(data.num_classes)]
    if len(class_names) != data.num_classes:
        raise UserInputError(
            f"--class_names has {len(class_names)} names; the target has {data.num_classes} classes"
        )
    base = cfg.model_base_path or os.path.join(cfg.workdir, "models")
    identity = {
        "verb": "train_copycat",
        "fake_dataset": [os.path.abspath(d) for d in cfg.fake_dataset],
        "pd_fake_dataset": [os.path.abspath(d) for d in cfg.pd_fake_dataset],
        "model": cfg.model,
        "balance": cfg.balance,
        "max_replication": cfg.max_replication,
        "soft_labels": cfg.soft_labels,
        "holdout_percent": cfg.holdout_percent,
        "max_records": cfg.max_records,
    }
    if export.previous_export(cfg.workdir) is None:
        export.check_export_location(base, cfg.model_name, cfg.version)
    init_workdir(cfg.workdir, identity, flags_text, path_keys=("fake_dataset", "pd_fake_dataset"))

    def build():
        return registry.build_model(cfg.model, data.input_shape, data.num_classes, cfg.weights)

    result, npd_info = _stage("npd", data, cfg, cfg.train, build, strategy, class_names)
    stages = {"npd": npd_info}
    model = result.model
    if pd_data is not None:
        npd_best = os.path.join(cfg.workdir, "npd", trainer.CHECKPOINT_DIR, trainer.BEST_WEIGHTS)

        def build_from_npd():
            copy = build()
            copy.load_weights(npd_best)  # the stage-1 copycat's best weights
            return copy

        result, ft_info = _stage(
            "finetune", pd_data, cfg, cfg.finetune, build_from_npd, strategy, class_names
        )
        stages["finetune"] = ft_info
        model = result.model

    if not runtime.is_chief(strategy):
        return trainer.worker_summary(strategy, cfg.workdir, result)
    export_dir = export.export_once(
        cfg.workdir,
        lambda: export.export_classifier(
            model,
            class_names,
            data.input_shape,
            base,
            cfg.model_name,
            cfg.version,
            description={
                "role": "copycat",
                "fake_dataset": identity["fake_dataset"],
                "pd_fake_dataset": identity["pd_fake_dataset"],
                "target": data.target,
                "workdir": cfg.workdir,
            },
        ),
    )
    summary = {
        "model": cfg.model,
        "balance": cfg.balance,
        "soft_labels": cfg.soft_labels,
        "target": data.target,
        "stages": stages,
        "export_dir": export_dir,
        "workdir": cfg.workdir,
    }
    atomic_write_json(os.path.join(cfg.workdir, METRICS_FILE), summary)
    return summary


def format_summary(summary: dict) -> str:
    """The few lines a user wants after train_copycat."""
    if "worker" in summary:
        return trainer.format_worker_summary(summary)
    lines = [
        f"copycat {summary['model']} (balance={summary['balance']}, "
        f"soft_labels={summary['soft_labels']})"
    ]
    for name, info in summary["stages"].items():
        lines.append(
            f"  {name:9s} {info['records']} records, best epoch {info['best_epoch']}: "
            f"held-out agreement with stolen labels {info['heldout_agreement']:.4f}"
        )
        if "invariance_probe" in info:
            lines.append(f"  {'':9s} {invariance.describe_choice(info)}")
    lines += [
        f"  SavedModel     {summary['export_dir']}",
        f"  metrics        {os.path.join(summary['workdir'], METRICS_FILE)}",
        f"  TensorBoard    tensorboard --logdir {summary['workdir']}",
    ]
    return "\n".join(lines)
