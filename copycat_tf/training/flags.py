"""Training flags shared by train_target and train_copycat (DESIGN.md's fixed names).

Defaults come from the verb's recipe (copycat_tf.recipe); defining the flags loads no
TensorFlow, so `--help` is instant.
"""

from __future__ import annotations

from absl import flags

from copycat_tf.data.augment import AUGMENTERS, AUTO
from copycat_tf.models.registry import MODELS
from copycat_tf.recipe import Recipe, TargetRecipe
from copycat_tf.training.runtime import PRECISIONS, STRATEGIES


def define_training_flags(model_name_default: str, recipe: Recipe | TargetRecipe) -> None:
    """Defines the model, workdir, export, optimisation and runtime flags."""
    flags.DEFINE_string(
        "workdir",
        None,
        "Run directory: flags, checkpoints, TensorBoard, "
        "metrics. Re-running with the same workdir resumes.",
    )
    flags.DEFINE_enum("model", recipe.model, sorted(MODELS), "Model architecture.")
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
    flags.DEFINE_integer("epochs", recipe.epochs, "Training epochs.", lower_bound=1)
    flags.DEFINE_integer("batch_size", recipe.batch_size, "Global batch size.", lower_bound=1)
    flags.DEFINE_float(
        "learning_rate",
        recipe.learning_rate,
        "Peak learning rate (AdamW, cosine decay).",
        lower_bound=0.0,
    )
    flags.DEFINE_float("weight_decay", recipe.weight_decay, "AdamW weight decay.", lower_bound=0.0)
    if isinstance(recipe, Recipe):  # a copycat: its fake dataset's probe can decide
        flags.DEFINE_enum(
            "augment",
            recipe.augment,
            [AUTO, *AUGMENTERS],
            f"Training augmentation; {AUTO}: flip when the fake dataset's invariance probe "
            "(steal --invariance_probe) finds the target mirror-invariant, else none.",
        )
    else:
        flags.DEFINE_enum("augment", recipe.augment, AUGMENTERS, "Training augmentation.")
    flags.DEFINE_float(
        "mixup",
        recipe.mixup,
        "Mixup of training batches: each image is mixed with another of its batch, and its "
        "target with the other's in the same proportion, drawn from Beta(alpha, alpha); "
        "this is alpha (0: off).",
        lower_bound=0.0,
    )
    flags.DEFINE_float(
        "warmup_epochs",
        recipe.warmup_epochs,
        "Epochs of linear learning-rate warm-up before the cosine decay.",
        lower_bound=0.0,
    )
    flags.DEFINE_integer(
        "patience",
        recipe.patience,
        "Stop after this many epochs without a better eval metric (0: train every epoch).",
        lower_bound=0,
    )
    flags.DEFINE_integer(
        "min_steps",
        recipe.min_steps,
        "Train for at least this many optimizer steps: when --epochs epochs of the "
        "training set are fewer, epochs, --patience and --warmup_epochs grow in proportion "
        "(a small training set is not under-trained); 0: --epochs as given.",
        lower_bound=0,
    )
    flags.DEFINE_enum(
        "mixed_precision",
        recipe.precision,
        PRECISIONS,
        "Precision policy; auto = mixed_float16 on GPU, mixed_bfloat16 on CPUs with native "
        "bfloat16 (AVX512-BF16, AMX), float32 otherwise.",
    )
    flags.DEFINE_enum(
        "strategy",
        "auto",
        STRATEGIES,
        "tf.distribute strategy: auto (all local GPUs, else one device), one_device, mirrored, "
        "multi_worker_mirrored (the cluster in TF_CONFIG; the chief writes checkpoints, "
        "TensorBoard and the export into a workdir every worker can read), tpu (the TPU "
        "TPUClusterResolver finds).",
    )
    flags.DEFINE_integer("seed", recipe.seed, "Seed for splits, shuffling, augmentation, init.")
    flags.DEFINE_integer(
        "verbose",
        2,
        "Keras fit verbosity: 0 silent, 1 bar, 2 line/epoch.",
        lower_bound=0,
        upper_bound=2,
    )
