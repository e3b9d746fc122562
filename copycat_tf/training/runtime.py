"""Process-wide training state: the precision policy and the distribution strategy.

Both are chosen once, by name, in an entry module's main() before any model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")


def set_precision(name: str) -> str:
    """Sets the global Keras dtype policy and returns the policy applied.

    "auto" means mixed_float16 when a GPU is visible, mixed_bfloat16 on a CPU with native
    bfloat16 arithmetic (AVX512-BF16 or AMX), float32 otherwise. Loss scaling for float16
    is added by Keras when the model is compiled; models keep float32 logits.
    """
    import keras
    import tensorflow as tf

    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; valid: {', '.join(PRECISIONS)}")
    if name == "auto":
        if tf.config.list_physical_devices("GPU"):
            name = "mixed_float16"
        else:
            name = "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"
    keras.mixed_precision.set_global_policy(name)
    return name


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Returns the tf.distribute strategy called `name`.

    "auto" mirrors over all GPUs when there are several, else uses the one device there is.
    "multi_worker_mirrored" reads the cluster from TF_CONFIG.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


def cpu_has_native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes in bfloat16 natively (Linux flags avx512_bf16, amx_bf16).

    Elsewhere bfloat16 is emulated and slower than float32.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool({"avx512_bf16", "amx_bf16"} & set(line.split()))
    except OSError:
        pass
    return False
