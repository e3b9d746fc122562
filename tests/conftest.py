"""Fixtures that make tiny, learnable datasets on disk; no test needs a download."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from copycat_tf._native_log import import_tensorflow_quietly

import_tensorflow_quietly()  # before any test module imports TensorFlow

NUM_CLASSES = 10


def make_pattern_images(labels: np.ndarray, size: int = 28, channels: int = 1, seed: int = 0):
    """uint8 images whose class is a bright horizontal band at a class-specific height."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), size, size, channels), dtype=np.uint8)
    band = max(1, size // NUM_CLASSES)
    for i, y in enumerate(labels):
        top = int(y) * band
        images[i, top : top + band, :, :] = 230
    return images


def write_idx(path: str, array: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def write_fashion_idx(directory: str, n_train: int = 120, n_test: int = 40, gz: bool = True):
    os.makedirs(directory, exist_ok=True)
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        labels = np.arange(n) % NUM_CLASSES
        images = make_pattern_images(labels, seed=seed)[..., 0]
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), images, gz)
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"), labels, gz)
    return directory


@pytest.fixture
def fashion_dir(tmp_path):
    """A Fashion-MNIST-shaped IDX folder (120 train, 40 test, learnable patterns)."""
    return write_fashion_idx(str(tmp_path / "fashion"))


@pytest.fixture
def image_folder(tmp_path):
    """folder:<path> data: 3 classes x 12 RGB PNGs of 16x16."""
    import tensorflow as tf

    root = tmp_path / "pd_folder"
    for c, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True)
        labels = np.full(12, c * 3)
        images = make_pattern_images(labels, size=16, channels=3, seed=c)
        for i, image in enumerate(images):
            png = tf.io.encode_png(image).numpy()
            (root / name / f"{name}_{i:02d}.png").write_bytes(png)
    return str(root)


TINY_SHAPE = (16, 16, 1)
TINY_CLASSES = ["zero", "one", "two"]


def export_tiny_model(base_path: str, name: str = "m", version: int | None = None, seed: int = 0):
    """Exports a small_cnn (16x16x1, 3 classes, random weights) as a real SavedModel."""
    import keras

    from copycat_tf.models import registry
    from copycat_tf.training import export

    keras.utils.set_random_seed(seed)
    model = registry.build_model("small_cnn", TINY_SHAPE, len(TINY_CLASSES))
    return export.export_classifier(
        model, TINY_CLASSES, TINY_SHAPE, base_path, name, version=version
    )


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(model_base_path of model 'm', path of its version 1)."""
    root = tmp_path_factory.mktemp("models")
    path = export_tiny_model(str(root))
    return os.path.join(str(root), "m"), path
