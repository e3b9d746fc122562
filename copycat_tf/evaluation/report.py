"""Evaluate a copycat against its target on labelled problem-domain test data.

The paper's figures: accuracy and macro-F1 of both models against the ground truth, the
copycat/target ratio of each (the headline), and agreement (fidelity: how often the
copycat answers what the target answers). Both models are reached through target URLs,
so the target can be the served API itself; the queries this costs are counted apart
from the attack's.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from copycat_tf import viz
from copycat_tf.data import problem_domain
from copycat_tf.errors import UserInputError
from copycat_tf.evaluation import metrics
from copycat_tf.targets.base import TargetError
from copycat_tf.targets.registry import open_target
from copycat_tf.targets.retry import predict_with_retries
from copycat_tf.workdir import atomic_write_bytes, atomic_write_json

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


@dataclasses.dataclass
class EvaluateConfig:
    """Everything `run_evaluate` needs.

    Attributes:
      target: target URL (any scheme of targets.registry.open_target).
      copycat: copycat URL, or a SavedModel version directory.
      test_data: PD spec with labels; the test split unless the spec names another.
      out: report directory.
      data_dir: data directory for the PD spec.
      batch_size: images per query.
      max_examples: evaluate on the first N test images only (0: all).
      target_options: client options for the target (api_key, ...).
    """

    target: str
    copycat: str
    test_data: str
    out: str
    data_dir: str | None = None
    batch_size: int = 256
    max_examples: int = 0
    target_options: dict = dataclasses.field(default_factory=dict)


def _url(model: str) -> str:
    """A bare SavedModel path becomes a savedmodel: URL."""
    if "://" in model or model.startswith("savedmodel:"):
        return model
    return f"savedmodel:{model}"


def _describe(url: str, options: dict, role: str):
    client = open_target(url, **options)
    try:
        return client, client.describe()
    except TargetError as e:
        raise UserInputError(f"--{role} {url} cannot be reached or described: {e}") from e


def _predict_all(client, spec, batches, num_classes, role) -> np.ndarray:
    labels = []
    for images in batches:
        try:
            labels.append(predict_with_retries(client, images, num_classes).labels)
        except TargetError as e:
            raise UserInputError(f"--{role} {spec.url} failed during evaluation: {e}") from e
    return np.concatenate(labels)


def run_evaluate(cfg: EvaluateConfig) -> dict:
    """Queries both models on the test data; writes report.json, report.md, PNG plots and
    TensorBoard summaries under cfg.out; returns the report.

    Raises:
      UserInputError: unreachable models, mismatched class counts or input shapes, bad
        test data.
    """
    target, t_spec = _describe(cfg.target, cfg.target_options, "target")
    copycat, c_spec = _describe(_url(cfg.copycat), {}, "copycat")
    if t_spec.input_shape != c_spec.input_shape:
        raise UserInputError(
            f"target takes {t_spec.input_shape} images, copycat {c_spec.input_shape}; "
            "evaluate a copycat trained on this target's fake dataset"
        )
    shape = t_spec.input_shape
    domain, test = problem_domain.load_split(cfg.test_data, cfg.data_dir, image_size=shape[:2])
    if domain.input_shape != shape:
        raise UserInputError(
            f"--test_data {cfg.test_data} has {domain.input_shape} images; the target takes {shape}"
        )
    k = domain.num_classes
    for role, spec in (("target", t_spec), ("copycat", c_spec)):
        if spec.num_classes and spec.num_classes != k:
            raise UserInputError(
                f"--{role} {spec.url} has {spec.num_classes} classes but --test_data "
                f"{cfg.test_data} has {k}; compare models of the same task"
            )
    if cfg.max_examples:
        test = test.take(cfg.max_examples)
    images, truth = [], []
    for x, y in test.batch(cfg.batch_size).as_numpy_iterator():
        images.append(x)
        truth.append(y)
    if not images:
        raise UserInputError(f"--test_data {cfg.test_data} is empty")
    y_true = np.concatenate(truth)
    logging.info("evaluating on %d images of %s", len(y_true), cfg.test_data)
    y_target = _predict_all(target, t_spec, images, k, "target")
    y_copycat = _predict_all(copycat, c_spec, images, k, "copycat")
    target.close()
    copycat.close()

    t = metrics.classification_metrics(y_true, y_target, k)
    c = metrics.classification_metrics(y_true, y_copycat, k)

    def ratio(a, b):
        return a / b if b else None

    report = {
        "test_data": cfg.test_data,
        "num_examples": len(y_true),
        "class_names": domain.class_names,
        "target": {"url": t_spec.url, **t},
        "copycat": {"url": c_spec.url, **c},
        "agreement": float(np.mean(y_target == y_copycat)),
        "ratio": {
            "accuracy": ratio(c["accuracy"], t["accuracy"]),
            "macro_f1": ratio(c["macro_f1"], t["macro_f1"]),
        },
        "target_queries_for_evaluation": len(y_true),
    }
    _write(cfg.out, report)
    return report


def _write(out: str, report: dict) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"--out {out} cannot be created ({e})") from e
    names = report["class_names"]
    atomic_write_json(os.path.join(out, REPORT_JSON), report)
    atomic_write_bytes(os.path.join(out, REPORT_MD), format_markdown(report).encode())
    pictures = {
        "confusion_target": viz.confusion_matrix_figure(
            report["target"]["confusion_matrix"], names, "target"
        ),
        "confusion_copycat": viz.confusion_matrix_figure(
            report["copycat"]["confusion_matrix"], names, "copycat"
        ),
        "per_class_f1": viz.per_class_f1_figure(
            names,
            {
                "target": report["target"]["per_class"]["f1"],
                "copycat": report["copycat"]["per_class"]["f1"],
            },
        ),
    }
    arrays = {n: viz.save_figure(f, os.path.join(out, f"{n}.png")) for n, f in pictures.items()}
    writer = tf.summary.create_file_writer(os.path.join(out, "tensorboard", "eval"))
    with writer.as_default():
        for role in ("target", "copycat"):
            tf.summary.scalar(f"eval/{role}_accuracy", report[role]["accuracy"], step=0)
            tf.summary.scalar(f"eval/{role}_macro_f1", report[role]["macro_f1"], step=0)
        tf.summary.scalar("eval/agreement", report["agreement"], step=0)
        for key, value in report["ratio"].items():
            if value is not None:
                tf.summary.scalar(f"eval/ratio_{key}", value, step=0)
        for name, array in arrays.items():
            tf.summary.image(f"eval/{name}", array[None], step=0)
    writer.close()


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def headline_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, target, copycat, copycat/target) rows of the headline table."""
    t, c, r = report["target"], report["copycat"], report["ratio"]
    return [
        ("accuracy", f"{t['accuracy']:.4f}", f"{c['accuracy']:.4f}", _pct(r["accuracy"])),
        ("macro-F1", f"{t['macro_f1']:.4f}", f"{c['macro_f1']:.4f}", _pct(r["macro_f1"])),
        ("agreement with target", "1.0000", f"{report['agreement']:.4f}", ""),
    ]


