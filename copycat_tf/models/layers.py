"""Custom Keras layers of the registry's models."""

from __future__ import annotations

import keras

# ImageNet channel means (BGR) of the original VGG-16 ("caffe" preprocessing).
VGG_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="copycat_tf")
class CaffePreprocess(keras.layers.Layer):
    """RGB [0, 255] -> BGR minus ImageNet mean, as the original VGG-16 weights expect."""

    def call(self, x):
        x = keras.ops.flip(x, axis=-1)
        return x - keras.ops.convert_to_tensor(VGG_BGR_MEAN, dtype=x.dtype)
