"""Model registry: `build_model(name, input_shape, num_classes)`.

Every model takes float32 pixels in [0, 255] of shape `input_shape`, does its own input
scaling (and resizing, when the architecture needs bigger images), and returns float32
logits, also under a mixed-precision policy. Keras is imported when a model is built, so
the names can be listed (flags, --help) without loading TensorFlow.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


def _prepare_input(x, input_shape, min_size: int, rgb: bool):
    """Upsizes images smaller than `min_size` and makes them RGB when `rgb` is set."""
    import keras

    height, width, channels = input_shape
    if height < min_size or width < min_size:
        x = keras.layers.Resizing(max(height, min_size), max(width, min_size), name="upsize")(x)
    if rgb and channels == 1:
        x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    return x


def _logits(x, num_classes: int, dropout: float):
    import keras

    if dropout:
        x = keras.layers.Dropout(dropout)(x)
    # float32 logits keep softmax and the loss numerically safe under mixed precision.
    return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)


def _block_cnn(
    name, input_shape, num_classes, weights, dropout, batch_norm: bool, filters_per_block=(32, 64)
):
    """Conv-pool blocks (32, 64 filters by default), a 128-unit dense layer, the logits.

    Images too small for the blocks' poolings are upsized first (inside the model)."""
    import keras

    inputs = keras.Input(input_shape, name="pixels")
    x = inputs
    if not batch_norm:  # valid padding shrinks the image: 16x16 is the smallest input
        x = _prepare_input(x, input_shape, min_size=16, rgb=False)
    else:  # each block halves the image: a pixel at least must come out of the last one
        x = _prepare_input(x, input_shape, min_size=2 ** len(filters_per_block), rgb=False)
    x = keras.layers.Rescaling(1.0 / 255.0)(x)
    for filters in filters_per_block:
        if batch_norm:
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            # Momentum 0.9, not 0.99: the moving statistics must follow a short
            # fine-tuning stage (NPD -> PD images) within a few dozen steps.
            x = keras.layers.BatchNormalization(momentum=0.9)(x)
            x = keras.layers.ReLU()(x)
        else:
            x = keras.layers.Conv2D(filters, 3, activation="relu")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    model = keras.Model(inputs, _logits(x, num_classes, dropout), name=name)
    _load_weights(model, weights, name)
    return model


def small_cnn(input_shape, num_classes, weights=None, dropout=0.3) -> keras.Model:
    """A fast CNN for 28x28..64x64 images: two conv-BN-ReLU-pool blocks, one dense layer.

    >90% Fashion-MNIST test accuracy in 10 epochs.
    """
    return _block_cnn("small_cnn", input_shape, num_classes, weights, dropout, True)


def deep_cnn(input_shape, num_classes, weights=None, dropout=0.3) -> keras.Model:
    """small_cnn with two more conv-BN-ReLU-pool blocks (128, 256 filters): the copycat's
    default.

    About 1.5x small_cnn's training time per image on a CPU; it fits the target's answers
    on NPD images better (a copy of the same 50,000 stolen labels is closer to the
    target, experiments/fashion_mnist/RESULTS.md, "The recipe's defaults").
    """
    return _block_cnn(
        "deep_cnn", input_shape, num_classes, weights, dropout, True, (32, 64, 128, 256)
    )


def plain_cnn(input_shape, num_classes, weights=None, dropout=0.25) -> keras.Model:
    """Two conv-ReLU-pool blocks with valid padding, no BatchNorm, one dense layer.

    The plain network copies are usually made with: about twice as fast as small_cnn per
    image on a CPU, so a copy trains more epochs in the same time.
    """
    return _block_cnn("plain_cnn", input_shape, num_classes, weights, dropout, False)


