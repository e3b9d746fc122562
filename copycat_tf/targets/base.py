"""The attacker's view of a black box: one interface for every kind of target.

`open_target(url)` picks the client by URL:

  grpc://host:port/<model>[/versions/N|/labels/L]     TF Serving gRPC (tensor_content)
  http(s)://host:port/v1/models/<model>[...]          TF Serving REST (b64 PNG or instances)
  savedmodel:/path/to/export                          in-process, for offline work
  json+http(s)://host:port/<path>                     generic JSON-over-HTTP cloud API

Every client answers `describe()` (input shape, dtype, number of classes, whether scores
come back) and `predict(images)` (stolen labels, and scores when the API gives them).
Errors are TransientError (retry: the query may succeed later) or PermanentError (stop).
"""

from __future__ import annotations

import abc
import dataclasses
import random
import time
from collections.abc import Callable

import numpy as np

from copycat_tf.errors import UserInputError


class TargetError(Exception):
    """A query failed."""


class TransientError(TargetError):
    """Unavailable, overloaded, rate limited, timed out, connection reset: retry later."""


class PermanentError(TargetError):
    """The target refuses this query for good (bad request, unknown model, wrong outputs)."""


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What the attack needs to know about a target, discovered from its metadata.

    Attributes:
      url: the target URL (without credentials).
      input_shape: (H, W, C) of the images the target takes.
      num_classes: number of classes it distinguishes.
      has_scores: whether answers include a score vector (None: unknown until answered).
      details: transport-specific facts recorded in the manifest (model, version, ...).
    """

    url: str
    input_shape: tuple[int, int, int]
    num_classes: int
    has_scores: bool | None
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Prediction:
    """A target's answer for a batch: labels int64 [N], scores float32 [N, K] or None."""

    labels: np.ndarray
    scores: np.ndarray | None = None