def format_markdown(report: dict) -> str:
    """report.md: the headline table, per-class scores, plots."""
    lines = [
        "# Copycat evaluation",
        "",
        f"Test data: `{report['test_data']}` ({report['num_examples']} images). "
        f"Target: `{report['target']['url']}`. Copycat: `{report['copycat']['url']}`.",
        "",
        "| metric | target | copycat | copycat / target |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline_rows(report)],
        "",
        f"Target queries spent by this evaluation: {report['target_queries_for_evaluation']} "
        "(not part of the attack's budget).",
        "",
        "## Per class",
        "",
        "| class | target P | target R | target F1 | copycat P | copycat R | copycat F1 |",
        "|---|---|---|---|---|---|---|",
    ]
    tp, cp = report["target"]["per_class"], report["copycat"]["per_class"]
    for i, name in enumerate(report["class_names"]):
        lines.append(
            f"| {name} | {tp['precision'][i]:.3f} | {tp['recall'][i]:.3f} | {tp['f1'][i]:.3f} "
            f"| {cp['precision'][i]:.3f} | {cp['recall'][i]:.3f} | {cp['f1'][i]:.3f} |"
        )
    lines += [
        "",
        "![target confusion matrix](confusion_target.png) "
        "![copycat confusion matrix](confusion_copycat.png)",
        "",
        "![per-class F1](per_class_f1.png)",
        "",
    ]
    return "\n".join(lines)


def format_table(report: dict, out: str) -> str:
    """The terminal headline table."""
    rows = [("metric", "target", "copycat", "copycat/target"), *headline_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    text += [
        f"{report['num_examples']} test images; {report['target_queries_for_evaluation']} "
        "target queries spent on this evaluation",
        f"report: {os.path.join(out, REPORT_MD)} (and {REPORT_JSON}, *.png); TensorBoard: "
        f"tensorboard --logdir {os.path.join(out, 'tensorboard')}",
    ]
    return "\n".join(text)
