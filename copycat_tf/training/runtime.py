"""Process-wide training state: the precision policy and the distribution strategy.

Both are chosen once, by name, in an entry module's main() before any model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import tensorflow as tf

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored", "tpu")


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
    if name == "multi_worker_mirrored":  # before anything starts the runtime (devices)
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return _tpu_strategy()


def _tpu_strategy():
    """TPUStrategy on the TPU TPUClusterResolver finds (TPU_NAME, a TPU VM's local TPU)."""
    import tensorflow as tf

    from copycat_tf.errors import UserInputError

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(
            f"--strategy=tpu: no TPU found ({first}); run on a TPU host (or set TPU_NAME), "
            "or pick another --strategy"
        ) from e
    return tf.distribute.TPUStrategy(resolver)


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


def is_multi_worker(strategy) -> bool:
    """Whether `strategy` spans several worker processes (TF_CONFIG's cluster)."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy) -> bool:
    """Whether this process writes the run's files: always, except the workers of a
    multi-worker run other than its chief (task "chief", else worker 0)."""
    if strategy is None or not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    if not resolver.task_type or resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in cluster


def task_name(strategy) -> str:
    """This process's task in a multi-worker run ("worker 1"), "" otherwise."""
    if strategy is None or not is_multi_worker(strategy):
        return ""
    resolver = strategy.cluster_resolver
    return f"{resolver.task_type} {resolver.task_id}"
