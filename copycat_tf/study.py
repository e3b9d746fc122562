"""Measure the attack the way the Copycat paper does, and write the results up.

  python -m copycat_tf.study --flagfile=experiments/fashion_mnist/study.flags

Reuses the target of --target_workdir (trains it when missing), serves it with the
embedded model server, then steals each planned fake dataset and trains and evaluates
each planned copycat (studies.plan: the paper's table, the query-budget curve, NPD
sources, class balancing). Writes study.json, RESULTS.md and the plots into
--results_dir (a hand-written PREFACE.md there is included); artefacts go to --workdir.
Re-running resumes; --render_only rewrites RESULTS.md from study.json. A run of some
--parts updates those parts and keeps the other parts' recorded rows in the report.
"""

import dataclasses
import sys

from absl import flags

from copycat_tf import cli
from copycat_tf.attack.selection import SELECTIONS, random_share
from copycat_tf.data.augment import AUGMENTERS, AUTO
from copycat_tf.data.balance import BALANCE_MODES
from copycat_tf.data.generators import GENERATOR_NAMES
from copycat_tf.data.preparation import JITTER_ON
from copycat_tf.models.registry import MODELS
from copycat_tf.recipe import Recipe, TargetRecipe
from copycat_tf.studies.plan import (
    DEFENCES,
    PARTS,
    RATE_LIMITS,
    SELECTION_BUDGETS,
    SELECTION_STRATEGIES,
)

