"""Explore-then-commit NPD preparation (data.preparation's `adapt_after`).

The first `adapt_after` stream positions are prepared with the base arm probabilities.
Once every one of them is settled (answered or skipped), the arm weights of all later
positions are computed from their answers alone, so they are the same on every run and
every resume: a killed steal recovers the exploration's labels from its shards and
journal and continues with the same weights.
"""

from __future__ import annotations

import threading

import numpy as np

from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.npd import NpdStream
from copycat_tf.data.preparation import adapted_weights


class Exploration:
    """The answers up to a bound as they arrive (thread-safe), and the weights they give.

    The bound is the exploration's end; a query selection moves it on, round by round
    (`extend`), and waits each time until every position before it is settled.

    Args:
      stream: the worker's NPD stream.
      watermark: positions below it are committed (settled whatever they were).
      committed: (query index, label) of committed records.
      num_classes: the label space.
      bound: the exploration's end (the preparation's adapt_after when it adapts).
      keep_all: keep the labels of every position, not only those before `bound` (a query
        selection trains its scout on all of them).
    """

    def __init__(
        self,
        stream: NpdStream,
        watermark: int,
        committed,
        num_classes: int,
        bound: int,
        keep_all: bool = False,
    ):
        self.stream = stream
        self.explored = self.bound = bound
        self.num_classes = num_classes
        self.keep_all = keep_all
        self._watermark = watermark
        self._settled: set[int] = set()
        self._labels = {
            int(k): int(y) for k, y in zip(*committed, strict=True) if keep_all or k < bound
        }
        self._pending: set[int] = set()
        self._cond = threading.Condition()
        self.extend(bound)

    def extend(self, bound: int) -> None:
        """Moves the bound on: `wait` then waits for every position before it."""
        stride, shard = self.stream.num_shards, self.stream.shard_index
        start = self._watermark + (shard - self._watermark) % stride
        with self._cond:
            self.bound = bound
            self._pending = {k for k in range(start, bound, stride) if k not in self._settled}

    def settle(self, index: int, label: int | None) -> None:
        """Records a settled position (label None for an unreadable NPD item)."""
        if index >= self.bound and not self.keep_all:
            return
        with self._cond:
            if label is not None:
                self._labels[index] = label
            self._settled.add(index)
            self._pending.discard(index)
            if not self._pending:
                self._cond.notify_all()

    def wait(self, stop: threading.Event) -> bool:
        """Blocks until every position before the bound is settled; False when stopped."""
        with self._cond:
            while self._pending:
                if stop.is_set():
                    return False
                self._cond.wait(timeout=0.2)
        return True

    def labels(self) -> dict[int, int]:
        """{position: stolen label} of every answer before the bound."""
        with self._cond:
            return {k: y for k, y in self._labels.items() if k < self.bound}

    def adapt(self) -> dict:
        """Sets the stream's arm weights from the exploration; returns the record of it."""
        with self._cond:
            labels = {k: y for k, y in self._labels.items() if k < self.explored}
        answers = []
        for k, label in sorted(labels.items()):
            arm = self.stream.arm(k)
            if arm is not None:
                answers.append((arm, label))
        prep = self.stream.preparation
        weights, bits = adapted_weights(len(prep.arms), answers, self.num_classes)
        self.stream.arm_weights = weights
        return {
            "after": self.explored,
            "answers": len(answers),
            "arms": [
                {
                    "background": background,
                    "inverted": inverted,
                    "base_weight": round(float(base), 4),
                    "bits": round(float(b), 4),
                    "weight": round(float(w), 4),
                }
                for (background, inverted), base, b, w in zip(
                    prep.arms, prep.base_weights(), bits, weights, strict=True
                )
            ],
        }


def committed_labels(directory: str, manifest: dict, bound: int):
    """(indices, labels) of committed records below `bound` (shards read only if needed)."""
    shards = [s for s in manifest["shards"] if s["first_index"] < bound]
    if not shards:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return fd.index_labels([f"{directory}/{s['file']}" for s in shards])
