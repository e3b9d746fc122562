"""Train a copycat on a fake dataset from steal; export it like the target.

  python -m copycat_tf.train_copycat --flagfile=experiments/fashion_mnist/copycat_npd.flags

Writes <workdir>/{flags.txt,config.json,metrics.json}, one trainer run per stage under
<workdir>/npd/ and <workdir>/finetune/ (checkpoints, TensorBoard), and the SavedModel
<model_base_path>/<model_name>/<version>/ with the target's signatures. Re-running with the
same --workdir resumes.
"""

from absl import flags

from copycat_tf import cli
from copycat_tf.data.fake_dataset import BALANCE_MODES
from copycat_tf.training import flags as training_flags
from copycat_tf.training import runtime
from copycat_tf.training.copycat import CopycatConfig, format_summary, run_train_copycat
from copycat_tf.training.trainer import TrainConfig

flags.DEFINE_list("fake_dataset", None, "steal --output_dir(s); several for several workers.")
flags.DEFINE_enum(
    "balance",
    "replicate",
    BALANCE_MODES,
    "Class balancing of the stolen "
    "labels: replicate minority classes up to N/C (2021 paper), resample every "
    "class to N/C, or none.",
)
flags.DEFINE_boolean(
    "soft_labels",
    False,
    "Train on the stored score vectors (distillation) "
    "instead of hard labels; needs steal --label_mode=scores or topk:K.",
)
flags.DEFINE_integer(
    "holdout_percent",
    5,
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
flags.DEFINE_integer("finetune_epochs", 5, "Epochs of the NPD+PD fine-tuning stage.", lower_bound=1)
flags.DEFINE_float(
    "finetune_learning_rate",
    1e-4,
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
training_flags.define_training_flags(model_name_default="copycat")
flags.adopt_module_key_flags(training_flags)  # so --help lists them
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runtime.set_precision(FLAGS.mixed_precision)
    strategy = runtime.make_strategy(FLAGS.strategy)
    train = training_flags.train_config_from_flags(FLAGS)
    summary = run_train_copycat(
        CopycatConfig(
            fake_dataset=FLAGS.fake_dataset,
            model=FLAGS.model,
            workdir=FLAGS.workdir,
            model_base_path=FLAGS.model_base_path,
            model_name=FLAGS.model_name,
            version=FLAGS.version,
            balance=FLAGS.balance,
            soft_labels=FLAGS.soft_labels,
            holdout_percent=FLAGS.holdout_percent,
            weights=FLAGS.weights or None,
            train=train,
            pd_fake_dataset=FLAGS.pd_fake_dataset,
            finetune=TrainConfig(
                epochs=FLAGS.finetune_epochs,
                batch_size=FLAGS.batch_size,
                learning_rate=FLAGS.finetune_learning_rate,
                weight_decay=FLAGS.weight_decay,
                augment=FLAGS.augment,
                seed=FLAGS.seed,
                verbose=FLAGS.verbose,
            ),
            class_names=FLAGS.class_names,
            max_records=FLAGS.max_records,
        ),
        strategy=strategy,
        flags_text=FLAGS.flags_into_string(),
    )
    print(format_summary(summary))


if __name__ == "__main__":
    cli.run(main, required=("fake_dataset", "workdir"))
