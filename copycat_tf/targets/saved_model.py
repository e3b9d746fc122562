"""In-process target: a SavedModel on disk (offline work, and the throughput ceiling)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from copycat_tf.errors import UserInputError
from copycat_tf.targets.base import (
    PermanentError,
    Prediction,
    Target,
    TargetSpec,
    select_signature_outputs,
)
from copycat_tf.targets.tfserving_grpc import image_input


class SavedModelTarget(Target):
    """savedmodel:/path/to/export (a version directory holding saved_model.pb)."""

    OPTIONS = ("signature",)

    def __init__(self, url: str, signature: str = "serving_default"):
        self.url = url
        self.path = url[len("savedmodel:") :]
        if not os.path.exists(os.path.join(self.path, "saved_model.pb")):
            raise UserInputError(
                f"target {url}: {self.path} holds no saved_model.pb; pass a SavedModel "
                "version directory, e.g. savedmodel:runs/fashion_mnist/models/target/1"
            )
        self.signature = signature
        self._fn = None

    def describe(self) -> TargetSpec:
        loaded = tf.saved_model.load(self.path)
        if self.signature not in loaded.signatures:
            raise UserInputError(
                f"target {self.url} has no signature {self.signature!r}; it has "
                f"{sorted(loaded.signatures)}"
            )
        self._loaded = loaded
        self._fn = loaded.signatures[self.signature]
        spec_in = self._fn.structured_input_signature[1]
        inputs = {
            k: (v.dtype, tuple(-1 if d is None else d for d in v.shape)) for k, v in spec_in.items()
        }
        outputs = {k: (v.dtype, tuple(v.shape)) for k, v in self._fn.structured_outputs.items()}
        self._input, self._dtype, shape = image_input(self.url, inputs)
        self._labels_out, self._scores_out = select_signature_outputs(outputs)
        num_classes = outputs[self._scores_out][1][1] if self._scores_out else 0
        return TargetSpec(
            url=self.url,
            input_shape=shape,
            num_classes=int(num_classes or 0),
            has_scores=self._scores_out is not None,
            details={
                "transport": "in-process",
                "model": os.path.abspath(self.path),
                "path": os.path.abspath(self.path),
                "signature": self.signature,
                "outputs": sorted(outputs),
            },
        )

    def predict(self, images: np.ndarray, timeout_s: float = 30.0, encoded=None) -> Prediction:
        if self._fn is None:
            self.describe()
        try:
            out = self._fn(**{self._input: tf.constant(images, dtype=self._dtype)})
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise PermanentError(f"target {self.url}: {type(e).__name__}: {e}") from e
        scores = out[self._scores_out].numpy() if self._scores_out else None
        labels = out[self._labels_out].numpy() if self._labels_out else scores.argmax(axis=1)
        return Prediction(labels.astype(np.int64), scores)
