"""Query a black-box target with non-problem-domain images; write the fake dataset.

  python -m copycat_tf.steal --flagfile=experiments/fashion_mnist/steal_npd.flags

Writes <output_dir>/fake-NNNNN-of-MMMMM.tfrecord shards, manifest.json, and TensorBoard
summaries under <output_dir>/tensorboard. Every answer is journaled the moment it arrives:
re-running the same command after a kill or an error continues where it stopped and
never pays for a query twice. --query_budget is a hard cap on images answered.

  python -m copycat_tf.steal --merge=DIR0,DIR1 --output_dir=OUT

merges the datasets of the workers of a split steal (--shard_index/--num_shards) into one.

  python -m copycat_tf.steal --flagfile=... --runner=DirectRunner --direct_num_workers=2

runs the steal as an Apache Beam pipeline (pip install -r requirements-beam.txt): ranges of
--range_size stream positions, each committed atomically, on any Beam runner (DataflowRunner,
FlinkRunner, SparkRunner, ...); flags steal does not know are passed to Beam as pipeline
options. Same records as the in-process engine; re-running continues and re-sends nothing
committed.
"""

import sys

from absl import flags

from copycat_tf import cli
from copycat_tf.attack.selection import SELECTIONS
from copycat_tf.data.preparation import JITTER_ON
from copycat_tf.recipe import Recipe

