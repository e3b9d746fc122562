"""The cost of query-selection rounds (`steal --selection`): scout, candidates, choice.

  .venv/bin/python -m benchmarks.selection_overhead [--pool=50000] [--exploration=2048]
      [--strategies=entropy,adaptive] [--rounds=3] [--npd=...] [--reuse | --warm_start]
      [--items=processes|threads]

For each strategy, --rounds consecutive rounds of `attack.selection.select` on the
Recipe's NPD stream at 28x28x1 (natural pictures when installed), each choosing a tenth of
--pool queries from a pool of --pool candidates, as `steal` runs them after an exploration
of --exploration queries (no target: the labels of the answered queries are drawn at
random, which does not change what a round costs). Items are made as steal's Producer
makes them for a selection: by two worker processes (data.npd_processes), or with
--items=threads by two threads of the benchmark's own process (steal before worker
processes; still steal's way for streams read in order), decoded pictures kept for the
stream's life either way (NpdStream.keep_pictures), so the first round decodes its
pictures and later ones whose pools come back to the same pictures do not. Every round
generates a whole fresh pool (its items made while its scout trains); with --reuse (steal
--selection_reuse), rounds after the first take the round before's unchosen candidates
over, generate only the rest and warm-start their scout; with --warm_start (steal
--selection_warm_start), they generate a whole fresh pool and warm-start their scout.
Prints per round: the answers before it, the pool, carried-over and freshly generated
candidates, the scout's seconds and the round's. The items of answered queries and
candidates stay in memory between rounds as in `steal` (attack.selection.ImageCache).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import shutil
import tempfile
import time

from benchmarks.common import NUM_CLASSES, SHAPE, machine_line

WORKERS = 2  # worker processes (or threads) making NPD items, as steal's Producer runs them


def _round(strategy, directory, index, after, need, pool, labels, fetch, arm_of, reuse, warm):
    from copycat_tf.attack import selection as sel

    start = time.perf_counter()
    selection = sel.select(
        directory,
        strategy,
        index,
        after,
        need,
        pool,
        labels,
        fetch,
        arm_of,
        NUM_CLASSES,
        0,
        reuse=reuse,
        warm_start=warm,
    )
    return selection["rounds"][index], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=50_000)
    parser.add_argument("--exploration", type=int, default=2048, help="answers before round 0")
    parser.add_argument("--strategies", default="entropy,adaptive")
    parser.add_argument("--npd", default="", help="NPD spec (default: the Recipe's)")
    parser.add_argument("--reuse", action="store_true", help="as steal --selection_reuse")
    parser.add_argument("--warm_start", action="store_true", help="as steal --selection_warm_start")
    parser.add_argument("--rounds", type=int, default=3, help="consecutive rounds")
    parser.add_argument(
        "--items", choices=("processes", "threads"), default="processes", help="who makes items"
    )
    args = parser.parse_args()

    import numpy as np

    from copycat_tf.attack import selection as sel
    from copycat_tf.attack.producer import in_blocks
    from copycat_tf.data.npd import NpdStream
    from copycat_tf.data.npd_processes import ItemProcesses
    from copycat_tf.data.preparation import Preparation
    from copycat_tf.recipe import Recipe

    recipe = Recipe(npd=args.npd)
    need = max(1, args.pool // sel.POOL_PER_QUERY)
    rows = []
    for strategy in args.strategies.split(","):
        stream = NpdStream(
            recipe.resolved_npd(),
            SHAPE,
            seed=0,
            crops_per_image=recipe.crops_per_image,
            preparation=Preparation.of(recipe),
        )
        if stream.adapts:  # as after the exploration: arms at their base weights
            stream.arm_weights = stream.preparation.base_weights()
        cache = sel.ImageCache()
        threads = concurrent.futures.ThreadPoolExecutor(WORKERS)
        workers = ItemProcesses(stream, WORKERS, sel.PICTURE_BYTES)
        if args.items == "processes":
            make = workers.items
        else:  # as steal's Producer does for a selection without worker processes
            stream.keep_pictures(sel.PICTURE_BYTES)
            item = stream.item_at_position
            make = functools.partial(in_blocks, item, pool=threads, workers=WORKERS)

        def fetch(positions, cache=cache, make=make):
            return cache.get(positions, make)

        fetch(list(range(args.exploration)))  # sent during the exploration: kept by steal
        rng = np.random.default_rng(0)
        directory = tempfile.mkdtemp(prefix="bench-selection-")
        labels = {k: int(rng.integers(NUM_CLASSES)) for k in range(args.exploration)}
        for index in range(args.rounds):
            after = args.exploration + index * need
            labels.update(
                {k: int(rng.integers(NUM_CLASSES)) for k in range(after) if k not in labels}
            )  # the previous round's answers
            record, seconds = _round(
                strategy,
                directory,
                index,
                after,
                need,
                args.pool,
                labels,
                fetch,
                stream.arm_name,
                args.reuse,
                args.warm_start,
            )
            fresh = record["pool_end"] - record["pool_start"]
            scout = record["scout"]["seconds"] if "scout" in record else 0.0
            rows.append(
                (strategy, index, after, record["pool"], record["carried"], fresh, scout, seconds)
            )
        threads.shutdown()
        workers.close()
        shutil.rmtree(directory, ignore_errors=True)
    print(
        f"\n{'strategy':<10} {'round':>5} {'answers':>7} {'pool':>7} {'carried':>8} "
        f"{'generated':>10} {'scout s':>8} {'round s':>8}"
    )
    for strategy, index, answered, pool, carried, fresh, scout, seconds in rows:
        print(
            f"{strategy:<10} {index:>5} {answered:>7} {pool:>7} {carried:>8} {fresh:>10} "
            f"{scout:>8.1f} {seconds:>8.1f}"
        )
    command = "\ncommand: .venv/bin/python -m benchmarks.selection_overhead"
    print(
        f"{command} --pool={args.pool} --exploration={args.exploration} "
        f"--strategies={args.strategies} --rounds={args.rounds}"
        f"{' --reuse' if args.reuse else ''}{' --warm_start' if args.warm_start else ''}"
        f" --items={args.items}"
    )
    print(
        machine_line(
            f"NPD {recipe.resolved_npd()}, {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, "
            f"items made by {WORKERS} {args.items}"
        )
    )


if __name__ == "__main__":
    main()