class Target(abc.ABC):
    """A black-box classifier behind some API."""

    @abc.abstractmethod
    def describe(self) -> TargetSpec:
        """Discovers input spec and outputs (may query metadata endpoints)."""

    @abc.abstractmethod
    def predict(self, images: np.ndarray, timeout_s: float = 30.0) -> Prediction:
        """Labels (and scores) for uint8 images [N, H, W, C].

        Raises:
          TransientError, PermanentError.
        """

    def close(self) -> None:  # noqa: B027 — optional hook
        """Releases connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_prediction(prediction: Prediction, n: int, num_classes: int, where: str) -> Prediction:
    """Validates an answer's shapes and values.

    Raises:
      PermanentError: outputs of the wrong shape or range (the target is not what
        describe() said).
    """
    labels = np.asarray(prediction.labels)
    if labels.shape != (n,):
        raise PermanentError(f"{where} answered labels of shape {labels.shape}, expected ({n},)")
    if n and (labels.min() < 0 or (num_classes and labels.max() >= num_classes)):
        raise PermanentError(
            f"{where} answered labels outside 0..{num_classes - 1}: {sorted(set(labels))[:5]}"
        )
    scores = prediction.scores
    if scores is not None:
        scores = np.asarray(scores, np.float32)
        expected = (n, num_classes or scores.shape[-1])
        if scores.shape != expected or not np.isfinite(scores).all():
            raise PermanentError(
                f"{where} answered scores of shape {scores.shape} (or non-finite), expected "
                f"({n}, {num_classes})"
            )
    return Prediction(labels.astype(np.int64), scores)


def predict_with_retries(
    client: Target,
    images: np.ndarray,
    num_classes: int,
    *,
    timeout_s: float = 30.0,
    max_retries: int = 8,
    backoff_base_s: float = 0.25,
    backoff_max_s: float = 30.0,
    encoded: list[bytes] | None = None,
    before_attempt: Callable[[], None] | None = None,
    on_transient: Callable[[TransientError], None] | None = None,
) -> Prediction:
    """One checked prediction, retrying transient failures with backoff and full jitter.

    Args:
      client: the target.
      images: uint8 [N, H, W, C].
      num_classes: the label space the answer is checked against (0: unknown).
      timeout_s: per-attempt timeout.
      max_retries: retries after the first attempt.
      backoff_base_s, backoff_max_s: the n-th retry waits uniform(0, min(max, base * 2^n)).
      encoded: PNGs of the images, for clients that send encoded images.
      before_attempt: called before every attempt (e.g. a rate limiter).
      on_transient: called with each transient error (e.g. counting).

    Raises:
      PermanentError: a permanent error, or transient errors beyond max_retries.
    """
    where = getattr(client, "url", type(client).__name__)
    for attempt in range(max_retries + 1):
        if before_attempt is not None:
            before_attempt()
        try:
            prediction = client.predict(images, timeout_s, encoded=encoded)
            return check_prediction(prediction, len(images), num_classes, f"target {where}")
        except TransientError as e:
            if on_transient is not None:
                on_transient(e)
            if attempt == max_retries:
                raise PermanentError(f"{e} (still failing after {max_retries} retries)") from e
            time.sleep(random.uniform(0, min(backoff_max_s, backoff_base_s * 2**attempt)))
    raise AssertionError("unreachable")


def open_target(url: str, **options) -> Target:
    """A client for the target URL (see module docstring).

    Args:
      url: the target URL.
      **options: client options (see each client; the generic JSON client needs its
        request template, response field and input shape here).

    Raises:
      UserInputError: unknown scheme or malformed URL.
    """
    if url.startswith("grpc://"):
        from copycat_tf.targets.tfserving_grpc import GrpcTarget

        return GrpcTarget(url, **_pick(options, GrpcTarget.OPTIONS))
    if url.startswith(("json+http://", "json+https://")):
        from copycat_tf.targets.http_json import JsonHttpTarget

        return JsonHttpTarget(url, **_pick(options, JsonHttpTarget.OPTIONS))
    if url.startswith(("http://", "https://")):
        from copycat_tf.targets.tfserving_rest import RestTarget

        return RestTarget(url, **_pick(options, RestTarget.OPTIONS))
    if url.startswith("savedmodel:"):
        from copycat_tf.targets.saved_model import SavedModelTarget

        return SavedModelTarget(url, **_pick(options, SavedModelTarget.OPTIONS))
    raise UserInputError(
        f"target URL {url!r} has an unknown scheme; expected grpc://host:port/<model>, "
        "http(s)://host:port/v1/models/<model>, savedmodel:<path> or json+http(s)://..."
    )


def _pick(options: dict, names: tuple[str, ...]) -> dict:
    return {k: v for k, v in options.items() if k in names and v is not None}


def parse_model_path(url: str, path: str) -> tuple[str, int | None, str | None]:
    """(<model>, version, label) from '<model>[/versions/N|/labels/L]'.

    Raises:
      UserInputError: the path does not name a model that way.
    """
    parts = [p for p in path.split("/") if p]
    if len(parts) == 1:
        return parts[0], None, None
    if len(parts) == 3 and parts[1] == "versions" and parts[2].isdigit():
        return parts[0], int(parts[2]), None
    if len(parts) == 3 and parts[1] == "labels":
        return parts[0], None, parts[2]
    raise UserInputError(
        f"target URL {url!r}: expected .../<model>, .../<model>/versions/<N> or "
        ".../<model>/labels/<label>"
    )


def select_signature_outputs(outputs: dict) -> tuple[str | None, str | None]:
    """(labels output, scores output) among a signature's {alias: (dtype, shape)}.

    Prefers the target contract's names (`classes`, `scores`); otherwise an int output
    of rank 1 is taken as labels and a float output of rank 2 as scores.
    """
    labels = "classes" if "classes" in outputs else None
    scores = "scores" if "scores" in outputs else None
    for alias, (dtype, shape) in sorted(outputs.items()):
        if labels is None and dtype.is_integer and shape is not None and len(shape) == 1:
            labels = alias
        if scores is None and dtype.is_floating and shape is not None and len(shape) == 2:
            scores = alias
    return labels, scores