RECIPE = Recipe()
flags.DEFINE_string(
    "target",
    None,
    "Target URL: grpc://host:port/<model>[/versions/N|"
    "/labels/L], http(s)://host:port/v1/models/<model>, savedmodel:<dir>, "
    "or json+http(s)://host/path (generic JSON API, see --request_template).",
)
flags.DEFINE_string(
    "npd",
    None,
    "NPD images: folder:<path>, tfds:<name>[:split], "
    "synthetic:shapes|leaves|dead_leaves|noise, pd:<PD spec>, or mix:<w>*<spec>|<w>*<spec>.",
)
flags.DEFINE_string(
    "output_dir",
    None,
    "Fake dataset directory (resumed when it holds this run; refused when it holds another).",
)
flags.DEFINE_integer(
    "query_budget",
    None,
    "Images the target may answer in total; never "
    "exceeded. Raise it on a re-run to extend a dataset.",
    lower_bound=1,
)
flags.DEFINE_integer(
    "query_batch_size", RECIPE.query_batch_size, "Images per request.", lower_bound=1
)
flags.DEFINE_integer("max_in_flight", RECIPE.max_in_flight, "Concurrent requests.", lower_bound=1)
flags.DEFINE_float(
    "max_qps",
    0.0,
    "Requests per second at most; after a rate-limited refusal a few per cent fewer, "
    "drifting back with each answer. 0: no limit given; requests are paced from the "
    "target's first rate-limited refusal on, adapting to its limit.",
    lower_bound=0.0,
)
flags.DEFINE_string(
    "label_mode",
    RECIPE.label_mode,
    "hard (top-1 label, the paper's setting), "
    "topk:K (K best scores kept) or scores (full score vectors).",
)
flags.DEFINE_integer("seed", RECIPE.seed, "NPD order, crops and synthetic images.")
flags.DEFINE_integer("shard_index", 0, "This worker's part of the NPD stream.", lower_bound=0)
flags.DEFINE_integer("num_shards", 1, "Workers splitting the NPD stream.", lower_bound=1)
flags.DEFINE_integer(
    "crops_per_image",
    RECIPE.crops_per_image,
    "NPD items per source image: the full view, then random crops.",
    lower_bound=1,
)
# How natural pictures are prepared for the target (copycat_tf/data/preparation.py).
flags.DEFINE_string(
    "npd_background",
    RECIPE.npd_background,
    "What shows through transparent pixels, drawn per item: random, or a comma list of "
    "black, white, grey, colour, texture.",
)
flags.DEFINE_float("npd_invert", RECIPE.npd_invert, "Probability of a polarity inversion per item.")
flags.DEFINE_float(
    "npd_jitter", RECIPE.npd_jitter, "Strength of brightness/contrast/gamma jitter (0: none)."
)
flags.DEFINE_enum(
    "npd_jitter_on",
    RECIPE.npd_jitter_on,
    list(JITTER_ON),
    "What the jitter changes: picture (the picture before it is laid over its background, "
    "which stays exact) or canvas (the whole image: datasets made before this flag existed "
    "resume with canvas).",
)
flags.DEFINE_float("npd_blur", RECIPE.npd_blur, "Probability of a small Gaussian blur per item.")
flags.DEFINE_string(
    "npd_crop_area", RECIPE.npd_crop_area, "MIN,MAX share of the picture a random crop covers."
)
flags.DEFINE_string("npd_crop_aspect", RECIPE.npd_crop_aspect, "MIN,MAX aspect ratio of crops.")
flags.DEFINE_boolean(
    "npd_cycle",
    RECIPE.npd_cycle,
    "A finite folder starts over with new random crops instead of ending the stream.",
)
flags.DEFINE_integer(
    "npd_adapt_after",
    RECIPE.npd_adapt_after,
    "Explore-then-commit: after this many stream positions, draw backgrounds and polarity "
    "with weights favouring those whose answers were rare labels (0: never adapt).",
    lower_bound=0,
)
flags.DEFINE_integer(
    "invariance_probe",
    RECIPE.invariance_probe,
    "N > 0: stream positions N..2N-1 are mirror images of positions 0..N-1 and 2N..3N-1 "
    "the same shifted by one pixel, so train_copycat --augment=auto learns whether the "
    "target is mirror-invariant (the answers are training data too; with a --selection, N "
    "shrinks to fit its exploration); 0: no probe.",
    lower_bound=0,
)
flags.DEFINE_enum(
    "selection",
    None,
    list(SELECTIONS),
    f"Which NPD items to send (default: {RECIPE.selection} with --selection_random="
    f"{RECIPE.selection_random:g}; random with --runner or --num_shards above 1, which split "
    "the stream). random: the stream in order. The others choose in rounds: "
    "after the --npd_adapt_after exploration (2048 when 0), a scout copycat trained on "
    "every answer so far scores up to --selection_pool unsent candidates and a round of "
    "them is sent; class_balance: likely answered with the classes stolen least; entropy / "
    "margin: the scout's most uncertain; kcenter: most unlike everything stolen (core-set); "
    "entropy_kcenter: core-set among the 4 x round most uncertain (ActiveThief); "
    "dfal: closest to the scout's decision boundary (one DeepFool step, ActiveThief's DFAL); "
    "adaptive: no scout, a bandit (UCB1) over the NPD's arms (mix parts, backgrounds and "
    "polarities) rewarded by how rare their answers' labels are. Each round's choice is "
    "saved in the fake dataset before it is sent.",
)
flags.DEFINE_integer(
    "selection_pool",
    RECIPE.selection_pool,
    "Candidates a selection round scores at most (10 per query it chooses; memory: one "
    "float per class per candidate, plus 128 features for kcenter, entropy_kcenter).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "selection_round",
    RECIPE.selection_round,
    "Queries a selection round chooses (0: an eighth of --query_budget, at least the exploration).",
    lower_bound=0,
)
flags.DEFINE_float(
    "selection_random",
    RECIPE.selection_random,
    "Share of each selection round's queries drawn at random from its candidate pool, the "
    "rest chosen by --selection: uncertainty and diversity alone under-sample the easy, "
    "typical items of each class as the budget grows (0: all by the strategy; random order "
    "has no rounds and ignores the default).",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_boolean(
    "selection_reuse",
    RECIPE.selection_reuse,
    "A selection round takes the round before's unchosen candidates over (scored again) and "
    "warm-starts its scout from the round before's: faster rounds (benchmarks/README.md), "
    "fewer distinct candidates in all (measured at 10,000 queries: a less accurate copy).",
)
flags.DEFINE_boolean(
    "selection_warm_start",
    RECIPE.selection_warm_start,
    "A selection round's scout starts from the round before's and trains a third of the "
    "steps, while every round still scores a pool of fresh candidates (implied by "
    "--selection_reuse). Measured at 10,000 queries: a copy as good as with cold scouts; a "
    "round of a 50,000-candidate pool at 28x28 on 2 cores took 21-28 s against 30-36 s "
    "(benchmarks/README.md).",
)
# The names the query-selection literature (and its issue) uses for the same settings.
flags.DEFINE_alias("round_size", "selection_round")
flags.DEFINE_alias("candidate_pool", "selection_pool")
flags.DEFINE_alias("initial_queries", "npd_adapt_after")
flags.DEFINE_boolean(
    "npd_legacy",
    False,
    "Prepare pictures as before preparation existed (white background, no cycling): to "
    "resume a dataset made by an older copycat_tf.",
)
flags.DEFINE_integer(
    "records_per_shard", 10000, "Records per committed TFRecord shard.", lower_bound=1
)
flags.DEFINE_float(
    "request_timeout",
    30.0,
    "Seconds before a request counts as failed (and is retried).",
    lower_bound=0.1,
)
flags.DEFINE_integer(
    "max_retries",
    8,
    "Retries of a transiently failing request (backoff with jitter) before the run stops.",
    lower_bound=0,
)
flags.DEFINE_integer(
    "num_classes",
    0,
    "The target's class count, for label-only targets whose metadata has no score output.",
    lower_bound=0,
)
flags.DEFINE_string("npd_data_dir", None, "TFDS data dir for tfds: NPD sources.")
flags.DEFINE_integer(
    "npd_workers",
    2,
    "Threads making NPD items; with --selection on a folder: or synthetic: NPD, worker "
    "processes making its candidate pools, each keeping its own decoded pictures (up to "
    "1 GiB; openclipart at 28x28: ~0.9 GB each). The same items whatever the count; "
    "measured with 2 on 2 cores (benchmarks/README.md).",
    lower_bound=1,
)
flags.DEFINE_boolean("progress", True, "Show a progress line on stderr.")
flags.DEFINE_integer(
    "skew_check_after",
    2000,
    "Answers after which steal warns when the stolen labels are skewed "
    "(one class over half of them, or a class never answered).",
    lower_bound=1,
)
# Credentials and the generic JSON client.
cli.define_api_key_flags()
flags.adopt_module_key_flags(cli)  # so --help lists them
flags.DEFINE_string(
    "api_key_header",
    "X-API-Key",
    "Header carrying the key (JSON client; TF Serving clients send x-api-key).",
)
flags.DEFINE_string(
    "request_template",
    "",
    'JSON client: request body with "{{image_b64}}" '
    '(one image per request) or "{{images_b64}}" (a batch); empty = raw PNG.',
)
flags.DEFINE_string(
    "response_field",
    "",
    "JSON client: dotted path to the labels or scores "
    "in the answer, * for list elements, e.g. predictions.*.label.",
)
flags.DEFINE_string("input_shape", "", "JSON client: HxWxC the API takes, e.g. 224x224x3.")
flags.DEFINE_list("class_names", [], "JSON client: the API's class names, in label order.")
flags.DEFINE_list(
    "merge",
    [],
    "Instead of stealing: merge the --output_dir of every worker of one split steal "
    "(--shard_index/--num_shards), comma-separated, into one dataset in --output_dir.",
)
flags.DEFINE_string(
    "runner",
    "",
    "Run the steal as an Apache Beam pipeline on this runner (DirectRunner, FlinkRunner, "
    "SparkRunner, DataflowRunner, ...); flags steal does not know go to Beam as pipeline "
    "options (e.g. --direct_num_workers=2 --direct_running_mode=multi_processing). Empty: "
    "the in-process engine. Random order only.",
)
flags.DEFINE_integer(
    "range_size",
    1024,
    "With --runner: stream positions per unit of work; each range is committed atomically "
    "(a worker lost mid-range re-sends only its requests not yet staged).",
    lower_bound=1,
)
FLAGS = flags.FLAGS


# Required unless --merge is given.
STEAL_REQUIRED = ("target", "npd", "query_budget")


def _input_shape():
    from copycat_tf.errors import UserInputError

    if not FLAGS.input_shape:
        return None
    try:
        shape = tuple(int(d) for d in FLAGS.input_shape.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UserInputError(f"--input_shape={FLAGS.input_shape!r}; expected HxWxC, e.g. 28x28x1")
    return shape


def _selection() -> str:
    """--selection, or its default: the recipe's strategy, random order for a steal split
    across workers (a selection chooses each round from all the answers before it)."""
    from copycat_tf.errors import UserInputError

    split = FLAGS.runner or FLAGS.num_shards > 1
    selection = FLAGS.selection or ("random" if split else RECIPE.selection)
    if selection == "random" and FLAGS["selection_random"].present and FLAGS.selection_random:
        raise UserInputError(
            f"--selection_random={FLAGS.selection_random} shares out a selection's rounds, and "
            "--selection=random has none (it sends every query in random order already); "
            "name a strategy with --selection or drop --selection_random"
        )
    return selection


def main(argv):
    from copycat_tf.attack.steal import StealConfig, format_summary, steal
    from copycat_tf.data.preparation import Preparation
    from copycat_tf.errors import UserInputError
    from copycat_tf.targets.retry import RetryPolicy

    if FLAGS.merge:
        from copycat_tf.attack.merge import format_merge, merge

        print(format_merge(merge(FLAGS.merge, FLAGS.output_dir), FLAGS.output_dir))
        return
    missing = [f"--{name}" for name in STEAL_REQUIRED if FLAGS[name].value is None]
    if missing:
        raise UserInputError(f"{', '.join(missing)} required (or --merge=DIR,... to merge)")
    beam_args = argv[1:]
    if beam_args and not FLAGS.runner:
        raise UserInputError(
            f"unknown flag(s) {' '.join(beam_args)}; see --help (Beam pipeline options are "
            "taken with --runner only)"
        )
    selection = _selection()
    cfg = StealConfig(
        target=FLAGS.target,
        npd=FLAGS.npd,
        output_dir=FLAGS.output_dir,
        query_budget=FLAGS.query_budget,
        query_batch_size=FLAGS.query_batch_size,
        max_in_flight=FLAGS.max_in_flight,
        max_qps=FLAGS.max_qps,
        label_mode=FLAGS.label_mode,
        seed=FLAGS.seed,
        shard_index=FLAGS.shard_index,
        num_shards=FLAGS.num_shards,
        crops_per_image=FLAGS.crops_per_image,
        preparation=Preparation.of(cli.recipe_from_flags(FLAGS, RECIPE), FLAGS.npd_legacy),
        records_per_shard=FLAGS.records_per_shard,
        npd_workers=FLAGS.npd_workers,
        retry=RetryPolicy(timeout_s=FLAGS.request_timeout, max_retries=FLAGS.max_retries),
        num_classes=FLAGS.num_classes,
        npd_data_dir=FLAGS.npd_data_dir,
        skew_check_after=FLAGS.skew_check_after,
        selection=selection,
        selection_pool=FLAGS.selection_pool,
        selection_round=FLAGS.selection_round,
        selection_reuse=FLAGS.selection_reuse,
        selection_warm_start=FLAGS.selection_warm_start,
        selection_random=FLAGS.selection_random,
        progress=FLAGS.progress,
        target_options={
            "api_key": cli.api_key_from_flags(),
            "api_key_header": FLAGS.api_key_header,
            "request_template": FLAGS.request_template,
            "response_field": FLAGS.response_field,
            "input_shape": _input_shape(),
            "num_classes": FLAGS.num_classes or None,
            "class_names": FLAGS.class_names,
        },
    )
    if FLAGS.runner:
        import logging

        # Beam's notices at import about optional cloud clients (some on the root logger)
        # are not the user's business.
        silence = logging.Filter("apache_beam")
        logging.getLogger().addFilter(silence)
        logging.getLogger("apache_beam").setLevel(logging.ERROR)
        try:
            from copycat_tf.attack.beam_steal import steal_beam
        except ImportError as e:
            raise UserInputError(
                f"--runner needs Apache Beam ({e}); install it with "
                "pip install -r requirements-beam.txt (or pip install 'copycat-tf[beam]')"
            ) from e
        finally:
            logging.getLogger().removeFilter(silence)
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
        manifest = steal_beam(cfg, FLAGS.runner, beam_args, FLAGS.range_size)
    else:
        manifest = steal(cfg)
    print(format_summary(manifest, FLAGS.output_dir))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, except that flags steal does not know are kept (for Beam)."""
    try:
        return FLAGS(argv, known_only=True)
    except flags.Error as e:
        print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
        print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
        sys.exit(1)


def entry() -> None:
    """The console script (copycat-...) and `python -m copycat_tf.steal`."""
    cli.run(main, required=("output_dir",), flags_parser=_parse_flags)


if __name__ == "__main__":
    entry()
