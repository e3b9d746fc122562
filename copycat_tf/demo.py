"""See a model stolen end to end, on Fashion-MNIST, with one command.

  python -m copycat_tf.demo            # 50,000 queries, 10 epochs
  python -m copycat_tf.demo --quick    # a first look: 1.5 min measured on 2 CPU cores

Trains (or reuses) the Fashion-MNIST target, serves it with the embedded TF-Serving-
compatible server on free localhost ports, steals it over gRPC with non-problem-domain
images (the Debian openclipart pictures when installed, else procedural dead leaves),
trains the copycat, evaluates it against the target and prints the results table.
Everything lands under --workdir (default runs/demo, runs/demo_quick with --quick).
"""

from absl import flags

from copycat_tf import cli
from copycat_tf.pipeline import AttackConfig, default_npd, run_attack

flags.DEFINE_boolean("quick", False, "A small, fast run (5k queries, few epochs).")
flags.DEFINE_string(
    "npd",
    "",
    "NPD spec (default: folder:/usr/share/openclipart/png when "
    "present, else synthetic:dead_leaves).",
)
flags.DEFINE_string("workdir", "", "Where everything goes (default runs/demo or runs/demo_quick).")
flags.DEFINE_integer(
    "query_budget", 0, "NPD queries (default 50000, 5000 with --quick).", lower_bound=0
)
flags.DEFINE_integer(
    "epochs", 0, "Target and copycat epochs (default 10, 2 with --quick).", lower_bound=0
)
flags.DEFINE_string("pd_data", "fashion_mnist", "Problem-domain data of the target.")
flags.DEFINE_string("data_dir", None, "Its data directory (Fashion-MNIST IDX files).")
flags.DEFINE_integer(
    "eval_examples",
    0,
    "Test images to evaluate on (default all, 2000 with --quick).",
    lower_bound=0,
)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    quick = FLAGS.quick
    epochs = FLAGS.epochs or (2 if quick else 10)
    config = AttackConfig(
        workdir=FLAGS.workdir or ("runs/demo_quick" if quick else "runs/demo"),
        pd_data=FLAGS.pd_data,
        data_dir=FLAGS.data_dir,
        npd=FLAGS.npd or default_npd(),
        query_budget=FLAGS.query_budget or (5000 if quick else 50_000),
        target_epochs=epochs,
        copycat_epochs=epochs,
        eval_examples=FLAGS.eval_examples or (2000 if quick else 0),
    )
    print(
        f"copycat_tf demo: stealing a {config.pd_data} classifier with "
        f"{config.query_budget} queries of {config.npd} over gRPC (workdir {config.workdir})",
        flush=True,
    )
    print(format_results(run_attack(config, verbose=1)))


def format_results(result: dict) -> str:
    """The demo's closing table."""
    from copycat_tf.evaluation.report import format_table

    report, times, paths = result["report"], result["timings"], result["paths"]
    return "\n".join(
        [
            "",
            format_table(report, paths["report"].rsplit("/", 1)[0]),
            f"stolen with {result['queries_spent']} queries of {result['npd']}; stolen labels per "
            f"class {result['stolen_label_histogram']}",
            f"time: target {times['target_seconds']:.0f} s, steal {times['steal_seconds']:.0f} s, "
            f"copycat {times['copycat_seconds']:.0f} s, evaluation "
            f"{times['evaluate_seconds']:.0f} s, total {times['total_seconds'] / 60:.1f} min",
            f"target {paths['target']}  copycat {paths['copycat']}",
            f"fake dataset {paths['fake_dataset']}",
            f"TensorBoard: tensorboard --logdir {paths['tensorboard']}",
        ]
    )


if __name__ == "__main__":
    cli.run(main)
