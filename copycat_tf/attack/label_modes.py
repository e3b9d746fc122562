"""Label modes: what a fake-dataset record keeps of the target's answer.

hard      the top-1 label only (the Copycat paper's setting)
topk:K    the K highest scores, renormalised, plus the label
scores    the whole score vector, plus the label
"""

from __future__ import annotations

import dataclasses

import numpy as np

from copycat_tf.errors import UserInputError
from copycat_tf.targets.base import PermanentError


@dataclasses.dataclass(frozen=True)
class LabelMode:
    """A parsed --label_mode: kind "hard", "topk" or "scores"; k for topk."""

    kind: str
    k: int = 0

    @property
    def needs_scores(self) -> bool:
        return self.kind != "hard"

    def stored_scores(self, scores: np.ndarray | None) -> np.ndarray | None:
        """The score vector a record keeps (None for hard labels).

        Raises:
          PermanentError: the mode needs scores and the answer has none.
        """
        if self.kind == "hard":
            return None
        if scores is None:
            raise PermanentError(
                "the target answered without scores; use --label_mode=hard (the paper's setting)"
            )
        if self.kind == "scores":
            return scores
        keep = np.argsort(-scores)[: self.k]
        out = np.zeros_like(scores)
        out[keep] = scores[keep]
        total = out.sum()
        return out / total if total > 0 else out


def parse_label_mode(mode: str) -> LabelMode:
    """Parses --label_mode.

    Raises:
      UserInputError: anything but hard, topk:K (K >= 1) or scores.
    """
    if mode in ("hard", "scores"):
        return LabelMode(mode)
    kind, _, k = mode.partition(":")
    if kind == "topk" and k.isdigit() and int(k) >= 1:
        return LabelMode("topk", int(k))
    raise UserInputError(f"--label_mode={mode!r} is invalid; expected hard, topk:K or scores")
