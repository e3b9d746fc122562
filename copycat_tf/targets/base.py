"""The attacker's view of a black box: the interface every client implements.

A client answers `describe()` (input shape, number of classes, whether scores come back)
and `predict(images)` (stolen labels, and scores when the API gives them). Its errors are
TransientError (retry: the query may succeed later) or PermanentError (stop). Clients are
picked by URL in `targets.registry.open_target`.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np


class TargetError(Exception):
    """A query failed."""


class TransientError(TargetError):
    """Unavailable, overloaded, rate limited, timed out, connection reset: retry later."""


class RateLimited(TransientError):
    """The target is up but refuses for now (a rate limit or quota: gRPC RESOURCE_EXHAUSTED,
    HTTP 429): wait and ask again."""


class PermanentError(TargetError):
    """The target refuses this query for good (bad request, unknown model, wrong outputs)."""


@dataclasses.dataclass(frozen=True)
class TargetInfo:
    """What the attack knows about a target, discovered from its metadata.

    Attributes:
      url: the target URL (without credentials).
      input_shape: (H, W, C) of the images the target takes.
      num_classes: number of classes it distinguishes (0: not published).
      has_scores: whether answers include a score vector (None: unknown until answered).
      details: transport-specific facts recorded in the manifest (model, version, ...).
      max_batch_size: images one request may carry (0: any); an API that takes one image
        per request gets batches of one, so each paid request is journaled on its own and
        --max_qps counts requests.
    """

    url: str
    input_shape: tuple[int, int, int]
    num_classes: int
    has_scores: bool | None
    details: dict = dataclasses.field(default_factory=dict)
    max_batch_size: int = 0


@dataclasses.dataclass
class Prediction:
    """A target's answer for a batch: labels int64 [N], scores float32 [N, K] or None."""

    labels: np.ndarray
    scores: np.ndarray | None = None


class Target(abc.ABC):
    """A black-box classifier behind some API.

    Attributes:
      url: the URL the client was opened with.
    """

    url: str

    @abc.abstractmethod
    def describe(self) -> TargetInfo:
        """Discovers input spec and outputs (may query metadata endpoints).

        Raises:
          TransientError, PermanentError: the metadata could not be read.
          UserInputError: the target is not an image classifier this tool can query.
        """

    @abc.abstractmethod
    def predict(
        self, images: np.ndarray, timeout_s: float = 30.0, encoded: list[bytes] | None = None
    ) -> Prediction:
        """Labels (and scores) for uint8 images [N, H, W, C].

        Args:
          images: the pixels to classify.
          timeout_s: per-request timeout.
          encoded: lossless PNGs of exactly these pixels, for clients that send encoded
            images (computed once by the caller, not once per retry).

        Raises:
          TransientError, PermanentError.
        """

    def close(self) -> None:  # noqa: B027 — optional hook
        """Releases connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
