"""Training-time augmentation, chosen by name.

Augmenters are Keras preprocessing layers (and keras-cv's RandAugment) applied to whole
batches of float32 pixels in [0, 255] inside the tf.data pipeline, so the exported model
never contains them.
"""

from __future__ import annotations

AUGMENTERS = ("none", "flip", "flip_translate", "geometric", "randaugment")
# A copycat's augment: decided from its fake dataset (training.copycat, data.invariance).
AUTO = "auto"


def build_augmenter(name: str, input_shape: tuple[int, int, int], seed: int = 0):
    """Returns a callable batch -> batch for `name`, or None for "none".

    Args:
      name: one of AUGMENTERS.
      input_shape: (H, W, C) of the images; RandAugment needs C == 3.
      seed: seed of the random layers.

    Raises:
      ValueError: unknown name, or RandAugment on non-RGB images.
    """
    if name == "none":
        return None
    if name == AUTO:
        raise ValueError(
            f"augment {AUTO!r} is decided by train_copycat from a fake dataset's invariance "
            f"probe; pass one of {', '.join(AUGMENTERS)} here"
        )
    import keras

    if name == "flip":
        return keras.Sequential([keras.layers.RandomFlip("horizontal", seed=seed)])
    if name == "flip_translate":
        return keras.Sequential(
            [
                keras.layers.RandomFlip("horizontal", seed=seed),
                keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant", seed=seed),
            ]
        )
    if name == "geometric":
        # Small shifts, flips, rotations and zooms with reflected borders: a constant image
        # stays constant, and a copycat sees each stolen image in many poses (replicated
        # minority-class images are not memorised as they are).
        return keras.Sequential(
            [
                keras.layers.RandomFlip("horizontal", seed=seed),
                keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 1),
                keras.layers.RandomRotation(0.03, fill_mode="reflect", seed=seed + 2),
                keras.layers.RandomZoom(0.1, fill_mode="reflect", seed=seed + 3),
            ]
        )
    if name == "randaugment":
        if input_shape[-1] != 3:
            raise ValueError(
                f"augment 'randaugment' needs RGB images, got {input_shape[-1]} channel(s); "
                "use 'flip' or 'flip_translate'"
            )
        import keras_cv

        return keras_cv.layers.RandAugment(
            value_range=(0, 255), augmentations_per_image=2, magnitude=0.3, seed=seed
        )
    raise ValueError(f"unknown augment {name!r}; valid names: {', '.join(AUGMENTERS)}")
