"""steal --runner=DirectRunner (Apache Beam, worker processes) against the in-process engine.

  .venv/bin/python -m benchmarks.beam_steal [--budgets=65536,262144] [--batch=32]
      [--latency_ms=200] [--targets=latency,fast]

Exports a Fashion-MNIST-shaped small_cnn (28x28x1, 10 classes) and serves it twice with
`copycat_tf.model_server` in separate processes: once with `--inject_latency_ms` (an API
whose answers take that long: the steal waits rather than computes) and once as it is
(a fast local target: the steal's own work is the cost). Against each, and for each budget,
the whole steal runs in process and as a Beam pipeline on the DirectRunner in
multi-processing mode with 1 and 2 workers (each worker with the in-process engine's
`--max_in_flight`), one after the other in each turn. Prints images/s per turn, and the
median over turns of each Beam run's ratio to the in-process run of its turn (the
whole run counts, pipeline start-up and shut-down included: a fixed cost, so the ratio
grows with the budget).
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
    parser.add_argument("--budgets", default="65536")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--in_flight", type=int, default=Recipe.max_in_flight)
    parser.add_argument("--latency_ms", type=int, default=200)
    parser.add_argument("--range_size", type=int, default=1024)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--npd", default="synthetic:noise")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--targets", default="latency,fast")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    chosen = args.targets.split(",")
    if not set(chosen) <= {"latency", "fast"}:
        parser.error(f"--targets={args.targets}: expected latency, fast or both, comma-separated")

    workdir = tempfile.mkdtemp(prefix="bench-beam-")
    export_random_target(workdir)
    rows = []
    targets = {
        "latency": (f"latency {args.latency_ms} ms", (f"--inject_latency_ms={args.latency_ms}",)),
        "fast": ("fast local", ()),
    }
    for target_name, server_flags in (targets[t] for t in chosen):
        log = os.path.join(workdir, "server.log")
        with pipeline.served(workdir, "target", log, *server_flags) as server:
            for budget in budgets:
                rows += _turns(args, server, budget, workers, workdir, target_name)
    turns = " / ".join(f"turn {i + 1}" for i in range(args.repeats))
    header = f"{'target':<18} {'queries':>8} {'engine':<20} {'images/s (' + turns + ')':>32}"
    print(f"\n{header} {'vs in-process':>14}")
    for target_name, budget, engine, rate, ratio in rows:
        per_turn = " / ".join(f"{r:.0f}" for r in rate)
        print(f"{target_name:<18} {budget:>8} {engine:<20} {per_turn:>32} {ratio:>13.2f}x")
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.beam_steal --budgets={args.budgets}"
        f" --batch={args.batch} --in_flight={args.in_flight} --latency_ms={args.latency_ms}"
        f" --range_size={args.range_size} --workers={args.workers} --npd={args.npd}"
        f" --repeats={args.repeats} --targets={args.targets}"
    )
    print(machine_line("model server in a separate process, Beam workers on the same cores"))
    shutil.rmtree(workdir, ignore_errors=True)


def _turns(args, server, budget: int, workers: list[int], workdir: str, target_name: str):
    """The table rows of one target and budget: each engine's rate per turn and the
    median of its ratios to the in-process rate of the same turn."""
    rates: dict[str, list[float]] = {}
    for turn in range(args.repeats):
        for engine in ["in-process", *(f"beam, {w} worker(s)" for w in workers)]:
            out = os.path.join(workdir, f"fake-{turn}")
            cfg = StealConfig(
                target=server.grpc_url,
                npd=args.npd,
                output_dir=out,
                query_budget=budget,
                query_batch_size=args.batch,
                max_in_flight=args.in_flight,
                progress=False,
            )
            start = time.perf_counter()
            if engine == "in-process":
                manifest = steal(cfg)
            else:
                n = int(engine.split(", ")[1].split()[0])
                options = [f"--direct_num_workers={n}", "--direct_running_mode=multi_processing"]
                manifest = steal_beam(cfg, "DirectRunner", options, args.range_size)
            seconds = time.perf_counter() - start
            assert manifest["records"] == budget, manifest["status"]
            rates.setdefault(engine, []).append(budget / seconds)
            shutil.rmtree(out)
    base = rates["in-process"]
    rows = []
    for engine, rate in rates.items():
        ratio = statistics.median(r / b for r, b in zip(rate, base, strict=True))
        rows.append((target_name, budget, engine, rate, ratio))
    return rows


if __name__ == "__main__":
    main()