def vgg16(input_shape, num_classes, weights=None, dropout=0.5) -> keras.Model:
    """VGG-16 (the Copycat paper's architecture) with a small classifier head.

    `weights` is None (random init) or a local file of ImageNet convolutional weights
    (`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`); nothing is downloaded. With
    weights, grayscale input is repeated to three channels and "caffe" scaling is used.
    """
    import keras

    inputs = keras.Input(input_shape, name="pixels")
    pretrained = weights is not None
    x = _prepare_input(inputs, input_shape, min_size=32, rgb=pretrained)
    if pretrained:
        from copycat_tf.models.layers import CaffePreprocess

        x = CaffePreprocess(name="caffe_preprocess")(x)
    else:
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=x.shape[1:])
    if pretrained:
        _check_file(weights, "vgg16")
        base.load_weights(weights)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(512, activation="relu")(x)
    return keras.Model(inputs, _logits(x, num_classes, dropout), name="vgg16")


def alexnet(input_shape, num_classes, weights=None, dropout=0.5) -> keras.Model:
    """An AlexNet-style network (the 2021 paper's second copycat), sized for small images."""
    import keras

    inputs = keras.Input(input_shape, name="pixels")
    x = _prepare_input(inputs, input_shape, min_size=32, rgb=False)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    for filters, kernel, pool in (
        (64, 5, True),
        (192, 5, True),
        (384, 3, False),
        (256, 3, False),
        (256, 3, True),
    ):
        x = keras.layers.Conv2D(filters, kernel, padding="same", activation="relu")(x)
        if pool:
            x = keras.layers.MaxPooling2D(3, strides=2, padding="same")(x)
    x = keras.layers.Flatten()(x)
    for units in (1024, 1024):
        x = keras.layers.Dropout(dropout)(x)
        x = keras.layers.Dense(units, activation="relu")(x)
    model = keras.Model(inputs, _logits(x, num_classes, 0.0), name="alexnet")
    _load_weights(model, weights, "alexnet")
    return model


def resnet18_v2(input_shape, num_classes, weights=None, dropout=0.0) -> keras.Model:
    """keras-cv's ResNetV2 backbone in its ResNet-18 configuration, built from config.

    keras-cv's `ResNet18V2Backbone` alias would fetch a preset from a hub, so the
    configuration (basic blocks, 2-2-2-2 stacks) is given here and nothing is downloaded.
    """
    import keras
    import keras_cv

    inputs = keras.Input(input_shape, name="pixels")
    x = _prepare_input(inputs, input_shape, min_size=32, rgb=False)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(x)
    backbone = keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[64, 128, 256, 512],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        block_type="basic_block",
        include_rescaling=False,
        input_shape=tuple(x.shape[1:]),
    )
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, _logits(x, num_classes, dropout), name="resnet18_v2")
    _load_weights(model, weights, "resnet18_v2")
    return model


MODELS: dict[str, Callable[..., keras.Model]] = {
    "small_cnn": small_cnn,
    "plain_cnn": plain_cnn,
    "deep_cnn": deep_cnn,
    "vgg16": vgg16,
    "alexnet": alexnet,
    "resnet18_v2": resnet18_v2,
}


def _check_file(path: str, model: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(
            f"weights file {path!r} for model {model!r} does not exist; pass a local file "
            "(nothing is downloaded) or leave --weights empty for random initialisation"
        )


def _load_weights(model, weights: str | None, name: str) -> None:
    if weights:
        _check_file(weights, name)
        model.load_weights(weights)


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    weights: str | None = None,
    dropout: float | None = None,
) -> keras.Model:
    """Builds a registered classifier that returns float32 logits.

    Args:
      name: one of MODELS.
      input_shape: (H, W, C) of the float32 [0, 255] input images.
      num_classes: number of output logits.
      weights: optional local weights file (see each builder).
      dropout: dropout before the logits; None keeps the model's default.

    Raises:
      ValueError: unknown name, bad shape or class count, missing weights file.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    if len(input_shape) != 3 or input_shape[-1] not in (1, 3) or min(input_shape[:2]) < 8:
        raise ValueError(
            f"model {name!r}: input shape {tuple(input_shape)} unsupported; expected "
            "(H, W, C) with H, W >= 8 and C in (1, 3)"
        )
    if num_classes < 2:
        raise ValueError(f"model {name!r}: num_classes={num_classes}; expected at least 2")
    kwargs = {} if dropout is None else {"dropout": dropout}
    return MODELS[name](tuple(input_shape), num_classes, weights=weights or None, **kwargs)
