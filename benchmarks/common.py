"""What the benchmarks share: a quiet TensorFlow, a target to measure against, the machine."""

from __future__ import annotations

import os

from copycat_tf._native_log import import_tensorflow_quietly

import_tensorflow_quietly()

SHAPE = (28, 28, 1)  # the Fashion-MNIST target's input
NUM_CLASSES = 10


def export_random_target(workdir: str, model: str = "small_cnn") -> str:
    """Exports an untrained `model` with the target signatures as <workdir>/target/1
    (weights do not change the cost of a prediction); returns the version directory."""
    import keras

    from copycat_tf.models import registry
    from copycat_tf.training import export

    keras.utils.set_random_seed(0)
    net = registry.build_model(model, SHAPE, NUM_CLASSES)
    return export.export_classifier(
        net, [str(i) for i in range(NUM_CLASSES)], SHAPE, workdir, "target"
    )


def machine_line(what: str) -> str:
    import tensorflow as tf

    return f"machine: {os.cpu_count()} cores; TensorFlow {tf.__version__}; {what}"
