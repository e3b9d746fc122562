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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
