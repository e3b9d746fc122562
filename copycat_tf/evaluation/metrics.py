"""Classification metrics computed from label vectors (numpy; no framework state)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[num_classes, num_classes] counts; rows are true labels, columns predictions."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"label vectors differ in length: {y_true.shape} vs {y_pred.shape}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def per_class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (0 when undefined)."""
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Accuracy, macro-F1, per-class scores and the confusion matrix.

    Macro-F1 averages F1 over every class that occurs in `y_true` or `y_pred` (as
    scikit-learn does by default): a true class that is never predicted counts with F1 0.

    Returns:
      dict with accuracy, macro_f1, num_examples, per_class (lists) and confusion_matrix.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    scores = per_class_scores(cm)
    total = int(cm.sum())
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return {
        "accuracy": float(np.trace(cm) / total) if total else 0.0,
        "macro_f1": float(scores["f1"][present].mean()) if present.any() else 0.0,
        "num_examples": total,
        "per_class": {k: v.tolist() for k, v in scores.items()},
        "confusion_matrix": cm.tolist(),
    }
