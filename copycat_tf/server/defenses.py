"""Output defences: what a hardened prediction API does to its scores before answering.

Spec strings (`--output_defense`):

  none                      scores as the model computed them
  top1                      no scores at all: only the top-1 class leaves the server
  topk:K                    the K highest probabilities kept (renormalised), the rest 0
  round:D                   probabilities rounded to D decimals
  reverse_sigmoid:BETA,GAMMA  Lee et al. (2019) "Defending against NN model stealing
                            attacks using deceptive perturbations": y - BETA *
                            (sigmoid(GAMMA * logit(y)) - 1/2), renormalised
  gaussian:SIGMA            N(0, SIGMA^2) noise added, clipped at 0, renormalised

The defended outputs stay consistent: `classes` is the arg-max of the defended scores.
Only the outputs named `scores` and `classes` (the target contract) are touched.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from copycat_tf.contract import OUTPUT_CLASSES as CLASSES
from copycat_tf.contract import OUTPUT_SCORES as SCORES

_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class OutputDefense:
    """A parsed --output_defense."""

    kind: str = "none"
    k: int = 0
    decimals: int = 0
    beta: float = 0.0
    gamma: float = 0.0
    sigma: float = 0.0

    @property
    def hides_scores(self) -> bool:
        return self.kind == "top1"

    def apply(self, outputs: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        """Returns the outputs as the defended API answers them."""
        if self.kind == "none" or SCORES not in outputs:
            return outputs
        out = dict(outputs)
        scores = np.asarray(out.pop(SCORES), dtype=np.float32)
        if self.kind == "top1":
            if CLASSES in out:
                return out
            out[CLASSES] = scores.argmax(axis=-1).astype(np.int64)
            return out
        if self.kind == "topk":
            keep = np.argsort(-scores, axis=-1)[..., : self.k]
            mask = np.zeros_like(scores, dtype=bool)
            np.put_along_axis(mask, keep, True, axis=-1)
            defended = _normalise(np.where(mask, scores, 0.0))
        elif self.kind == "round":
            defended = np.round(scores, self.decimals)
        elif self.kind == "reverse_sigmoid":
            p = np.clip(scores, _EPS, 1 - _EPS)
            logit = np.log(p) - np.log1p(-p)
            r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * logit)) - 0.5)
            defended = _normalise(np.clip(scores - r, 0.0, None))
        elif self.kind == "gaussian":
            noisy = scores + rng.normal(0.0, self.sigma, size=scores.shape)
            defended = _normalise(np.clip(noisy, 0.0, None))
        else:  # parse_defense admits no other kind
            raise AssertionError(self.kind)
        out[SCORES] = defended.astype(np.float32)
        if CLASSES in out:
            out[CLASSES] = defended.argmax(axis=-1).astype(out[CLASSES].dtype)
        return out


def _normalise(x: np.ndarray) -> np.ndarray:
    total = x.sum(axis=-1, keepdims=True)
    uniform = np.full_like(x, 1.0 / x.shape[-1])
    return np.where(total > 0, x / np.where(total > 0, total, 1.0), uniform)


def parse_defense(spec: str) -> OutputDefense:
    """Parses an --output_defense spec.

    Raises:
      ValueError: the spec is not one of the documented forms.
    """
    usage = (
        f"--output_defense={spec!r} is invalid; expected none, top1, topk:K, round:D, "
        "reverse_sigmoid:BETA,GAMMA or gaussian:SIGMA"
    )
    kind, _, arg = spec.strip().partition(":")
    try:
        if kind in ("none", "top1") and not arg:
            return OutputDefense(kind)
        if kind == "topk" and int(arg) >= 1:
            return OutputDefense(kind, k=int(arg))
        if kind == "round" and int(arg) >= 0:
            return OutputDefense(kind, decimals=int(arg))
        if kind == "reverse_sigmoid":
            beta, gamma = (float(v) for v in arg.split(","))
            if beta >= 0 and gamma > 0:
                return OutputDefense(kind, beta=beta, gamma=gamma)
        if kind == "gaussian" and float(arg) >= 0:
            return OutputDefense(kind, sigma=float(arg))
    except ValueError:
        pass
    raise ValueError(usage)
