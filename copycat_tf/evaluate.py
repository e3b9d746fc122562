"""Measure how much of the target a copycat copied, on labelled problem-domain test data.

  python -m copycat_tf.evaluate --target=grpc://localhost:8500/target \
      --copycat=runs/fashion_mnist/models/copycat_npd/1 --test_data=fashion_mnist:test \
      --out=runs/fashion_mnist/eval_npd

Writes <out>/report.json, report.md, confusion_target.png, confusion_copycat.png,
per_class_f1.png and TensorBoard summaries; prints the headline table (accuracy,
macro-F1, agreement, copycat/target ratios).
"""

from absl import flags

from copycat_tf import cli

flags.DEFINE_string("target", None, "Target URL (grpc://, http(s)://, savedmodel:, json+...).")
flags.DEFINE_string("copycat", None, "Copycat URL, or its SavedModel version directory.")
flags.DEFINE_string(
    "test_data",
    "fashion_mnist:test",
    "Labelled PD data: fashion_mnist, "
    "tfds:<name> or folder:<path>, with :test (default), :validation or :train.",
)
flags.DEFINE_string("out", None, "Report directory.")
flags.DEFINE_string("data_dir", None, "Data directory of --test_data (IDX folder, TFDS dir).")
flags.DEFINE_integer("batch_size", 256, "Images per query.", lower_bound=1)
flags.DEFINE_integer("max_examples", 0, "Use only the first N test images (0: all).", lower_bound=0)
cli.define_api_key_flags()
flags.adopt_module_key_flags(cli)  # so --help lists them
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from copycat_tf.evaluation.report import EvaluateConfig, format_table, run_evaluate

    report = run_evaluate(
        EvaluateConfig(
            target=FLAGS.target,
            copycat=FLAGS.copycat,
            test_data=FLAGS.test_data,
            out=FLAGS.out,
            data_dir=FLAGS.data_dir,
            batch_size=FLAGS.batch_size,
            max_examples=FLAGS.max_examples,
            target_options={"api_key": cli.api_key_from_flags()},
        )
    )
    print(format_table(report, FLAGS.out))


def entry() -> None:
    """The console script (copycat-...) and `python -m copycat_tf.evaluate`."""
    cli.run(main, required=("target", "copycat", "out"))


if __name__ == "__main__":
    entry()
