"""Pictures a person would rather look at than numbers: image grids and matrices as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np


def _figure_to_array(fig) -> np.ndarray:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    import tensorflow as tf

    return tf.io.decode_png(buf.getvalue(), channels=3).numpy()


def image_grid(images: np.ndarray, titles: Sequence[str], columns: int = 8) -> np.ndarray:
    """Draws uint8 images [N, H, W, C] with a title each; returns an RGB uint8 array."""
    plt = pyplot()
    n = len(images)
    columns = max(1, min(columns, n))
    rows = max(1, (n + columns - 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.5 * columns, 1.7 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            image = images[i]
            ax.imshow(
                image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255
            )
            ax.set_title(str(titles[i])[:14], fontsize=7)
    return _figure_to_array(fig)


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_figure(cm, class_names: Sequence[str], title: str):
    """A confusion matrix (rows: true class, columns: predicted), row-normalised colours."""
    plt = pyplot()
    cm = np.asarray(cm)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    rows = cm.sum(axis=1, keepdims=True)
    ax.imshow(
        np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0), cmap="Blues", vmin=0, vmax=1
    )
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    ax.set_xticks(range(n), [str(c)[:12] for c in class_names], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [str(c)[:12] for c in class_names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return fig


def per_class_f1_figure(class_names: Sequence[str], series: dict[str, Sequence[float]]):
    """Grouped bars of per-class F1, one colour per model."""
    plt = pyplot()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * n), 3.2))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(np.arange(n) + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(range(n), [str(c)[:12] for c in class_names], rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.legend(fontsize=7)
    ax.set_title("per-class F1", fontsize=9)
    return fig


def save_figure(fig, path: str) -> np.ndarray:
    """Writes a figure as PNG and returns it as an RGB array (for TensorBoard).

    The PNG carries no software version or date, so the same figure gives the same bytes.
    """
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return _figure_to_array(fig)
