"""What the extraction detector costs the model server: gRPC images/s with and without it.

  .venv/bin/python -m benchmarks.detector_overhead [--seconds=3] [--repeats=3]

Exports a Fashion-MNIST-shaped small_cnn (28x28x1, 10 classes), starts one
`copycat_tf.model_server` process per setting (no detector, --detector=prada,
--detector=ood, --detector=prada,ood), and measures PredictionService/Predict of 16
distinct batches of random images, sent in turn, at batch 256 with 1 and 4 clients (one
client identity: prada's growing set reaches its bound, --detector_max_set, within the
first seconds: the steady state of a long attack). The detector is set so that it never
flags this client (delta 0.01, the ood model calibrated on the same kind of noise): a
flagged client costs nothing more, and the point is the cost of watching one.
The settings are measured in turn, --repeats times; the table gives each setting's best
rate (load from elsewhere only slows a run down) and the median over the repeats of its
rate relative to the no-detector rate measured first in the same turn (neighbours in
time, so slow drifts of the host's load cancel). These ratios still move by several
points from run to run on a shared 2-core host, so a second table times the detector's
own work per request in this process (Detector.observe on the same 16 batches, steady
state, one numpy thread as the server runs it) against the time one request takes
without a detector (batch / the one-client rate above).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import tempfile
import time

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from benchmarks.common import SHAPE, export_random_target, machine_line
from benchmarks.serving_throughput import OPTIONS, run_clients
from copycat_tf import pipeline
from copycat_tf.server.detector import Detector, DetectorConfig

# Settings under which the random-image client is never flagged: a flagged client costs
# the detector nothing more, so a flag would hide the steady-state cost being measured.
_NEVER = ("--detector_delta=0.01", "--detector_calibration=synthetic:noise")
SETTINGS = {
    "none": (),
    "prada": ("--detector=prada", *_NEVER),
    "ood": ("--detector=ood", *_NEVER),
    "prada,ood": ("--detector=prada,ood", *_NEVER),
}
BATCHES = 16  # distinct request batches, sent in turn (repeats would be skipped by prada)


def main() -> None:
    if os.environ.get("OPENBLAS_NUM_THREADS") != "1":
        # The in-process timing needs one numpy (OpenBLAS) thread, as model_server runs
        # its detector; OpenBLAS reads this when numpy loads, so start again with it.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "benchmarks.detector_overhead", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    client_counts = [int(c) for c in args.clients.split(",")]
    workdir = tempfile.mkdtemp(prefix="bench-detector-")
    export_random_target(workdir)
    rng = np.random.default_rng(0)
    requests_ = []
    for _ in range(BATCHES):
        x = rng.integers(0, 256, (args.batch, *SHAPE), dtype=np.uint8)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "target"
        request.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
        requests_.append(request)

    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(
                pipeline.served(workdir, "target", os.path.join(workdir, f"server-{i}.log"), *flags)
            )
            for i, (name, flags) in enumerate(SETTINGS.items())
        }
        rows = []
        for clients in client_counts:
            best = dict.fromkeys(SETTINGS, 0.0)
            ratios: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for _ in range(args.repeats):
                for name, server in servers.items():

                    def make_call(address=server.grpc_address):
                        channel = grpc.insecure_channel(address, options=OPTIONS)
                        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                        turn = itertools.count()
                        return lambda: stub.Predict(requests_[next(turn) % BATCHES], 120)

                    rate = run_clients(make_call, clients, args.seconds, args.batch)
                    best[name] = max(best[name], rate)
                    if name == "none":
                        none_now = rate
                    ratios[name].append(rate / none_now)
                    print(
                        f"  {name:10s} clients {clients}: {rate:9.0f} img/s",
                        file=sys.stderr,
                        flush=True,
                    )
            for name, rate in best.items():
                rows.append((name, clients, rate, statistics.median(ratios[name])))

    print(
        f"\n{'detector':<11} {'batch':>5} {'clients':>7} {'images/s':>10} {'vs none':>8}"
        f"   (gRPC; images/s: best of {args.repeats}; vs none: median of {args.repeats})"
    )
    for name, clients, rate, ratio in rows:
        print(f"{name:<11} {args.batch:>5} {clients:>7} {rate:>10.0f} {ratio:>8.0%}")
    none_rate = next(r for n, c, r, _ in rows if n == "none" and c == client_counts[0])
    request_ms = 1000.0 * args.batch / none_rate
    print(
        f"\n{'detector':<11} {'ms/request':>10} {'vs request':>10}"
        f"   (in process; a request without detector: {request_ms:.1f} ms)"
    )
    for name in SETTINGS:
        if name != "none":
            ms = _observe_ms(name, [r.inputs["images"] for r in requests_], args.repeats)
            print(f"{name:<11} {ms:>10.2f} {ms / request_ms:>10.1%}")
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.detector_overhead --seconds={args.seconds:g}"
        f" --batch={args.batch} --clients={args.clients} --repeats={args.repeats}"
    )
    print(machine_line("server in a separate process, clients on the same cores"))


def _observe_ms(signals: str, tensors, repeats: int) -> float:
    """Best milliseconds per request of Detector.observe over the benchmark's batches, after
    two warm-up passes (prada's set full), with the server's settings."""
    images = [tf.make_ndarray(t).astype(np.uint8) for t in tensors]
    classes = [np.random.default_rng(k).integers(0, 10, len(x)) for k, x in enumerate(images)]
    detector = Detector(
        DetectorConfig(signals=tuple(signals.split(",")), delta=0.01, calibration="synthetic:noise")
    )
    detector.prepare(images[0].shape[1:])
    best = float("inf")
    for attempt in range(2 + repeats):
        start = time.perf_counter()
        for x, c in zip(images, classes, strict=True):
            detector.observe("bench", x, c)
        if attempt >= 2:
            best = min(best, (time.perf_counter() - start) / len(images))
    return 1000.0 * best


if __name__ == "__main__":
    main()