RECIPE = Recipe()
flags.DEFINE_string("name", "fashion_mnist", "The study's name (titles).")
flags.DEFINE_string(
    "results_dir",
    "experiments/fashion_mnist",
    "Where study.json, RESULTS.md and the plots go (relative to the current directory).",
)
flags.DEFINE_string(
    "workdir",
    "runs/fashion_mnist/study",
    "The study's artefacts (relative to the current directory).",
)
flags.DEFINE_string(
    "target_workdir",
    "runs/fashion_mnist/target",
    "train_target's workdir, reused when done (relative to the current directory).",
)
flags.DEFINE_string(
    "model_base_path",
    "runs/fashion_mnist/models",
    "Export root of the target (relative to the current directory).",
)
flags.DEFINE_string("pd_data", "fashion_mnist", "Problem-domain data of the target.")
flags.DEFINE_string("data_dir", None, "Its data directory (default: Debian's Fashion-MNIST).")
flags.DEFINE_list(
    "parts",
    list(PARTS),
    f"What to run: {', '.join(PARTS)}. The report keeps the recorded rows of parts not run.",
)
flags.DEFINE_list("budgets", ["5000", "10000", "25000", "50000"], "Budgets of the budget curve.")
flags.DEFINE_integer(
    "variant_budget",
    10000,
    "Budget of the preparation, generator and label-mode comparisons.",
    lower_bound=1,
)
flags.DEFINE_enum(
    "data_free", "shapes", list(GENERATOR_NAMES), "Generator of the sources part's data-free row."
)
flags.DEFINE_integer(
    "pd_budget", 54000, "Target-labelled PD images of the NPD+PD and PD-only rows.", lower_bound=1
)
flags.DEFINE_list(
    "selection_budgets",
    [str(b) for b in SELECTION_BUDGETS],
    "Budgets of the query-selection part.",
)
flags.DEFINE_list(
    "selections",
    list(SELECTION_STRATEGIES),
    "Strategies of the query-selection part (steal --selection), each against random order; "
    "STRATEGY:SHARE draws that share of each round at random (steal --selection_random).",
)
flags.DEFINE_list(
    "selection_full",
    [],
    "Strategies of the query-selection part also run at the full --query_budget "
    "(STRATEGY or STRATEGY:SHARE).",
)
flags.DEFINE_integer(
    "detector_benign_images",
    10_000,
    "Problem-domain test images the detector part's 10 benign clients share.",
    lower_bound=10,
)
flags.DEFINE_list(
    "defences",
    list(DEFENCES),
    "Served output defences of the defences part (model_server --output_defense specs).",
)
flags.DEFINE_integer(
    "defence_budget", 0, "Query budget of the defences part (0: --query_budget).", lower_bound=0
)
flags.DEFINE_list(
    "rate_limits",
    [f"{q:g}" for q in RATE_LIMITS],
    "Served rate limits of the defences part (model_server --rate_limit_qps, requests per "
    "second per client): the same steal timed under each and without one.",
)
flags.DEFINE_boolean("render_only", False, "Only rewrite RESULTS.md and plots from study.json.")
# The reference attack (copycat_tf.recipe.Recipe); every row starts from it.
flags.DEFINE_string("npd", None, "Natural NPD spec (default: openclipart if installed).")
flags.DEFINE_integer("query_budget", RECIPE.query_budget, "Queries of the reference attack.")
flags.DEFINE_integer("crops_per_image", RECIPE.crops_per_image, "NPD items per source picture.")
flags.DEFINE_enum(
    "npd_jitter_on",
    RECIPE.npd_jitter_on,
    list(JITTER_ON),
    "What the NPD preparation's jitter changes (steal --helpfull).",
)
flags.DEFINE_integer(
    "invariance_probe",
    RECIPE.invariance_probe,
    "Mirror/shift probe of the reference attack's steals (steal --helpfull).",
    lower_bound=0,
)
flags.DEFINE_enum(
    "augment",
    RECIPE.augment,
    [AUTO, *AUGMENTERS],
    "Copycat training augmentation (train_copycat --helpfull).",
)
flags.DEFINE_enum(
    "selection",
    RECIPE.selection,
    list(SELECTIONS),
    "Query selection of the reference attack's steals (steal --helpfull).",
)
flags.DEFINE_float(
    "selection_random",
    RECIPE.selection_random,
    "Share of each selection round drawn at random (steal --helpfull).",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_enum(
    "model",
    RECIPE.model,
    sorted(MODELS),
    "Copycat architecture of the reference attack (the defaults part also trains the "
    "recipe's on the same steals).",
)
flags.DEFINE_integer("epochs", RECIPE.epochs, "Copycat epochs.", lower_bound=1)
flags.DEFINE_integer(
    "patience",
    RECIPE.patience,
    "Copycat epochs without better hold-out agreement before training stops (0: never).",
    lower_bound=0,
)
flags.DEFINE_integer(
    "min_steps",
    RECIPE.min_steps,
    "Optimizer steps a copycat trains at least (more epochs for small budgets).",
    lower_bound=0,
)
flags.DEFINE_integer("finetune_epochs", RECIPE.finetune_epochs, "NPD+PD epochs.", lower_bound=1)
flags.DEFINE_enum("balance", RECIPE.balance, BALANCE_MODES, "Class balancing.")
flags.DEFINE_integer(
    "target_epochs", TargetRecipe.epochs, "Target epochs (when it must be trained).", lower_bound=1
)
FLAGS = flags.FLAGS


def _reference_recipe() -> Recipe:
    """The reference attack of the flags; random order records no random share (the
    default share is its strategy's), as steal records it."""
    recipe = cli.recipe_from_flags(FLAGS, RECIPE)
    return dataclasses.replace(
        recipe, selection_random=random_share(recipe.selection, recipe.selection_random)
    )


def main(argv):
    del argv
    from copycat_tf.errors import UserInputError
    from copycat_tf.studies.plan import check_settings
    from copycat_tf.studies.runner import StudyConfig, run_study

    try:
        budgets = tuple(int(b) for b in FLAGS.budgets)
        selection_budgets = tuple(int(b) for b in FLAGS.selection_budgets)
    except ValueError as e:
        raise UserInputError(
            f"--budgets={FLAGS.budgets} / --selection_budgets={FLAGS.selection_budgets}: "
            "expected whole numbers"
        ) from e
    check_settings(
        FLAGS.parts, FLAGS.selections, FLAGS.selection_full, FLAGS.defences, FLAGS.rate_limits
    )
    run_study(
        StudyConfig(
            name=FLAGS.name,
            results_dir=FLAGS.results_dir,
            workdir=FLAGS.workdir,
            target_workdir=FLAGS.target_workdir,
            model_base_path=FLAGS.model_base_path,
            pd_data=FLAGS.pd_data,
            data_dir=FLAGS.data_dir,
            recipe=_reference_recipe(),
            target_recipe=TargetRecipe(epochs=FLAGS.target_epochs),
            budgets=budgets,
            variant_budget=FLAGS.variant_budget,
            data_free=FLAGS.data_free,
            pd_budget=FLAGS.pd_budget,
            parts=tuple(FLAGS.parts),
            selection_budgets=selection_budgets,
            selections=tuple(FLAGS.selections),
            selection_full=tuple(FLAGS.selection_full),
            detector_benign_images=FLAGS.detector_benign_images,
            defences=tuple(FLAGS.defences),
            defence_budget=FLAGS.defence_budget,
            rate_limits=tuple(float(q) for q in FLAGS.rate_limits),
            command=" ".join(["python -m copycat_tf.study", *sys.argv[1:]]),
            render_only=FLAGS.render_only,
        ),
        flags_text=FLAGS.flags_into_string(),
    )
    print(f"study: {FLAGS.results_dir}/RESULTS.md (from study.json); artefacts in {FLAGS.workdir}")


def entry() -> None:
    """The console script (copycat-...) and `python -m copycat_tf.study`."""
    cli.run(main)


if __name__ == "__main__":
    entry()
