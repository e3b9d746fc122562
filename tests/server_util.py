"""Starting the embedded model server for tests: in-process (the subprocess runner is
copycat_tf.server.process.ServerProcess)."""

from __future__ import annotations

import contextlib
import time

import numpy as np

from copycat_tf.server.process import ServerProcess, free_port

__all__ = ["OPTIONS", "ServerProcess", "grpc_predict", "images", "in_process_server", "wait_for"]

# gRPC channel options of the tests: no message size limit on the client side.
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def images(n: int = 2, seed: int = 0) -> np.ndarray:
    """n random 16x16x1 uint8 images (the tiny exported model's input)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def grpc_predict(target: str, x: np.ndarray, metadata=None, model: str = "m"):
    """PredictionService/Predict of x as the "images" input over a fresh channel."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        req = predict_pb2.PredictRequest()
        req.model_spec.name = model
        req.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
        return stub.Predict(req, 30, metadata=metadata)


@contextlib.contextmanager
def in_process_server(base_path: str, model: str = "m", **overrides):
    """A ModelServer in this process on free localhost ports (real sockets)."""
    from copycat_tf.server import app
    from copycat_tf.server.model_store import ModelConfig

    config = app.ServerConfig(
        models=overrides.pop("models", None) or [ModelConfig(model, base_path)],
        port=free_port(),
        rest_api_port=free_port(),
        host="127.0.0.1",
        **overrides,
    )
    server = app.ModelServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(predicate, timeout: float = 30.0) -> bool:
    """Polls predicate() every 0.1 s until it is true (True) or timeout seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
