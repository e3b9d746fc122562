"""Train the target ("oracle") classifier and export it as a SavedModel.

  python -m copycat_tf.train_target --flagfile=experiments/fashion_mnist/target.flags

Writes <workdir>/{flags.txt,config.json,checkpoints/,tensorboard/,metrics.json} and the
SavedModel <model_base_path>/<model_name>/<version>/ (signatures serving_default and
serving_bytes). Re-running with the same --workdir resumes.
"""

from absl import flags

from copycat_tf import cli
from copycat_tf.recipe import TargetRecipe
from copycat_tf.training import flags as training_flags

flags.DEFINE_string(
    "pd_data", None, "Problem-domain data: fashion_mnist, tfds:<name> or folder:<path>."
)
flags.DEFINE_string(
    "data_dir",
    None,
    "fashion_mnist: folder of the IDX files (default "
    "/usr/share/datasets/fashion-mnist); tfds: the TFDS data dir.",
)
flags.DEFINE_string("image_size", "", "Resize images to H or HxW (default: keep).")
training_flags.define_training_flags(model_name_default="target", recipe=TargetRecipe())
flags.adopt_module_key_flags(training_flags)  # so --help lists them
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from copycat_tf.training import runtime
    from copycat_tf.training.target import TrainTargetConfig, format_summary, run_train_target

    recipe = cli.recipe_from_flags(FLAGS, TargetRecipe())
    runtime.set_precision(recipe.precision)
    strategy = runtime.make_strategy(FLAGS.strategy)
    summary = run_train_target(
        TrainTargetConfig(
            pd_data=FLAGS.pd_data,
            model=recipe.model,
            workdir=FLAGS.workdir,
            model_base_path=FLAGS.model_base_path,
            model_name=FLAGS.model_name,
            version=FLAGS.version,
            data_dir=FLAGS.data_dir,
            image_size=cli.parse_image_size(FLAGS.image_size),
            weights=FLAGS.weights or None,
            train=recipe.train_config(FLAGS.verbose),
        ),
        strategy=strategy,
        flags_text=FLAGS.flags_into_string(),
    )
    print(format_summary(summary))


def entry() -> None:
    """The console script (copycat-...) and `python -m copycat_tf.train_target`."""
    cli.run(main, required=("pd_data", "workdir"))


if __name__ == "__main__":
    entry()
