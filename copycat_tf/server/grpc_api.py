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
from copycat_tf.server.core import ServingCore, batch_size, client_identity
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


def peer_address(peer: str) -> str:
    """The client's address of a gRPC peer string, as HTTP peers are written:
    "ipv4:1.2.3.4:5678" -> "1.2.3.4", "ipv6:[::1]:5678" -> "::1" (one identity per client
    across both APIs)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    return rest.rsplit(":", 1)[0].strip("[]")


class Admission(grpc.ServerInterceptor):
    """Checks the caller on its metadata before the request message is even parsed: a
    stranger's 150 MB Predict costs no parsing, only the receiving gRPC cannot avoid.

    The wrapped handler takes the raw bytes, admits the caller (API key, failed-attempt
    limit, rate limit; admin key and --allow_reload_config for model reloads), and only
    then deserializes and calls the servicer.
    """

    def __init__(self, core: ServingCore):
        self.core = core

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        parse, behavior = handler.request_deserializer, handler.unary_unary
        method = details.method.rsplit("/", 1)[-1]
        admin = method == "HandleReloadConfigRequest"
        headers = {k.lower(): v for k, v in details.invocation_metadata or ()}

        def admitted(raw: bytes, context):
            start = time.monotonic()
            try:
                self.core.admit(headers, peer_address(context.peer()), admin=admin)
                if admin and not self.core.allow_reload:
                    raise ServingError(
                        grpc.StatusCode.PERMISSION_DENIED,
                        "Model config reload is disabled on this server (--allow_reload_config)",
                    )
            except ServingError as e:
                info = {"model": "", "version": None, "batch": None}
                self.core.record("grpc", method, info, e.code.name, start)
                context.abort(e.code, e.grpc_message)
            try:
                request = parse(raw)
            except Exception:  # a malformed message, as grpc's own deserializer answers
                context.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            admitted, request_deserializer=None, response_serializer=handler.response_serializer
        )


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
            response = fn(request, context, info)
        except ServingError as e:
            self.core.record("grpc", method, info, e.code.name, start)
            context.abort(e.code, e.grpc_message)
        self.core.record("grpc", method, info, "OK", start)
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
        limit = self.core.max_tensor_bytes
        inputs = {k: tensors.proto_to_numpy(v, k, limit) for k, v in request.inputs.items()}
        info["batch"] = batch_size(inputs)
        outputs = self.core.check_output_filter(signature, list(request.output_filter))
        remaining = context.time_remaining()
        client = client_identity(
            {k.lower(): v for k, v in context.invocation_metadata() or ()},
            peer_address(context.peer()),
        )
        result = self.core.run(
            servable, signature, inputs, outputs, timeout_s=remaining, client=client
        )
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
        interceptors=[Admission(core)],
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
