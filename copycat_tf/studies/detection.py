"""The study's `detector` part: would the model server's extraction detector catch the
attack, and does it leave benign clients alone?

Each traffic source is one client (its own API key) of the target served with the
detector: the study's own steals replayed in the order their queries were sent (the
natural-NPD reference steal, the data-free steal, the largest query-selection steal),
uniform noise, and benign clients sending the problem domain's test images as a normal
user would (each its own contiguous share). Every source is sent over gRPC in requests
of the recipe's batch size, once to a server whose detector is `prada` alone and once to
one whose detector is `ood` alone, so each signal is judged on its own. The server's
log says when it flagged whom; nothing is trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
from absl import logging

from copycat_tf import pipeline

SIGNALS = ("prada", "ood")
BENIGN_CLIENTS = 10


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One client: `dataset` (a study fake dataset, replayed), or `npd` (an NPD spec whose
    positions [start, start + queries) are sent)."""

    name: str
    label: str
    queries: int
    dataset: str = ""
    npd: str = ""
    start: int = 0
    benign: bool = False


def plan_traffic(plan, budget: int, pd_data: str, pd_test_size: int) -> list[Traffic]:
    """The sources of the part, from the datasets the study's plan steals."""
    out = [Traffic("natural", "natural-NPD attack (the reference steal)", budget, "natural")]
    if "src_data_free" in plan.datasets:
        recipe = plan.datasets["src_data_free"].recipe
        out.append(
            Traffic(
                "data_free",
                f"data-free attack (`{recipe.npd}`)",
                recipe.query_budget,
                "src_data_free",
            )
        )
    selections = [
        (spec.recipe.query_budget, name)
        for name, spec in plan.datasets.items()
        if name.startswith("sel_") and spec.recipe.selection != "random"
    ]
    if selections:
        queries, name = max(selections)
        strategy = plan.datasets[name].recipe.selection
        out.append(
            Traffic(
                f"selection_{strategy}",
                f"query-selection attack (`--selection={strategy}`)",
                queries,
                name,
            )
        )
    out.append(Traffic("noise", "uniform noise (`synthetic:noise`)", budget, npd="synthetic:noise"))
    share = pd_test_size // BENIGN_CLIENTS
    for i in range(BENIGN_CLIENTS):
        out.append(
            Traffic(
                f"benign_{i}",
                f"benign client {i}: `{pd_data}` test images {i * share:,}-{(i + 1) * share - 1:,}",
                share,
                npd=f"pd:{pd_data}:test",
                start=i * share,
                benign=True,
            )
        )
    return out


def _images(traffic: Traffic, workdir: str, shape, data_dir: str | None) -> np.ndarray:
    """The source's queries, uint8 [N, H, W, C], in the order they were (or are) sent."""
    import tensorflow as tf

    from copycat_tf.data import fake_dataset as fd
    from copycat_tf.data.npd import NpdStream

    if traffic.dataset:
        records = fd.read_records(os.path.join(workdir, f"fake_{traffic.dataset}"))
        records.sort(key=lambda r: r["query_index"])
        records = records[: traffic.queries]
        return np.stack(
            [tf.io.decode_png(r["image_png"], channels=shape[-1]).numpy() for r in records]
        )
    stream = NpdStream(traffic.npd, shape, data_dir=data_dir)
    items = (stream.item(k) for k in range(traffic.start, traffic.start + traffic.queries))
    return np.stack([item.image for item in items if item is not None and item.image is not None])


def client_key(name: str) -> str:
    return f"study-client-{name}"


def run_detection(
    traffic: list[Traffic],
    model_base_path: str,
    model_name: str,
    workdir: str,
    pd_data: str,
    batch_size: int,
    data_dir: str | None = None,
) -> dict:
    """Sends every source to a server with each signal; returns the part's record."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from copycat_tf.data import fake_dataset as fd
    from copycat_tf.server.core import client_identity
    from copycat_tf.server.detector import flags_in_log

    shape = fd.load_fake_data([os.path.join(workdir, "fake_natural")]).input_shape
    root = os.path.join(workdir, "detector")
    os.makedirs(root, exist_ok=True)
    keys = os.path.join(root, "keys")
    with open(keys, "w") as f:
        f.write("\n".join(client_key(t.name) for t in traffic) + "\n")
    who = {client_identity({"x-api-key": client_key(t.name)}, ""): t.name for t in traffic}
    flags = (
        f"--api_keys_file={keys}",
        f"--detector_calibration=pd:{pd_data}:train",
        "--detector_action=log",
        f"--detector_max_clients={len(traffic)}",
        *([f"--detector_data_dir={data_dir}"] if data_dir else []),
    )
    result = {t.name: {"label": t.label, "queries": 0, "benign": t.benign} for t in traffic}
    for signal in SIGNALS:
        log_path = os.path.join(root, f"server-{signal}.log")
        with pipeline.served(
            model_base_path,
            model_name,
            log_path,
            *flags,
            f"--detector={signal}",
            api_key=client_key(traffic[0].name),
        ) as server:
            channel = grpc.insecure_channel(
                server.grpc_address, options=[("grpc.max_send_message_length", -1)]
            )
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for t in traffic:
                images = _images(t, workdir, shape, data_dir)
                result[t.name]["queries"] = len(images)
                metadata = [("x-api-key", client_key(t.name))]
                for start in range(0, len(images), batch_size):
                    request = predict_pb2.PredictRequest()
                    request.model_spec.name = model_name
                    request.inputs["images"].CopyFrom(
                        tf.make_tensor_proto(images[start : start + batch_size])
                    )
                    stub.Predict(request, 120, metadata=metadata)
                logging.info("study: detector %s: %s sent %d queries", signal, t.name, len(images))
            channel.close()
        with open(log_path, errors="replace") as f:
            flagged = {
                who[client]: queries
                for client, fired, queries in flags_in_log(f.read())
                if client in who and fired == signal
            }
        for t in traffic:
            result[t.name][signal] = flagged.get(t.name, 0)
    return {
        "signals": list(SIGNALS),
        "batch_size": batch_size,
        "settings": "the detector's defaults: prada flags a Shapiro-Wilk W below 0.9 of the "
        "last 5,000 distances, after 100 queries; ood flags more than half of the last 5,000 "
        "queries beyond the 0.99 quantile of held-out calibration images (2,000 training "
        "images at most)",
        "clients": [{"name": t.name, **result[t.name]} for t in traffic],  # in order
        "key": traffic_key(traffic, batch_size),
    }


def traffic_key(traffic: list[Traffic], batch_size: int) -> str:
    text = repr([dataclasses.astuple(t) for t in traffic]) + f"|{batch_size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
