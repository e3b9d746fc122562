"""See a model stolen end to end, on Fashion-MNIST, with one command.

  python -m copycat_tf.demo            # the default Recipe: 50,000 queries
  python -m copycat_tf.demo --quick    # a first look in a few minutes

Trains (or reuses) the Fashion-MNIST target, serves it with the embedded TF-Serving-
compatible server on free localhost ports, steals it over gRPC with non-problem-domain
images (the Debian openclipart pictures when installed, else procedural images), trains
the copycat, evaluates it against the target and prints the results table. Everything
lands under --workdir (default runs/demo, runs/demo_quick with --quick).
"""

import sys

from absl import flags

from copycat_tf import cli
from copycat_tf.attack.selection import SELECTIONS
from copycat_tf.recipe import Recipe, TargetRecipe

flags.DEFINE_boolean("quick", False, "A small, fast run (Recipe.quick(): fewer queries, epochs).")
flags.DEFINE_string(
    "npd",
    None,
    "NPD spec (default: folder:/usr/share/openclipart/png when present, else the data-free "
    "generator).",
)
flags.DEFINE_string(
    "workdir",
    "",
    "Where everything goes (default: runs/demo or runs/demo_quick, relative to the current "
    "directory).",
)
flags.DEFINE_integer("query_budget", None, "NPD queries (default: the recipe's).", lower_bound=1)
flags.DEFINE_integer(
    "epochs", None, "Target and copycat epochs (default: the recipes').", lower_bound=1
)
flags.DEFINE_enum(
    "selection",
    None,
    list(SELECTIONS),
    "Which NPD items steal sends (see steal --helpfull): rounds chosen by a scout copycat "
    f"(the recipe's {Recipe.selection}, with a share of {Recipe.selection_random:g} of each "
    "round drawn at random; entropy, margin, kcenter, entropy_kcenter, dfal), or random order "
    "(the default with --quick).",
)
flags.DEFINE_string("pd_data", "fashion_mnist", "Problem-domain data of the target.")
flags.DEFINE_string("data_dir", None, "Its data directory (Fashion-MNIST IDX files).")
flags.DEFINE_integer(
    "eval_examples",
    None,
    "Test images to evaluate on (default all, 2000 with --quick).",
    lower_bound=0,
)
FLAGS = flags.FLAGS
QUICK_EVAL_EXAMPLES = 2000


def main(argv):
    del argv
    from copycat_tf.pipeline import AttackConfig, run_attack

    quick = FLAGS.quick
    recipe = cli.recipe_from_flags(FLAGS, Recipe().quick() if quick else Recipe())
    target_recipe = cli.recipe_from_flags(
        FLAGS, TargetRecipe().quick() if quick else TargetRecipe()
    )
    config = AttackConfig(
        workdir=FLAGS.workdir or ("runs/demo_quick" if quick else "runs/demo"),
        recipe=recipe,
        target_recipe=target_recipe,
        pd_data=FLAGS.pd_data,
        data_dir=FLAGS.data_dir,
        eval_examples=(
            FLAGS.eval_examples
            if FLAGS.eval_examples is not None
            else (QUICK_EVAL_EXAMPLES if quick else 0)
        ),
    )
    print(
        f"copycat_tf demo: stealing a {config.pd_data} classifier with up to "
        f"{recipe.query_budget} queries of {recipe.resolved_npd()} over gRPC "
        f"(workdir {config.workdir})",
        flush=True,
    )
    # Keras progress bars on a terminal; one line per epoch in a log file or pipe.
    print(format_results(run_attack(config, verbose=1 if sys.stdout.isatty() else 2)))


def format_results(result: dict) -> str:
    """The demo's closing table."""
    from copycat_tf.data import invariance
    from copycat_tf.evaluation.report import format_table

    report, times, paths = result["report"], result["timings"], result["paths"]
    manifest = result["manifest"]
    skew = manifest["label_statistics"]
    lines = [
        "",
        format_table(report, paths["report"].rsplit("/", 1)[0]),
        f"stolen with {manifest['queries_spent']} queries of {result['npd']} "
        f"(budget {manifest['query_budget']}, {manifest['status']}); stolen labels per class "
        f"{manifest['label_histogram']} (top class {100 * skew['top_share']:.0f}%, entropy "
        f"{skew['entropy_bits']:.2f}/{skew['max_entropy_bits']:.2f} bits)",
        f"copycat trained with {invariance.describe_choice(result['copycat'])}",
        f"time: target {times['target_seconds']:.0f} s, steal {times['steal_seconds']:.0f} s, "
        f"copycat {times['copycat_seconds']:.0f} s, evaluation "
        f"{times['evaluate_seconds']:.0f} s, total {times['total_seconds'] / 60:.1f} min",
        f"target {paths['target']}  copycat {paths['copycat']}",
        f"fake dataset {paths['fake_dataset']}",
        f"TensorBoard: tensorboard --logdir {paths['tensorboard']}",
    ]
    return "\n".join(lines)


def entry() -> None:
    """The console script (copycat-...) and `python -m copycat_tf.demo`."""
    cli.run(main)


if __name__ == "__main__":
    entry()
