"""gRPC API: tensorflow.serving.PredictionService and ModelService (reference §2)."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from copycat_tf.server import tensors
from copycat_tf.server.core import ServingCore, log_access
from copycat_tf.server.model_store import configs_from_proto
from copycat_tf.server.status import ServingError, invalid

# TF Serving accepts messages up to INT32_MAX bytes (reference §2.4), not gRPC's 4 MiB.
MAX_MESSAGE_BYTES = 2**31 - 1


def model_spec_target(spec_holder) -> tuple[str, int | None, str | None]:
    """(name, version, label) of a request's model_spec, with TF Serving's errors."""
    if not spec_holder.HasField("model_spec"):
        raise invalid("Missing ModelSpec")
    spec = spec_holder.model_spec
    if not spec.name:
        raise invalid("ModelSpec has no name specified.")
    choice = spec.WhichOneof("version_choice")
    version = spec.version.value if choice == "version" else None
    label = spec.version_label if choice == "version_label" else None
    return spec.name, version, label


class _Base:
    def __init__(self, core: ServingCore):
        self.core = core

    def _handle(self, method: str, request, context, fn):
        start = time.monotonic()
        info = {
            "model": getattr(getattr(request, "model_spec", None), "name", ""),
            "version": None,
            "batch": None,
        }
        try:
            self.core.admit(
                {k.lower(): v for k, v in context.invocation_metadata() or ()},
                context.peer().rsplit(":", 1)[0],  # the client's address, not its port
            )
            response = fn(request, context, info)
        except ServingError as e:
            log_access(
                "grpc", method, info["model"], info["version"], info["batch"], e.code.name, start
            )
            context.abort(e.code, e.grpc_message)
        log_access("grpc", method, info["model"], info["version"], info["batch"], "OK", start)
        return response


class PredictionServicer(_Base, prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict, GetModelMetadata, Classify and Regress."""

    def Predict(self, request, context):
        return self._handle("Predict", request, context, self._predict)

    def GetModelMetadata(self, request, context):
        return self._handle("GetModelMetadata", request, context, self._metadata)

    def Classify(self, request, context):
        return self._handle("Classify", request, context, self._classify_or_regress)

    def Regress(self, request, context):
        return self._handle("Regress", request, context, self._classify_or_regress)

    def _predict(self, request, context, info):
        name, version, label = model_spec_target(request)
        servable = self.core.store.resolve(name, version, label)
        info["version"] = servable.version
        sig_name, signature = self.core.signature(
            servable, request.model_spec.signature_name, grpc.StatusCode.FAILED_PRECONDITION
        )
        sent, expected = set(request.inputs), set(signature.inputs)
        if sent != expected:
            if len(sent) != len(expected):
                raise invalid(
                    f"input size does not match signature: {len(sent)}!={len(expected)} "
                    f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                    f"Sent extra: {{{','.join(sorted(sent - expected))}}}. "
                    f"Missing but required: {{{','.join(sorted(expected - sent))}}}."
                )
            alias = sorted(expected - sent)[0]
            raise invalid(
                f"Signature input alias: {alias}(feed name: "
                f"{signature.inputs[alias].tensor_name}) not found in request and no default "
                f"value provided. Inputs expected to be in the request "
                f"{{{','.join(sorted(expected))}}}, or default input alias set: {{}}"
            )
        inputs = {k: tensors.proto_to_numpy(v, k) for k, v in request.inputs.items()}
        info["batch"] = next(iter(inputs.values())).shape[0] if inputs else 0
        outputs = self.core.check_output_filter(signature, list(request.output_filter))
        remaining = context.time_remaining()
        result = self.core.run(servable, signature, inputs, outputs, timeout_s=remaining)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = sig_name
        for alias, value in result.items():
            response.outputs[alias].CopyFrom(tensors.numpy_to_proto(value))
        return response

    def _metadata(self, request, context, info):
        name, version, label = model_spec_target(request)
        if not request.metadata_field:
            raise invalid("GetModelMetadataRequest must specify at least one metadata_field")
        for field in request.metadata_field:
            if field != "signature_def":
                raise invalid(f"Metadata field {field} is not supported")
        servable = self.core.store.resolve(name, version, label)
        info["version"] = servable.version
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(self.core.signature_def_map(servable))
        return response

    def _classify_or_regress(self, request, context, info):
        name, version, label = model_spec_target(request)
        servable = self.core.store.resolve(name, version, label)
        info["version"] = servable.version
        verb = "classify" if type(request).__name__.startswith("Classif") else "regress"
        self.core.refuse_classify_or_regress(servable, request.model_spec.signature_name, verb)


class ModelServicer(_Base, model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    def GetModelStatus(self, request, context):
        return self._handle("GetModelStatus", request, context, self._status)

    def HandleReloadConfigRequest(self, request, context):
        return self._handle("HandleReloadConfigRequest", request, context, self._reload)

    def _status(self, request, context, info):
        name, version, _ = model_spec_target(request)
        return self.core.model_status(name, version)

    def _reload(self, request, context, info):
        if request.config.WhichOneof("config") != "model_config_list":
            raise invalid(
                "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
                "ModelConfigList is currently supported"
            )
        try:
            configs = configs_from_proto(request.config)
        except ValueError as e:
            raise invalid(str(e)) from e
        self.core.store.reload_config(configs)
        response = model_management_pb2.ReloadConfigResponse()
        response.status.error_code = 0
        return response


def build_grpc_server(
    core: ServingCore,
    host: str,
    port: int,
    max_threads: int = 16,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[grpc.Server, int]:
    """A gRPC server with both services bound to host:port; returns (server, bound port).

    Raises:
      OSError: the port cannot be bound.
    """
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(core), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(core), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:
        raise OSError(f"cannot bind gRPC port {host}:{port}: {e}") from e
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {host}:{port} (in use?)")
    return server, bound
