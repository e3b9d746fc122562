"""steal --runner=DirectRunner (Apache Beam, worker processes) against the in-process engine.

  .venv/bin/python -m benchmarks.beam_steal [--budget=16384] [--batch=32] [--latency_ms=200]

Exports a Fashion-MNIST-shaped small_cnn (28x28x1, 10 classes) and serves it twice with
`copycat_tf.model_server` in separate processes: once with `--inject_latency_ms` (an API
whose answers take that long: the steal waits rather than computes) and once as it is
(a fast local target: the steal's own work is the cost). Against each, the whole steal of
the same budget runs in process and as a Beam pipeline on the DirectRunner in
multi-processing mode with 1 and 2 workers (each worker with the in-process engine's
`--max_in_flight`), one after the other in each turn. Prints images/s per turn, and the
median over turns of each Beam run's ratio to the in-process run of its turn (the
whole run counts, pipeline start-up included).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from benchmarks.common import export_random_target, machine_line
from copycat_tf import pipeline
from copycat_tf.attack.beam_steal import steal_beam
from copycat_tf.attack.steal import StealConfig, steal
from copycat_tf.recipe import Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--in_flight", type=int, default=Recipe.max_in_flight)
    parser.add_argument("--latency_ms", type=int, default=200)
    parser.add_argument("--range_size", type=int, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--npd", default="synthetic:noise")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    workdir = tempfile.mkdtemp(prefix="bench-beam-")
    export_random_target(workdir)
    rows = []
    targets = {
        f"latency {args.latency_ms} ms": (f"--inject_latency_ms={args.latency_ms}",),
        "fast local": (),
    }
    for target_name, server_flags in targets.items():
        log = os.path.join(workdir, "server.log")
        with pipeline.served(workdir, "target", log, *server_flags) as server:
            rates: dict[str, list[float]] = {}
            for turn in range(args.repeats):
                for engine in ["in-process", *(f"beam, {w} worker(s)" for w in workers)]:
                    out = os.path.join(workdir, f"fake-{turn}")
                    cfg = StealConfig(
                        target=server.grpc_url,
                        npd=args.npd,
                        output_dir=out,
                        query_budget=args.budget,
                        query_batch_size=args.batch,
                        max_in_flight=args.in_flight,
                        progress=False,
                    )
                    start = time.perf_counter()
                    if engine == "in-process":
                        manifest = steal(cfg)
                    else:
                        n = int(engine.split(", ")[1].split()[0])
                        options = [
                            f"--direct_num_workers={n}",
                            "--direct_running_mode=multi_processing",
                        ]
                        manifest = steal_beam(cfg, "DirectRunner", options, args.range_size)
                    seconds = time.perf_counter() - start
                    assert manifest["records"] == args.budget, manifest["status"]
                    rates.setdefault(engine, []).append(args.budget / seconds)
                    shutil.rmtree(out)
            base = rates["in-process"]
            for engine, rate in rates.items():
                ratios = [r / b for r, b in zip(rate, base, strict=True)]
                rows.append((target_name, engine, rate, statistics.median(ratios)))
    turns = " / ".join(f"turn {i + 1}" for i in range(args.repeats))
    print(f"\n{'target':<18} {'engine':<20} {'images/s (' + turns + ')':>32} {'vs in-process':>14}")
    for target_name, engine, rate, ratio in rows:
        per_turn = " / ".join(f"{r:.0f}" for r in rate)
        print(f"{target_name:<18} {engine:<20} {per_turn:>32} {ratio:>13.2f}x")
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.beam_steal --budget={args.budget}"
        f" --batch={args.batch} --in_flight={args.in_flight} --latency_ms={args.latency_ms}"
        f" --range_size={args.range_size} --workers={args.workers} --npd={args.npd}"
        f" --repeats={args.repeats}"
    )
    print(machine_line("model server in a separate process, Beam workers on the same cores"))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
