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
) -> tf.data.Dataset:
    """Turns an unbatched (uint8 image, label) dataset into float32 training batches.

    Order: cache decoded examples (decode once, not every epoch) -> shuffle (before
    batching, so batches differ between epochs) -> batch -> augment (Keras preprocessing
    layers are vectorised, so one call per batch is cheaper than one per image) ->
    prefetch (overlap input with the training step).

    Args:
      ds: unbatched dataset of (uint8 [H, W, C], label).
      batch_size: global batch size.
      augmenter: a batch -> batch callable (see data.augment) or None.
      shuffle_buffer: examples in the shuffle buffer.
      seed: shuffle and augmentation seed.
      cache: keep decoded examples in memory after the first epoch.

    Returns:
      Dataset of (float32 [B, H, W, C] in [0, 255], label).
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
    return ds.prefetch(tf.data.AUTOTUNE)


def eval_batches(ds: tf.data.Dataset, batch_size: int, cache: bool = True) -> tf.data.Dataset:
    """Batches an unbatched (uint8 image, label) dataset for evaluation, in order."""
    if cache:
        ds = ds.cache()
    ds = ds.batch(batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
