"""Predictions per second of the embedded model server against the in-process ceiling.

  .venv/bin/python -m benchmarks.serving_throughput [--seconds=3] [--clients=1,4]

Exports a Fashion-MNIST-shaped small_cnn (28x28x1, 10 classes; weights do not change the
cost), starts `copycat_tf.model_server` as a separate process on free localhost ports, and
measures, at batch sizes 1, 32 and 256 and several concurrent clients:

  in-process  the SavedModel's serving_default called directly (the ceiling)
  grpc        PredictionService/Predict, uint8 tensor_content, official stubs
  rest        POST :predict {"instances": [...]} (pixels as JSON numbers)
  rest-b64    POST :predict via serving_bytes, PNGs as {"b64": ...} (encoded beforehand)

Clients and server share the machine's cores, as they do in the attack on one machine.
Each configuration is measured --repeats times, the transports interleaved, and the best
rate of each is kept (the host is shared: load from elsewhere only ever slows a run down).
Prints a table with each transport's ratio to the in-process ceiling measured in the
same run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
import requests
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from benchmarks.common import SHAPE, export_random_target, machine_line
from copycat_tf import pipeline

OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def run_clients(make_call, clients: int, seconds: float, batch: int) -> float:
    """Images per second when `clients` threads call make_call()() back to back."""
    counts = [0] * clients
    stop = threading.Event()
    errors = []

    def worker(i):
        call = make_call()
        call()  # warm-up (connection set-up, tracing) outside the timed window
        barrier.wait()
        while not stop.is_set():
            try:
                call()
            except Exception as e:  # reported below, not hidden
                errors.append(repr(e))
                return
            counts[i] += batch

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"benchmark calls failed: {errors[:3]}")
    return sum(counts) / elapsed


def simultaneous_clients(url: str, body: bytes, clients: int) -> tuple[int, int]:
    """(requests answered 200, connection errors) when `clients` fresh connections POST
    at the same moment, each on its own socket."""
    barrier = threading.Barrier(clients)
    results = []

    def one():
        barrier.wait()
        try:
            with requests.Session() as session:
                results.append(session.post(url, data=body, timeout=120).status_code)
        except requests.ConnectionError:
            results.append("connection error")

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results.count(200), results.count("connection error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--simultaneous", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]

    workdir = tempfile.mkdtemp(prefix="bench-serving-")
    path = export_random_target(workdir)
    loaded = tf.saved_model.load(path)
    rng = np.random.default_rng(0)
    data = {b: rng.integers(0, 256, (b, *SHAPE), dtype=np.uint8) for b in batches}
    pngs = {
        b: [base64.b64encode(tf.io.encode_png(im).numpy()).decode() for im in data[b]]
        for b in batches
    }

    rows = []
    with pipeline.served(workdir, "target", os.path.join(workdir, "server.log")) as server:
        for batch in batches:
            for clients in client_counts:
                x = data[batch]
                tensor = tf.constant(x)
                fn = loaded.signatures["serving_default"]

                def in_process(fn=fn, tensor=tensor):
                    return lambda: fn(images=tensor)["scores"].numpy()

                def grpc_call(x=x):
                    channel = grpc.insecure_channel(server.grpc_address, options=OPTIONS)
                    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                    req = predict_pb2.PredictRequest()
                    req.model_spec.name = "target"
                    req.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
                    return lambda: stub.Predict(req, 60)

                def rest_call(body):
                    def make_session_call():
                        session = requests.Session()
                        url = f"{server.rest_url}:predict"
                        return lambda: session.post(url, data=body, timeout=60).raise_for_status()

                    return make_session_call

                instances = json.dumps({"instances": x.tolist()})
                b64 = json.dumps(
                    {
                        "signature_name": "serving_bytes",
                        "instances": [{"b64": p} for p in pngs[batch]],
                    }
                )
                makers = {
                    "in-process": in_process,
                    "grpc": grpc_call,
                    "rest": rest_call(instances),
                    "rest-b64": rest_call(b64),
                }
                best = dict.fromkeys(makers, 0.0)
                for _ in range(args.repeats):
                    for name, make in makers.items():
                        rate = run_clients(make, clients, args.seconds, batch)
                        best[name] = max(best[name], rate)
                        print(
                            f"  {name:10s} batch {batch:4d} clients {clients}: {rate:9.0f} img/s",
                            file=sys.stderr,
                            flush=True,
                        )
                for name, rate in best.items():
                    rows.append((name, batch, clients, rate, rate / best["in-process"]))

        body = json.dumps({"instances": data[batches[0]].tolist()}).encode()
        ok, refused = simultaneous_clients(f"{server.rest_url}:predict", body, args.simultaneous)

    print(
        f"\n{'transport':<11} {'batch':>5} {'clients':>7} {'images/s':>10} {'vs in-process':>14}"
        f"   (best of {args.repeats})"
    )
    for name, batch, clients, rate, ratio in rows:
        print(f"{name:<11} {batch:>5} {clients:>7} {rate:>10.0f} {ratio:>13.0%}")
    print(
        f"\n{args.simultaneous} simultaneous REST clients (one request each, batch "
        f"{batches[0]}): {ok} answered 200, {refused} connection errors"
    )
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.serving_throughput --seconds={args.seconds:g}"
        f" --batches={args.batches} --clients={args.clients} --simultaneous={args.simultaneous}"
        f" --repeats={args.repeats}"
    )
    print(machine_line("server in a separate process, clients on the same cores"))


if __name__ == "__main__":
    main()
