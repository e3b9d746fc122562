"""In-process target: a SavedModel on disk (offline work, and the throughput ceiling)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from copycat_tf import contract
from copycat_tf.errors import UserInputError
from copycat_tf.targets.answers import prediction_from_outputs
from copycat_tf.targets.base import PermanentError, Prediction, Target, TargetInfo
from copycat_tf.targets.signatures import ChosenSignature, TensorInfo, choose_signature


class SavedModelTarget(Target):
    """savedmodel:/path/to/export (a version directory holding saved_model.pb)."""

    OPTIONS = ("signature",)

    def __init__(self, url: str, signature: str = contract.SERVING_DEFAULT):
        self.url = url
        self.path = url[len("savedmodel:") :]
        if not os.path.exists(os.path.join(self.path, "saved_model.pb")):
            raise UserInputError(
                f"target {url}: {self.path} holds no saved_model.pb; pass a SavedModel "
                "version directory, e.g. savedmodel:runs/fashion_mnist/models/target/1"
            )
        self.signature = signature
        self._fn = None
        self._chosen: ChosenSignature | None = None

    def describe(self) -> TargetInfo:
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
            k: TensorInfo(v.dtype, tuple(-1 if d is None else d for d in v.shape))
            for k, v in spec_in.items()
        }
        outputs = {
            k: TensorInfo(v.dtype, tuple(-1 if d is None else d for d in v.shape))
            for k, v in self._fn.structured_outputs.items()
        }
        chosen = self._chosen = choose_signature(self.url, self.signature, inputs, outputs)
        return chosen.target_info(
            self.url,
            {
                "transport": "in-process",
                "model": os.path.abspath(self.path),
                "path": os.path.abspath(self.path),
                "signature": self.signature,
            },
        )

    def predict(
        self, images: np.ndarray, timeout_s: float = 30.0, encoded: list[bytes] | None = None
    ) -> Prediction:
        if self._fn is None:
            self.describe()
        chosen = self._chosen
        try:
            out = self._fn(**{chosen.input: tf.constant(images, dtype=chosen.input_dtype)})
        except (tf.errors.OpError, ValueError, TypeError) as e:
            raise PermanentError(f"target {self.url}: {type(e).__name__}: {e}") from e
        return prediction_from_outputs(
            {k: v.numpy() for k, v in out.items()},
            chosen.labels_out,
            chosen.scores_out,
            f"target {self.url}",
        )
