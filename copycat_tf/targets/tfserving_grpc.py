"""TF Serving gRPC client: PredictionService stubs, uint8 tensor_content, big messages."""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from copycat_tf import contract
from copycat_tf.errors import UserInputError
from copycat_tf.targets.answers import decode_tensor_proto, prediction_from_outputs
from copycat_tf.targets.base import (
    PermanentError,
    Prediction,
    RateLimited,
    Target,
    TargetInfo,
    TransientError,
)
from copycat_tf.targets.signatures import ChosenSignature, choose_from_map, parse_model_path

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
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return RateLimited(message)
        return TransientError(message)
    return PermanentError(message)


class GrpcTarget(Target):
    """grpc://host:port/<model>[/versions/N|/labels/L] (TF Serving or copycat_tf's server)."""

    OPTIONS = ("signature", "api_key")

    def __init__(
        self, url: str, signature: str = contract.SERVING_DEFAULT, api_key: str | None = None
    ):
        parts = urlsplit(url)
        if not parts.hostname or not parts.port:
            raise UserInputError(f"target URL {url!r}: expected grpc://host:port/<model>")
        self.url = url
        self.model, self.version, self.label = parse_model_path(url, parts.path)
        self.signature = signature
        self._metadata = [("x-api-key", api_key)] if api_key else None
        self._channel = grpc.insecure_channel(parts.netloc, options=_OPTIONS)
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._chosen: ChosenSignature | None = None

    def _model_spec(self, spec) -> None:
        spec.name = self.model
        spec.signature_name = self.signature
        if self.version is not None:
            spec.version.value = self.version
        elif self.label is not None:
            spec.version_label = self.label

    def describe(self) -> TargetInfo:
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
        chosen = self._chosen = choose_from_map(self.url, sigs, self.signature)
        return chosen.target_info(
            self.url,
            {
                "transport": "grpc",
                "model": self.model,
                "version": response.model_spec.version.value,
                "signature": self.signature,
                "input": chosen.input,
                "input_dtype": chosen.input_dtype.name,
            },
        )

    def predict(
        self, images: np.ndarray, timeout_s: float = 30.0, encoded: list[bytes] | None = None
    ) -> Prediction:
        if self._chosen is None:
            self.describe()
        chosen = self._chosen
        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec)
        array = np.ascontiguousarray(images, dtype=chosen.input_dtype.as_numpy_dtype)
        request.inputs[chosen.input].CopyFrom(
            tensor_pb2.TensorProto(
                dtype=chosen.input_dtype.as_datatype_enum,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(
                    dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]
                ),
                tensor_content=array.tobytes(),
            )
        )
        wanted = [a for a in (chosen.labels_out, chosen.scores_out) if a]
        request.output_filter.extend(wanted)
        where = f"target {self.url}"
        try:
            response = self._stub.Predict(request, timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise classify_rpc_error(e, where) from e
        outputs = {
            alias: decode_tensor_proto(response.outputs[alias], alias, where)
            for alias in wanted
            if alias in response.outputs
        }
        if not outputs:
            raise PermanentError(f"{where}: answer has none of the outputs {wanted}")
        return prediction_from_outputs(outputs, chosen.labels_out, chosen.scores_out, where)

    def close(self) -> None:
        self._channel.close()
