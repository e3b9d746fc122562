"""Turning what a target answered into a checked Prediction, the same way for every client.

An answer the attack cannot use (an output of the wrong type or shape, labels outside the
label space, non-finite scores, a tensor that does not decode) is a PermanentError that
names the output, what came and what was expected: the steal stops cleanly and keeps
everything answered before.
"""

from __future__ import annotations

import numpy as np

from copycat_tf.targets.base import PermanentError, Prediction


def decode_tensor_proto(proto, output: str, where: str) -> np.ndarray:
    """A TensorProto of an answer as numpy (tf.make_ndarray).

    Raises:
      PermanentError: the tensor does not decode.
    """
    import tensorflow as tf

    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # any malformed tensor: TypeError, ValueError, KeyError, ...
        try:
            dtype = tf.as_dtype(proto.dtype).name
        except TypeError:
            dtype = f"enum {proto.dtype}"
        raise PermanentError(
            f"{where}: output {output!r} of dtype {dtype} cannot be decoded "
            f"({type(e).__name__}: {e})"
        ) from e


def _labels(value, output: str, where: str) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "iu":
        raise PermanentError(
            f"{where}: output {output!r} answered dtype {array.dtype}; expected integer class "
            "labels (the contract's int64 'classes')"
        )
    return array.astype(np.int64)


def _scores(value, output: str, where: str) -> np.ndarray:
    array = np.asarray(value)
    # float16/bfloat16/float64 scores are still probabilities; keep them as float32.
    if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
        raise PermanentError(
            f"{where}: output {output!r} answered dtype {array.dtype}; expected floating-point "
            "scores (the contract's float32 'scores')"
        )
    return array.astype(np.float32)


def prediction_from_outputs(
    outputs: dict, labels_out: str | None, scores_out: str | None, where: str
) -> Prediction:
    """A Prediction from {output alias: array}; labels are the scores' arg-max when the
    target sends no label output.

    Raises:
      PermanentError: an expected output is missing or of the wrong type.
    """
    scores = None
    if scores_out:
        if scores_out not in outputs:
            raise PermanentError(f"{where}: answer lacks the {scores_out!r} output")
        scores = _scores(outputs[scores_out], scores_out, where)
    if labels_out and labels_out in outputs:
        labels = _labels(outputs[labels_out], labels_out, where)
    elif scores is not None and scores.ndim == 2:
        labels = scores.argmax(axis=-1).astype(np.int64)
    else:
        raise PermanentError(f"{where}: answer lacks the {labels_out!r} output")
    return Prediction(labels, scores)


def check_prediction(prediction: Prediction, n: int, num_classes: int, where: str) -> Prediction:
    """Validates an answer's shapes and values against the batch and the label space.

    Raises:
      PermanentError: outputs of the wrong shape or range (the target is not what
        describe() said).
    """
    labels = _labels(prediction.labels, "labels", where)
    if labels.shape != (n,):
        raise PermanentError(f"{where} answered labels of shape {labels.shape}, expected ({n},)")
    if n and (labels.min() < 0 or (num_classes and labels.max() >= num_classes)):
        raise PermanentError(
            f"{where} answered labels outside 0..{num_classes - 1}: {sorted(set(labels))[:5]}"
        )
    scores = prediction.scores
    if scores is not None:
        scores = _scores(scores, "scores", where)
        expected = (n, num_classes or scores.shape[-1])
        if scores.shape != expected or not np.isfinite(scores).all():
            raise PermanentError(
                f"{where} answered scores of shape {scores.shape} (or non-finite), expected "
                f"({n}, {num_classes})"
            )
    return Prediction(labels, scores)
