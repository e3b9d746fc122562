"""What both APIs share: access control, model lookup, signature maps, method refusal,
input checks, batched model calls and defences. The gRPC and REST front ends only
translate their wire formats to and from these calls.
"""

from __future__ import annotations

import copy
import dataclasses
import logging as pylogging
import threading
import time
from collections.abc import Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, status_pb2

from copycat_tf.contract import OUTPUT_SCORES, SERVING_DEFAULT
from copycat_tf.server.batching import BatchScheduler
from copycat_tf.server.defenses import OutputDefense
from copycat_tf.server.model_store import ModelStore, Servable, SignatureInfo
from copycat_tf.server.status import ServingError, invalid

ACCESS_LOG = pylogging.getLogger("copycat_tf.access")
_STATES = get_model_status_pb2.ModelVersionStatus.State


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key of a request: 'x-api-key: K' or 'authorization: Bearer K'.

    Args:
      headers: request headers or gRPC metadata, names in lower case.
    """
    if headers.get("x-api-key"):
        return headers["x-api-key"]
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


class Gatekeeper:
    """API keys and a token-bucket rate limit, as a hardened cloud API has them.

    Args:
      api_keys: accepted keys; None disables authentication.
      rate_limit_qps: requests per second allowed per key (per client when no keys);
        0 disables the limit. Bursts of up to max(1, qps) requests are allowed.
    """

    def __init__(self, api_keys: frozenset[str] | None = None, rate_limit_qps: float = 0.0):
        self.api_keys = api_keys
        self.rate = rate_limit_qps
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def admit(self, key: str | None, client: str) -> None:
        """Raises UNAUTHENTICATED or RESOURCE_EXHAUSTED when the request may not proceed."""
        if self.api_keys is not None and (not key or key not in self.api_keys):
            raise ServingError(
                grpc.StatusCode.UNAUTHENTICATED,
                "Missing or invalid API key: send it as 'x-api-key: <key>' or "
                "'authorization: Bearer <key>'",
            )
        if self.rate <= 0:
            return
        who = key or client
        capacity = max(1.0, self.rate)
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[who] = (tokens, now)
                raise ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Rate limit of {self.rate:g} requests per second exceeded; retry later",
                )
            self._buckets[who] = (tokens - 1.0, now)


def parse_api_keys_file(path: str) -> frozenset[str]:
    """One key per line; blank lines and # comments ignored.

    Raises:
      ValueError: unreadable or empty file.
    """
    try:
        with open(path) as f:
            keys = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise ValueError(f"--api_keys_file {path} cannot be read: {e}") from e
    if not keys:
        raise ValueError(f"--api_keys_file {path} holds no keys; expected one key per line")
    return frozenset(keys)


@dataclasses.dataclass
class ServingCore:
    """The transport-independent part of the server."""

    store: ModelStore
    scheduler: BatchScheduler
    gate: Gatekeeper
    defense: OutputDefense
    request_timeout_s: float = 30.0
    seed: int = 0
    inject_failure_rate: float = 0.0
    inject_latency_s: float = 0.0

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)
        self._rng_lock = threading.Lock()

    # ------------------------------------------------------------------ access

    def admit(self, headers: Mapping[str, str], client: str) -> None:
        """Authenticates and rate-limits one request.

        Args:
          headers: request headers or gRPC metadata, names in lower case.
          client: the caller's address (its identity when no API keys are configured).

        Raises:
          ServingError: UNAUTHENTICATED or RESOURCE_EXHAUSTED.
        """
        self.gate.admit(api_key_from_headers(headers), client)

    # ------------------------------------------------------------------ models

    def signature(
        self, servable: Servable, name: str | None, missing_code=grpc.StatusCode.INVALID_ARGUMENT
    ) -> tuple[str, SignatureInfo]:
        """(name, signature) a request asks for; the default signature when unnamed.

        Args:
          servable: the resolved model version.
          name: the requested signature name, "" or None for serving_default.
          missing_code: the status an unknown name gets (the APIs differ, as in TF Serving).

        Raises:
          ServingError: no such signature.
        """
        name = name or SERVING_DEFAULT
        signature = servable.signatures.get(name)
        if signature is None:
            if missing_code == grpc.StatusCode.FAILED_PRECONDITION:
                raise ServingError(missing_code, f'Serving signature key "{name}" not found.')
            raise invalid(f'Serving signature name: "{name}" not found in signature def')
        return name, signature

    def signature_def_map(self, servable: Servable) -> get_model_metadata_pb2.SignatureDefMap:
        """The SignatureDefs as stored, minus outputs the defence hides (GetModelMetadata)."""
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in servable.signature_defs.items():
            if self.defense.hides_scores and OUTPUT_SCORES in sig.outputs:
                sig = copy.deepcopy(sig)
                del sig.outputs[OUTPUT_SCORES]
            sig_map.signature_def[key].CopyFrom(sig)
        return sig_map

    def refuse_classify_or_regress(self, servable: Servable, name: str | None, verb: str):
        """Classify and Regress need classify/regress signatures; TF2 exports (all of
        copycat_tf's) only have predict signatures, so this always raises TF Serving's error.

        Raises:
          ServingError: INVALID_ARGUMENT naming the expected method.
        """
        name = name or SERVING_DEFAULT
        signature = servable.signatures.get(name)
        if signature is None:
            raise invalid(f"No signature was found with the name: {name}")
        kind = "classification" if verb == "classify" else "regression"
        raise invalid(
            f"Expected {kind} signature method_name to be tensorflow/serving/{verb}. "
            f"Was: {signature.method_name}"
        )

    def model_status(
        self, name: str, version: int | None
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatusResponse for a model."""
        response = get_model_status_pb2.GetModelStatusResponse()
        for v, st in self.store.status(name, version):
            entry = response.model_version_status.add()
            entry.version = v
            entry.state = _STATES.Value(st.state)
            entry.status.CopyFrom(
                status_pb2.StatusProto(error_code=2 if st.error else 0, error_message=st.error)
            )
        return response

    # ------------------------------------------------------------------ predictions

    def _inject_faults(self) -> None:
        """Chaos options: added latency and transient failures (a flaky cloud API)."""
        if self.inject_latency_s:
            time.sleep(self.inject_latency_s)
        if self.inject_failure_rate:
            with self._rng_lock:
                fail = self._rng.random() < self.inject_failure_rate
            if fail:
                raise ServingError(
                    grpc.StatusCode.UNAVAILABLE, "Injected failure (--inject_failure_rate)"
                )

    def visible_outputs(self, signature: SignatureInfo) -> list[str]:
        """Output aliases a client may see (a top-1 defence hides the scores)."""
        return [
            k for k in signature.outputs if not (self.defense.hides_scores and k == OUTPUT_SCORES)
        ]

    def check_output_filter(self, signature: SignatureInfo, output_filter) -> list[str]:
        """Validates an output filter; returns the aliases to answer with."""
        visible = self.visible_outputs(signature)
        if not output_filter:
            return visible
        seen = set()
        for alias in output_filter:
            if alias not in visible:
                raise invalid(
                    f"output tensor alias not found in signature: {alias} Outputs expected to "
                    f"be in the set {{{','.join(sorted(visible))}}}."
                )
            if alias in seen:
                raise invalid(f"duplicate output tensor alias: {alias}")
            seen.add(alias)
        return list(output_filter)

    def run(
        self,
        servable: Servable,
        signature: SignatureInfo,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Checks input dtypes and shapes, runs the model (batched), applies the defence."""
        self._inject_faults()
        for i, (alias, spec) in enumerate(signature.inputs.items()):
            value = inputs[alias]
            got = tf.string if value.dtype == object else tf.as_dtype(value.dtype)
            if got != spec.dtype:
                raise invalid(
                    f"Expects arg[{i}] to be {spec.dtype.name} but {got.name} is provided"
                )
            if not spec.shape_fits(value.shape):
                raise invalid(
                    f"input '{alias}' has shape [{','.join(map(str, value.shape))}] but the "
                    f"signature expects {spec.shape_text()}"
                )
        result = self.scheduler.run(
            servable, signature.name, inputs, timeout_s or self.request_timeout_s
        )
        with self._rng_lock:
            result = self.defense.apply(result, self._rng)
        return {k: result[k] for k in outputs}


def log_access(
    api: str, method: str, model: str, version, batch, status: str, start: float
) -> None:
    """One access-log line per request."""
    ACCESS_LOG.info(
        "%s %s model=%s version=%s batch=%s status=%s latency_ms=%.1f",
        api,
        method,
        model or "-",
        version if version is not None else "-",
        batch if batch is not None else "-",
        status,
        (time.monotonic() - start) * 1000.0,
    )
