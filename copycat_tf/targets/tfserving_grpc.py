"""TF Serving gRPC client: PredictionService stubs, uint8 tensor_content, big messages."""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from copycat_tf.errors import UserInputError
from copycat_tf.server.tensors import proto_to_numpy
from copycat_tf.targets.base import (
    PermanentError,
    Prediction,
    Target,
    TargetSpec,
    TransientError,
    parse_model_path,
    select_signature_outputs,
)

_TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def classify_rpc_error(e: grpc.RpcError, where: str) -> Exception:
    """TransientError or PermanentError for a failed call."""
    code, details = e.code(), e.details()
    message = f"{where}: {code.name}: {details}"
    if code in _TRANSIENT and "larger than max" not in (details or ""):
        return TransientError(message)
    return PermanentError(message)


def signature_io(sig) -> tuple[dict, dict]:
    """{alias: (tf.DType, shape tuple or None)} of a SignatureDef's inputs and outputs.

    Tensors of DT_INVALID (TF2's __saved_model_init_op NoOp) are left out.
    """

    def infos(tensors):
        out = {}
        for alias, t in tensors.items():
            if t.dtype == 0:
                continue
            shape = None
            if not t.tensor_shape.unknown_rank:
                shape = tuple(d.size for d in t.tensor_shape.dim)
            out[alias] = (tf.as_dtype(t.dtype), shape)
        return out

    return infos(sig.inputs), infos(sig.outputs)


def image_input(url: str, inputs: dict) -> tuple[str, tf.DType, tuple[int, int, int]]:
    """The signature's image input: the one rank-4 numeric input [N, H, W, C].

    Raises:
      UserInputError: no such input, or its H, W, C are not fixed.
    """
    for alias, (dtype, shape) in inputs.items():
        if dtype != tf.string and shape is not None and len(shape) == 4:
            if min(shape[1:]) < 1:
                raise UserInputError(
                    f"target {url}: input {alias!r} has shape {shape}; H, W and C must be fixed"
                )
            return alias, dtype, tuple(int(d) for d in shape[1:])
    raise UserInputError(
        f"target {url}: its signature has no image input of shape [N, H, W, C]: {inputs}"
    )


def parse_signature(url: str, sigs, name: str):
    """(image input alias, its dtype, (H, W, C), labels output, scores output, outputs) of
    signature `name` in a SignatureDefMap.

    Raises:
      UserInputError: no such signature, no image input, or no class/score output.
    """
    if name not in sigs.signature_def:
        raise UserInputError(
            f"target {url} has no signature {name!r}; it has {sorted(sigs.signature_def)}"
        )
    inputs, outputs = signature_io(sigs.signature_def[name])
    alias, dtype, shape = image_input(url, inputs)
    labels_out, scores_out = select_signature_outputs(outputs)
    if labels_out is None and scores_out is None:
        raise UserInputError(f"target {url}: no class or score output in {outputs}")
    return alias, dtype, shape, labels_out, scores_out, outputs


class GrpcTarget(Target):
    """grpc://host:port/<model>[/versions/N|/labels/L] (TF Serving or copycat_tf's server)."""

    OPTIONS = ("signature", "api_key")

    def __init__(self, url: str, signature: str = "serving_default", api_key: str | None = None):
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise UserInputError(f"target URL {url!r}: expected grpc://host:port/<model>")
        self.url = url
        self.model, self.version, self.label = parse_model_path(url, parts.path)
        self.signature = signature
        self._metadata = [("x-api-key", api_key)] if api_key else None
        self._channel = grpc.insecure_channel(parts.netloc, options=_OPTIONS)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._spec: TargetSpec | None = None

    def _model_spec(self, spec) -> None:
        spec.name = self.model
        spec.signature_name = self.signature
        if self.version is not None:
            spec.version.value = self.version
        elif self.label is not None:
            spec.version_label = self.label

    def describe(self) -> TargetSpec:
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        self._model_spec(request.model_spec)
        request.model_spec.signature_name = ""
        request.metadata_field.append("signature_def")
        try:
            response = self._stub.GetModelMetadata(request, 30, metadata=self._metadata)
        except grpc.RpcError as e:
            raise classify_rpc_error(e, f"target {self.url} metadata") from e
        sigs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sigs)
        self._input, self._dtype, shape, self._labels_out, self._scores_out, outputs = (
            parse_signature(self.url, sigs, self.signature)
        )
        num_classes = outputs[self._scores_out][1][1] if self._scores_out else None
        self._spec = TargetSpec(
            url=self.url,
            input_shape=shape,
            num_classes=int(num_classes) if num_classes and num_classes > 0 else 0,
            has_scores=self._scores_out is not None,
            details={
                "transport": "grpc",
                "model": self.model,
                "version": response.model_spec.version.value,
                "signature": self.signature,
                "input": self._input,
                "input_dtype": self._dtype.name,
                "outputs": sorted(outputs),
            },
        )
        return self._spec

    def predict(self, images: np.ndarray, timeout_s: float = 30.0, encoded=None) -> Prediction:
        if self._spec is None:
            self.describe()
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec)
        array = np.ascontiguousarray(images, dtype=self._dtype.as_numpy_dtype)
        request.inputs[self._input].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=self._dtype.as_datatype_enum,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(
                    dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
                ),
                tensor_content=array.tobytes(),
            )
        )
        for alias in (self._labels_out, self._scores_out):
            if alias:
                request.output_filter.append(alias)
        try:
            response = self._stub.Predict(request, timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise classify_rpc_error(e, f"target {self.url}") from e
        return _prediction(response.outputs, self._labels_out, self._scores_out)

    def close(self) -> None:
        self._channel.close()


def _prediction(outputs, labels_out, scores_out) -> Prediction:
    scores = proto_to_numpy(outputs[scores_out], scores_out) if scores_out else None
    if labels_out and labels_out in outputs:
        labels = proto_to_numpy(outputs[labels_out], labels_out)
    elif scores is not None:
        labels = scores.argmax(axis=-1)
    else:
        raise PermanentError(f"answer lacks the {labels_out!r} output")
    return Prediction(np.asarray(labels).astype(np.int64), scores)
