"""tf.data input pipelines shared by target and copycat training and by evaluation."""

from __future__ import annotations

import tensorflow as tf


def training_batches(
    ds: tf.data.Dataset,
    batch_size: int,
    augmenter=None,
    shuffle_buffer: int = 10_000,
    seed: int = 0,
    cache: bool = True,
    mixup: float = 0.0,
    num_classes: int = 0,
) -> tf.data.Dataset:
    """Turns an unbatched (uint8 image, label) dataset into float32 training batches.

    Order: cache decoded examples (decode once, not every epoch) -> shuffle (before
    batching, so batches differ between epochs) -> batch -> augment (Keras preprocessing
    layers are vectorised, so one call per batch is cheaper than one per image) ->
    mixup -> prefetch (overlap input with the training step).

    Args:
      ds: unbatched dataset of (uint8 [H, W, C], label).
      batch_size: global batch size.
      augmenter: a batch -> batch callable (see data.augment) or None.
      shuffle_buffer: examples in the shuffle buffer.
      seed: shuffle and augmentation seed.
      cache: keep decoded examples in memory after the first epoch.
      mixup: alpha of mixup (Zhang et al., ICLR 2018): each image becomes
        lam * image + (1 - lam) * the batch's image in the mirrored place, its target the
        same mixture of the two targets, lam ~ Beta(alpha, alpha) per image, drawn anew
        every epoch; 0 is off. Integer labels become one-hot score vectors.
      num_classes: classes of the one-hot vectors (needed with mixup and integer labels).

    Returns:
      Dataset of (float32 [B, H, W, C] in [0, 255], label), the label a float32 score
      vector with mixup.
    """
    if cache:
        ds = ds.cache()
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:
        ds = ds.map(
            lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    if mixup > 0:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, pair: _mix(batch[0], batch[1], pair, mixup, num_classes),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def _mix(x, y, seed_pair, alpha: float, num_classes: int):
    """One batch mixed with itself in reverse order (see training_batches' mixup)."""
    if y.dtype.is_integer:
        if num_classes < 1:
            raise ValueError("mixup of integer labels needs num_classes")
        y = tf.one_hot(y, num_classes)
    y = tf.cast(y, tf.float32)
    n = tf.shape(x)[0]
    seed = tf.cast(seed_pair % (2**31 - 1), tf.int32)
    # Beta(a, a) as G1 / (G1 + G2) of two Gamma(a) draws.
    gammas = tf.random.stateless_gamma([2, n], seed=seed, alpha=alpha)
    lam = gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-12)
    lam_x = tf.reshape(lam, [-1, 1, 1, 1])
    mixed_x = lam_x * x + (1.0 - lam_x) * tf.reverse(x, axis=[0])
    mixed_y = lam[:, None] * y + (1.0 - lam[:, None]) * tf.reverse(y, axis=[0])
    return mixed_x, mixed_y


def eval_batches(ds: tf.data.Dataset, batch_size: int, cache: bool = True) -> tf.data.Dataset:
    """Batches an unbatched (uint8 image, label) dataset for evaluation, in order."""
    if cache:
        ds = ds.cache()
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
