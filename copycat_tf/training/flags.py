"""Training flags shared by train_target and train_copycat (DESIGN.md's fixed names)."""

from __future__ import annotations

from absl import flags

from copycat_tf.data.augment import AUGMENTERS
from copycat_tf.models.registry import MODELS
from copycat_tf.training.runtime import PRECISIONS, STRATEGIES
from copycat_tf.training.trainer import TrainConfig


def define_training_flags(model_name_default: str) -> None:
    """Defines the model, workdir, export, optimisation and runtime flags."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Run directory: flags, checkpoints, TensorBoard, "
        "metrics. Re-running with the same workdir resumes.",
    )
    flags.DEFINE_enum("model", "small_cnn", sorted(MODELS), "Model architecture.")
    flags.DEFINE_string(
        "weights", "", "Optional local weights file for --model (nothing is downloaded)."
    )
    flags.DEFINE_string(
        "model_base_path",
        "",
        "Export root: the SavedModel goes to "
        "<model_base_path>/<model_name>/<version>/. Default <workdir>/models.",
    )
    flags.DEFINE_string("model_name", model_name_default, "Name of the exported model.")
    flags.DEFINE_integer(
        "version", None, "Export version; default: the next free number.", lower_bound=1
    )
    flags.DEFINE_integer("epochs", 10, "Training epochs.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 128, "Global batch size.", lower_bound=1)
    flags.DEFINE_float(
        "learning_rate", 1e-3, "Peak learning rate (AdamW, cosine decay).", lower_bound=0.0
    )
    flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.", lower_bound=0.0)
    flags.DEFINE_enum("augment", "none", AUGMENTERS, "Training augmentation.")
    flags.DEFINE_enum(
        "mixed_precision",
        "auto",
        PRECISIONS,
        "Precision policy; auto = mixed_float16 on GPU, float32 otherwise.",
    )
    flags.DEFINE_enum("strategy", "auto", STRATEGIES, "tf.distribute strategy.")
    flags.DEFINE_integer("seed", 0, "Seed for splits, shuffling, augmentation, init.")
    flags.DEFINE_integer(
        "verbose",
        2,
        "Keras fit verbosity: 0 silent, 1 bar, 2 line/epoch.",
        lower_bound=0,
        upper_bound=2,
    )


def train_config_from_flags(values: flags.FlagValues) -> TrainConfig:
    """The TrainConfig the training flags describe."""
    return TrainConfig(
        epochs=values.epochs,
        batch_size=values.batch_size,
        learning_rate=values.learning_rate,
        weight_decay=values.weight_decay,
        augment=values.augment,
        seed=values.seed,
        verbose=values.verbose,
    )
