"""SavedModel export with the signatures the attack sees (DESIGN.md, "Contracts").

  serving_default: images uint8 [N, H, W, C]  -> scores float32 [N, K], classes int64 [N]
  serving_bytes:   image_bytes string [N] (PNG/JPEG/GIF/BMP) -> the same outputs

Preprocessing (decoding, resizing, scaling) is inside the graph. Class names are shipped
in assets.extra/class_names.txt, a description in assets.extra/copycat_tf.json. A version
directory appears only complete: it is written under a hidden temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import keras
import tensorflow as tf

from copycat_tf.contract import (
    INPUT_IMAGE_BYTES,
    INPUT_IMAGES,
    OUTPUT_CLASSES,
    OUTPUT_SCORES,
    SERVING_BYTES,
    SERVING_DEFAULT,
)
from copycat_tf.errors import UserInputError
from copycat_tf.workdir import atomic_write_json

ASSETS_EXTRA = "assets.extra"
CLASS_NAMES_FILE = "class_names.txt"
DESCRIPTION_FILE = "copycat_tf.json"
EXPORT_RECORD = "export.json"  # in a training workdir: the export the run made


class _Classifier(tf.Module):
    """Wraps a logits model with the serving signatures."""

    def __init__(self, model: keras.Model, input_shape: tuple[int, int, int]):
        super().__init__()
        self.model = model
        self._shape = tuple(int(d) for d in input_shape)

    def _outputs(self, images):
        logits = tf.cast(self.model(tf.cast(images, tf.float32), training=False), tf.float32)
        return {
            OUTPUT_SCORES: tf.nn.softmax(logits, axis=-1),
            OUTPUT_CLASSES: tf.argmax(logits, axis=-1, output_type=tf.int64),
        }

    def _decode(self, encoded):
        height, width, channels = self._shape
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        image.set_shape([None, None, channels])

        def resize():
            resized = tf.image.resize(image, [height, width], method="bilinear", antialias=True)
            return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

        same = tf.logical_and(tf.shape(image)[0] == height, tf.shape(image)[1] == width)
        return tf.cond(same, lambda: image, resize)

    def signatures(self) -> dict:
        height, width, channels = self._shape

        @tf.function(
            input_signature=[
                tf.TensorSpec([None, height, width, channels], tf.uint8, name=INPUT_IMAGES)
            ]
        )
        def serve_images(images):
            return self._outputs(images)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_IMAGE_BYTES)])
        def serve_bytes(image_bytes):
            images = tf.map_fn(
                self._decode,
                image_bytes,
                fn_output_signature=tf.TensorSpec([height, width, channels], tf.uint8),
            )
            return self._outputs(images)

        return {
            SERVING_DEFAULT: serve_images.get_concrete_function(),
            SERVING_BYTES: serve_bytes.get_concrete_function(),
        }


def next_version(model_dir: str) -> int:
    """1 + the highest numeric version directory under `model_dir` (1 when none)."""
    if not os.path.isdir(model_dir):
        return 1
    versions = [int(d) for d in os.listdir(model_dir) if d.isdigit()]
    return max(versions, default=0) + 1


def check_export_location(model_base_path: str, model_name: str, version: int | None) -> str:
    """Fails early when an export could not be written; returns the model directory.

    Raises:
      UserInputError: the directory cannot be created or written, or the version exists.
    """
    model_dir = os.path.join(model_base_path, model_name)
    try:
        os.makedirs(model_dir, exist_ok=True)
    except OSError as e:
        raise UserInputError(
            f"export directory {model_dir} cannot be created ({e}); pass a writable "
            "--model_base_path"
        ) from e
    if not os.access(model_dir, os.W_OK):
        raise UserInputError(
            f"export directory {model_dir} is not writable; pass a writable --model_base_path"
        )
    if version is not None:
        if int(version) < 1:
            raise UserInputError(f"export version {version} is invalid; expected an integer >= 1")
        final = os.path.join(model_dir, str(version))
        if os.path.exists(final):
            raise UserInputError(
                f"export version {final} already exists; pass another --version, or none "
                "for the next free number"
            )
    return model_dir


def previous_export(workdir: str) -> str | None:
    """The export a finished run in `workdir` made (None when it made none, or it is gone)."""
    path = os.path.join(workdir, EXPORT_RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        export_dir = json.load(f)["export_dir"]
    return export_dir if os.path.isdir(export_dir) else None


def export_once(workdir: str, make_export) -> str:
    """Re-running a workdir reuses its export instead of writing another version."""
    export_dir = previous_export(workdir) or make_export()
    atomic_write_json(os.path.join(workdir, EXPORT_RECORD), {"export_dir": export_dir})
    return export_dir


def export_classifier(
    model: keras.Model,
    class_names: list[str],
    input_shape: tuple[int, int, int],
    model_base_path: str,
    model_name: str,
    version: int | None = None,
    description: dict | None = None,
) -> str:
    """Exports `model` (logits) as `<model_base_path>/<model_name>/<version>/`.

    Args:
      model: Keras model mapping float32 [N, H, W, C] pixels in [0, 255] to logits.
      class_names: label names, one per logit.
      input_shape: (H, W, C) of the serving input.
      model_base_path: root of the model repository (TF Serving's layout).
      model_name: the model's name (a subdirectory of model_base_path).
      version: version number; None picks the next free one.
      description: extra JSON written to assets.extra/copycat_tf.json.

    Returns:
      The path of the new version directory.

    Raises:
      UserInputError: the version exists, or the directory is not writable.
    """
    if len(class_names) != model.output_shape[-1]:
        raise ValueError(
            f"{len(class_names)} class names for a model with {model.output_shape[-1]} outputs"
        )
    model_dir = check_export_location(model_base_path, model_name, version)
    version = next_version(model_dir) if version is None else int(version)
    final = os.path.join(model_dir, str(version))
    # Hidden, non-numeric name: TF Serving (and our server) never takes it for a version.
    tmp = os.path.join(model_dir, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    try:
        module = _Classifier(model, input_shape)
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        extra = os.path.join(tmp, ASSETS_EXTRA)
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, CLASS_NAMES_FILE), "w") as f:
            f.write("".join(name.replace("\n", " ") + "\n" for name in class_names))
        info = {
            "model": model.name,
            "input_shape": list(input_shape),
            "num_classes": len(class_names),
            "signatures": [SERVING_DEFAULT, SERVING_BYTES],
            **(description or {}),
        }
        with open(os.path.join(extra, DESCRIPTION_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if os.path.exists(final):
            raise UserInputError(f"export version {final} appeared while exporting; retry")
        os.rename(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def read_class_names(export_dir: str) -> list[str]:
    """Class names shipped with an export (empty when it has none)."""
    path = os.path.join(export_dir, ASSETS_EXTRA, CLASS_NAMES_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n") for line in f]
