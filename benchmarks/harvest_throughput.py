"""Harvest images per second over gRPC and REST against the in-process ceiling.

  .venv/bin/python -m benchmarks.harvest_throughput [--budget=20000] [--npd=synthetic:noise]

Exports a Fashion-MNIST-shaped small_cnn (28x28x1, 10 classes), serves it with
`copycat_tf.model_server` in a separate process, and runs the whole `steal` engine
(NPD generation, PNG encoding, queries, journal, shards, manifest) three times with the
same settings: against `savedmodel:` in-process (the ceiling: no transport at all), over
gRPC, and over REST (b64 PNGs through serving_bytes). Prints the table and ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import keras
import tensorflow as tf

from copycat_tf.attack.harvest import HarvestConfig, harvest
from copycat_tf.models import registry
from copycat_tf.server.process import ServerProcess
from copycat_tf.training import export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--in_flight", type=int, default=4)
    parser.add_argument("--npd", default="synthetic:noise")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench-harvest-")
    keras.utils.set_random_seed(0)
    shape = (28, 28, 1)
    model = registry.build_model("small_cnn", shape, 10)
    path = export.export_classifier(model, [str(i) for i in range(10)], shape, workdir, "target")
    server = ServerProcess(
        f"--model_base_path={os.path.join(workdir, 'target')}",
        "--model_name=target",
        model="target",
    ).start()
    targets = {
        "in-process": f"savedmodel:{path}",
        "grpc": f"grpc://{server.grpc_target}/target",
        "rest (b64 PNG)": f"{server.rest}/v1/models/target",
    }
    rates: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for repeat in range(args.repeats):  # interleaved, so drifts in load hit all alike
            for name, url in targets.items():
                out = os.path.join(workdir, f"fake-{repeat}-{name.split()[0]}")
                start = time.perf_counter()
                manifest = harvest(
                    HarvestConfig(
                        target=url,
                        npd=args.npd,
                        output_dir=out,
                        query_budget=args.budget,
                        query_batch_size=args.batch,
                        max_in_flight=args.in_flight,
                        records_per_shard=5000,
                        progress=False,
                    )
                )
                seconds = time.perf_counter() - start
                assert manifest["records"] == args.budget
                rates[name].append(args.budget / seconds)
                shutil.rmtree(out)
    finally:
        server.stop()
    best = {name: max(r) for name, r in rates.items()}
    ceiling = best["in-process"]
    print(
        f"\n{'target':<16} {'images/s (best of ' + str(args.repeats) + ')':>24} "
        f"{'vs in-process':>14}"
    )
    for name, rate in best.items():
        print(f"{name:<16} {rate:>24.0f} {rate / ceiling:>13.0%}")
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.harvest_throughput --budget={args.budget}"
        f" --batch={args.batch} --in_flight={args.in_flight} --npd={args.npd}"
        f" --repeats={args.repeats}"
    )
    print(
        f"machine: {os.cpu_count()} cores; TensorFlow {tf.__version__}; whole steal engine, "
        "model server in a separate process"
    )


if __name__ == "__main__":
    main()
