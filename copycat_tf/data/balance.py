"""Class balancing of stolen labels: how often each class is shown per training epoch.

Stolen labels are unbalanced (the 2021 paper saw 1.69M vs 52k); a copycat trained on them
as they are learns the majority classes only.

  none        as stolen
  replicate   the 2021 paper: classes under N/C records are replicated up to N/C, the
              others kept as they are
  resample    every present class exactly N/C per epoch

N is the number of records, C the number of classes with at least one record. With
`max_replication` R > 0 no class is shown more than R times its own records per epoch, so
a class with a handful of records is not memorised from hundreds of copies.
"""

from __future__ import annotations

import numpy as np

BALANCE_MODES = ("none", "replicate", "resample")


def class_targets(counts, mode: str, max_replication: float = 0.0) -> np.ndarray:
    """Records per class in one balanced epoch (see module docstring).

    Raises:
      ValueError: unknown mode.
    """
    if mode not in BALANCE_MODES:
        raise ValueError(f"unknown balance {mode!r}; valid: {', '.join(BALANCE_MODES)}")
    counts = np.asarray(counts, np.int64)
    present = counts > 0
    if mode == "none" or not present.any():
        return counts.copy()
    share = int(counts.sum() // present.sum())
    if mode == "replicate":
        targets = np.where(present, np.maximum(counts, share), 0)
    else:
        targets = np.where(present, share, 0)
    if max_replication > 0:
        cap = np.floor(counts * max_replication).astype(np.int64)
        targets = np.where(targets > counts, np.minimum(targets, np.maximum(cap, counts)), targets)
    return targets


def balanced(ds, counts, mode: str, seed: int = 0, max_replication: float = 0.0):
    """Re-weights a (image, label, ...) tf.data dataset so each epoch has `class_targets`
    records.

    Each class is read from its own (cycled, shuffled) stream and drawn in a shuffled
    order with exact per-class counts, so a replicated minority class shows each of its
    images about equally often.

    Returns:
      (dataset of one epoch, records per class).
    """
    import tensorflow as tf

    targets = class_targets(counts, mode, max_replication)
    if mode == "none":
        return ds, targets
    # One cached stream per class: after the first epoch a minority class is read from
    # its own small cache instead of by filtering the whole dataset again and again.
    streams = [
        ds.filter(lambda *e, c=c: tf.equal(e[1], c))
        .cache()
        .shuffle(max(int(counts[c]), 1), seed=seed + c, reshuffle_each_iteration=True)
        .repeat()
        for c in range(len(counts))
    ]
    choice = np.repeat(np.arange(len(counts), dtype=np.int64), targets)

    def epoch_order(_):
        return tf.data.Dataset.from_tensor_slices(tf.random.shuffle(choice, seed=seed))

    # A new shuffled class order every epoch (the choice dataset is re-made per iteration).
    order = tf.data.Dataset.range(1).flat_map(epoch_order)
    epoch = tf.data.Dataset.choose_from_datasets(streams, order)
    return epoch.apply(tf.data.experimental.assert_cardinality(int(targets.sum()))), targets
