"""One checked prediction, retrying transient failures with backoff and full jitter."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable

import numpy as np

from copycat_tf.targets.answers import check_prediction
from copycat_tf.targets.base import (
    PermanentError,
    Prediction,
    RateLimited,
    Target,
    TargetInfo,
    TransientError,
)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long to wait for an answer and how to retry transient failures: the n-th retry
    waits uniform(0, min(backoff_max_s, backoff_base_s * 2^n)) ("full jitter")."""

    timeout_s: float = 30.0
    max_retries: int = 8
    backoff_base_s: float = 0.25
    backoff_max_s: float = 30.0

    def backoff_s(self, attempt: int) -> float:
        """The longest wait after failed attempt `attempt` (0-based)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt)


def describe_with_retries(client: Target, retry: RetryPolicy | None = None) -> TargetInfo:
    """The target's metadata; a rate-limited target (up, but refusing for now) is asked
    again after the policy's growing waits, as predictions are; any other failure (an
    unreachable target) is raised at once.

    Raises:
      RateLimited: still refused after max_retries; TransientError, PermanentError.
    """
    r = retry or RetryPolicy()
    for attempt in range(r.max_retries + 1):
        try:
            return client.describe()
        except RateLimited:
            if attempt == r.max_retries:
                raise
            time.sleep(r.backoff_s(attempt))
    raise AssertionError("unreachable")


def predict_with_retries(
    client: Target,
    images: np.ndarray,
    num_classes: int,
    retry: RetryPolicy | None = None,
    *,
    encoded: list[bytes] | None = None,
    before_attempt: Callable[[], None] | None = None,
    on_transient: Callable[[TransientError], None] | None = None,
) -> Prediction:
    """One checked prediction, retrying transient failures.

    Args:
      client: the target.
      images: uint8 [N, H, W, C].
      num_classes: the label space the answer is checked against (0: unknown).
      retry: timeout and retries (default RetryPolicy()).
      encoded: PNGs of the images, for clients that send encoded images.
      before_attempt: called before every attempt (e.g. a rate limiter).
      on_transient: called with each transient error (e.g. counting).

    Returns:
      The checked Prediction.

    Raises:
      PermanentError: a permanent error, or transient errors beyond max_retries.
    """
    r = retry or RetryPolicy()
    where = f"target {client.url}"
    for attempt in range(r.max_retries + 1):
        if before_attempt is not None:
            before_attempt()
        try:
            prediction = client.predict(images, r.timeout_s, encoded=encoded)
            return check_prediction(prediction, len(images), num_classes, where)
        except TransientError as e:
            if on_transient is not None:
                on_transient(e)
            if attempt == r.max_retries:
                raise PermanentError(f"{e} (still failing after {r.max_retries} retries)") from e
            time.sleep(random.uniform(0, r.backoff_s(attempt)))
    raise AssertionError("unreachable")
