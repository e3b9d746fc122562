"""Train a copycat on a fake dataset from steal; export it like the target.

  python -m copycat_tf.train_copycat --flagfile=experiments/fashion_mnist/copycat_npd.flags

Writes <workdir>/{flags.txt,config.json,metrics.json}, one trainer run per stage under
<workdir>/npd/ and <workdir>/finetune/ (checkpoints, TensorBoard), and the SavedModel
<model_base_path>/<model_name>/<version>/ with the target's signatures. Re-running with the
same --workdir resumes.
"""

from absl import flags

from copycat_tf import cli
from copycat_tf.data.balance import BALANCE_MODES
from copycat_tf.recipe import Recipe
from copycat_tf.training import flags as training_flags

RECIPE = Recipe()
flags.DEFINE_list("fake_dataset", None, "steal --output_dir(s); several for several workers.")
flags.DEFINE_enum(
    "balance",
    RECIPE.balance,
    BALANCE_MODES,
    "Class balancing of the stolen "
    "labels: replicate minority classes up to N/C (2021 paper), resample every "
    "class to N/C, or none.",
)
flags.DEFINE_float(
    "max_replication",
    RECIPE.max_replication,
    "No class is shown more than this many times its own records per epoch (0: no cap), "
    "so a class with a handful of records is not memorised.",
    lower_bound=0.0,
)
flags.DEFINE_boolean(
    "soft_labels",
    False,
    "Train on the stored score vectors (distillation) "
    "instead of hard labels; needs steal --label_mode=scores or topk:K.",
)
flags.DEFINE_integer(
    "holdout_percent",
    RECIPE.holdout_percent,
    "Share of the fake dataset held out to pick the "
    "best epoch by agreement with the stolen labels.",
    lower_bound=1,
    upper_bound=50,
)
flags.DEFINE_list(
    "pd_fake_dataset",
    [],
    "NPD+PD: steal output of problem-domain images "
    "labelled by the target (steal --npd=pd:...); fine-tunes the copycat.",
)
flags.DEFINE_integer(
    "finetune_epochs",
    RECIPE.finetune_epochs,
    "Epochs of the NPD+PD fine-tuning stage.",
    lower_bound=1,
)
flags.DEFINE_float(
    "finetune_learning_rate",
    RECIPE.finetune_learning_rate,
    "Peak learning rate of the fine-tuning stage (lower than stage 1).",
    lower_bound=0.0,
)
flags.DEFINE_integer(
    "max_records",
    0,
    "Use only the first N queries of the fake dataset "
    "(0: all): the copycat a smaller query budget buys.",
    lower_bound=0,
)
flags.DEFINE_list(
    "class_names", [], "Class names shipped with the export (default class_0, class_1, ...)."
)
training_flags.define_training_flags(model_name_default="copycat", recipe=RECIPE)
flags.adopt_module_key_flags(training_flags)  # so --help lists them
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from copycat_tf.training import runtime
    from copycat_tf.training.copycat import TrainCopycatConfig, format_summary, run_train_copycat

    recipe = cli.recipe_from_flags(FLAGS, RECIPE)
    runtime.set_precision(recipe.precision)
    strategy = runtime.make_strategy(FLAGS.strategy)
    summary = run_train_copycat(
        TrainCopycatConfig(
            fake_dataset=FLAGS.fake_dataset,
            model=recipe.model,
            workdir=FLAGS.workdir,
            model_base_path=FLAGS.model_base_path,
            model_name=FLAGS.model_name,
            version=FLAGS.version,
            balance=recipe.balance,
            max_replication=recipe.max_replication,
            soft_labels=FLAGS.soft_labels,
            holdout_percent=recipe.holdout_percent,
            weights=FLAGS.weights or None,
            train=recipe.train_config(FLAGS.verbose),
            pd_fake_dataset=FLAGS.pd_fake_dataset,
            finetune=recipe.finetune_config(FLAGS.verbose),
            class_names=FLAGS.class_names,
            max_records=FLAGS.max_records,
        ),
        strategy=strategy,
        flags_text=FLAGS.flags_into_string(),
    )
    print(format_summary(summary))


def entry() -> None:
    """The console script (copycat-...) and `python -m copycat_tf.train_copycat`."""
    cli.run(main, required=("fake_dataset", "workdir"))


if __name__ == "__main__":
    entry()
