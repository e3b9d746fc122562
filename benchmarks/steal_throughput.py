"""Steal images per second over gRPC and REST against the in-process ceiling.

  .venv/bin/python -m benchmarks.steal_throughput [--budget=20000] [--npd=synthetic:noise]

Exports a Fashion-MNIST-shaped small_cnn (28x28x1, 10 classes), serves it with
`copycat_tf.model_server` in a separate process (pipeline.served), and runs the whole
steal (pipeline.steal: NPD generation, PNG encoding, queries, journal, shards, manifest)
with the same recipe three ways: against `savedmodel:` in-process (the ceiling: no
transport at all), over gRPC, and over REST (b64 PNGs through serving_bytes). Prints the
table and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

from benchmarks.common import export_random_target, machine_line
from copycat_tf import pipeline
from copycat_tf.recipe import Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=Recipe.query_batch_size)
    parser.add_argument("--in_flight", type=int, default=Recipe.max_in_flight)
    parser.add_argument("--npd", default="synthetic:noise")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    recipe = dataclasses.replace(
        Recipe(),
        npd=args.npd,
        query_budget=args.budget,
        query_batch_size=args.batch,
        max_in_flight=args.in_flight,
    )
    workdir = tempfile.mkdtemp(prefix="bench-steal-")
    path = export_random_target(workdir)
    rates: dict[str, list[float]] = {}
    with pipeline.served(workdir, "target", os.path.join(workdir, "server.log")) as server:
        targets = {
            "in-process": f"savedmodel:{path}",
            "grpc": server.grpc_url,
            "rest (b64 PNG)": server.rest_url,
        }
        for repeat in range(args.repeats):  # interleaved, so drifts in load hit all alike
            for name, url in targets.items():
                out = os.path.join(workdir, f"fake-{repeat}-{name.split()[0]}")
                start = time.perf_counter()
                manifest = pipeline.steal(recipe, url, out)
                seconds = time.perf_counter() - start
                assert manifest["records"] == args.budget, manifest["status"]
                rates.setdefault(name, []).append(args.budget / seconds)
                shutil.rmtree(out)
    best = {name: max(r) for name, r in rates.items()}
    ceiling = best["in-process"]
    print(
        f"\n{'target':<16} {'images/s (best of ' + str(args.repeats) + ')':>24} "
        f"{'vs in-process':>14}"
    )
    for name, rate in best.items():
        print(f"{name:<16} {rate:>24.0f} {rate / ceiling:>13.0%}")
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.steal_throughput --budget={args.budget}"
        f" --batch={args.batch} --in_flight={args.in_flight} --npd={args.npd}"
        f" --repeats={args.repeats}"
    )
    print(machine_line("whole steal, model server in a separate process"))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
