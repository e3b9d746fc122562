"""What both APIs share: access control, model lookup, signature maps, method refusal,
input checks, batched model calls and defences. The gRPC and REST front ends only
translate their wire formats to and from these calls.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging as pylogging
import threading
import time
import warnings
from collections.abc import Mapping
from typing import NoReturn

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, status_pb2

from copycat_tf.contract import (
    BYTES_SUFFIX,
    INPUT_IMAGE_BYTES,
    INPUT_IMAGES,
    OUTPUT_CLASSES,
    OUTPUT_SCORES,
    SERVING_DEFAULT,
)
from copycat_tf.server import tensors
from copycat_tf.server.batching import BatchScheduler
from copycat_tf.server.defenses import OutputDefense
from copycat_tf.server.detector import Detector
from copycat_tf.server.metrics import ServerMetrics
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


def client_identity(headers: Mapping[str, str], client: str) -> str:
    """Who a request comes from, for the detector: its API key (as a short hash, so logs
    never show a key), else its address."""
    key = api_key_from_headers(headers)
    if not key:
        return client
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]


LOOPBACK = ("127.", "::1", "localhost", "unix:", "::ffff:127.")
# Clients whose failed authentications are remembered at once (memory bound).
MAX_TRACKED_CLIENTS = 10_000


def is_loopback(client: str) -> bool:
    """Whether a client address (HTTP peer or gRPC peer string) is this machine."""
    return client.startswith(LOOPBACK)


class Gatekeeper:
    """API keys, admin keys and rate limits, as a hardened cloud API has them.

    Args:
      api_keys: accepted prediction keys; None disables authentication.
      rate_limit_qps: requests per second allowed per key (per client when no keys);
        0 disables the limit. Bursts of up to max(1, qps) requests are allowed.
      admin_keys: keys that may reload the model configuration (never prediction keys);
        None: only loopback clients of a server without keys may.
      max_auth_failures: failed authentications per client address per minute before
        that address is refused for the rest of the minute (0: no limit).
    """

    def __init__(
        self,
        api_keys: frozenset[str] | None = None,
        rate_limit_qps: float = 0.0,
        admin_keys: frozenset[str] | None = None,
        max_auth_failures: int = 20,
    ):
        self.api_keys = api_keys
        self.rate = rate_limit_qps
        self.admin_keys = admin_keys
        self.max_auth_failures = max_auth_failures
        self._buckets: dict[str, tuple[float, float]] = {}
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _throttle_failures(self, client: str) -> None:
        """Refuses an address that failed too often in the last minute, before any key
        is compared (so guessing keys costs a minute per few dozen guesses)."""
        if not self.max_auth_failures:
            return
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, ()) if now - t < 60.0]
            if recent:
                self._failures[client] = recent
            else:
                self._failures.pop(client, None)
            if len(recent) >= self.max_auth_failures:
                raise ServingError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "Too many failed authentications from this address; retry in a minute",
                )

    def _record_failure(self, client: str) -> None:
        with self._lock:
            if client not in self._failures and len(self._failures) >= MAX_TRACKED_CLIENTS:
                self._failures.pop(next(iter(self._failures)))
            self._failures.setdefault(client, []).append(time.monotonic())

    def admit(self, key: str | None, client: str) -> None:
        """Raises UNAUTHENTICATED or RESOURCE_EXHAUSTED when the request may not proceed."""
        if self.api_keys is not None:
            self._throttle_failures(client)
            if not key or key not in self.api_keys:
                self._record_failure(client)
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
            if len(self._buckets) > MAX_TRACKED_CLIENTS:
                self._buckets.pop(next(iter(self._buckets)))

    def admit_admin(self, key: str | None, client: str) -> None:
        """Admin requests (model reload): an admin key, or a loopback client when the
        server has no keys at all.

        Raises:
          ServingError: RESOURCE_EXHAUSTED after too many failures, else PERMISSION_DENIED.
        """
        if self.admin_keys is None and self.api_keys is None and is_loopback(client):
            return
        self._throttle_failures(client)
        if self.admin_keys is None or not key or key not in self.admin_keys:
            self._record_failure(client)
            raise ServingError(
                grpc.StatusCode.PERMISSION_DENIED,
                "Model administration needs an admin key (--admin_keys_file), or a loopback "
                "client of a server without API keys",
            )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, None when `data` does not start like one."""
    if len(data) >= 24 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) an encoded image declares; (0, 0) when PIL cannot read it (the
    model's decoder then answers for it); None when it is larger than PIL accepts."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():  # the size is checked by the caller, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return image.size
    except Image.DecompressionBombError:
        return None
    except (UnidentifiedImageError, OSError, ValueError):
        return 0, 0


def check_image_sizes(alias: str, encoded: np.ndarray, max_pixels: int) -> None:
    """Refuses encoded images that would decode to more than max_pixels, reading only
    their headers (a 389 KB PNG can declare 20000x20000 pixels). PNG headers are read
    here directly (the common case, a few bytes each); other formats by PIL.

    Raises:
      ServingError: INVALID_ARGUMENT naming the element.
    """
    for i, data in enumerate(encoded.ravel()):
        size = _png_size(data) or _image_size(data)
        if size is None or size[0] * size[1] > max_pixels:
            what = "an image" if size is None else f"a {size[0]}x{size[1]} image"
            raise invalid(
                f"element {i} of input '{alias}' is {what}; this server decodes at most "
                f"{max_pixels} pixels per image (--max_image_pixels)"
            )


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
    allow_reload: bool = False
    max_request_batch: int = 0  # rows of one model call (0: no limit), as TF Serving's
    split_large_batches: bool = True  # larger requests run in chunks, else are refused
    max_tensor_bytes: int = tensors.MAX_TENSOR_BYTES
    max_image_pixels: int = 0  # pixels of one encoded image in a *_bytes input (0: no limit)
    metrics: ServerMetrics | None = None  # Prometheus metrics (--monitoring_config_file)
    detector: Detector | None = None  # extraction detector (--detector)
    degrade: OutputDefense | None = None  # what a flagged client gets (--detector_action)

    def __post_init__(self):
        self._rng = np.random.default_rng(self.seed)
        self._rng_lock = threading.Lock()

    # ------------------------------------------------------------------ access

    def admit(self, headers: Mapping[str, str], client: str, admin: bool = False) -> None:
        """Authenticates and rate-limits one request, from its headers alone (before its
        body is read).

        Args:
          headers: request headers or gRPC metadata, names in lower case.
          client: the caller's address (its identity when no API keys are configured).
          admin: the request administers the server (model reload).

        Raises:
          ServingError: UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED.
        """
        key = api_key_from_headers(headers)
        if admin:
            self.gate.admit_admin(key, client)
        else:
            self.gate.admit(key, client)

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
        client: str = "",
    ) -> dict[str, np.ndarray]:
        """Checks input dtypes and shapes, runs the model (batched), shows the request to
        the detector, applies the defence.

        Args:
          client: the caller's identity (client_identity) for the detector.
        """
        detector = self.detector
        if detector is not None and detector.cfg.action == "block" and detector.flagged(client):
            self._refuse(batch_size(inputs) or 0)
        self._inject_faults()
        rows = batch_size(inputs) or 0
        chunk = self.max_request_batch if signature.batchable else 0
        if chunk and rows > chunk and not self.split_large_batches:
            raise invalid(f"Task size {rows} is larger than maximum input batch size {chunk}")
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
            if got == tf.string and alias.endswith(BYTES_SUFFIX) and self.max_image_pixels:
                check_image_sizes(alias, value, self.max_image_pixels)
        timeout_s = timeout_s or self.request_timeout_s
        if chunk and rows > chunk:  # TF Serving's large batch splitting
            parts = [
                self.scheduler.run(
                    servable,
                    signature.name,
                    {k: v[start : start + chunk] for k, v in inputs.items()},
                    timeout_s,
                )
                for start in range(0, rows, chunk)
            ]
            result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        else:
            result = self.scheduler.run(servable, signature.name, inputs, timeout_s)
        degrade = False
        if detector is not None:  # judged before it is answered: a flagging request too
            images = detector_images(servable, inputs)
            if images is not None:
                detector.observe(client, images, predicted_classes(result))
            flagged = bool(detector.flagged(client))
            if flagged and detector.cfg.action == "block":
                self._refuse(rows)
            degrade = flagged and detector.cfg.action == "degrade"
        with self._rng_lock:
            if degrade and self.degrade is not None:
                result = self.degrade.apply(result, self._rng)
            result = self.defense.apply(result, self._rng)
        if degrade and self.metrics is not None:
            self.metrics.detector_action("degrade", rows)
        if self.metrics is not None and self.defense.kind != "none":
            self.metrics.defended(servable.name, self.defense.kind, rows)
        return {k: result[k] for k in outputs}

    def _refuse(self, rows: int) -> NoReturn:
        """A flagged client's request under --detector_action=block."""
        if self.metrics is not None:
            self.metrics.detector_action("block", rows)
        raise ServingError(
            grpc.StatusCode.PERMISSION_DENIED,
            "Refused: this client's queries were flagged as a model extraction attempt",
        )

    def record(self, api: str, method: str, info: dict, status: str, start: float) -> None:
        """One answered request: the access log, and the metrics when they are on."""
        log_access(api, method, info["model"], info["version"], info["batch"], status, start)
        if self.metrics is not None:
            # A name no model has is counted as "-": clients cannot add label values.
            model = info["model"] if info["model"] in self.store.model_names() else "-"
            self.metrics.request(api, method, model, status, time.monotonic() - start)


def predicted_classes(result: dict[str, np.ndarray]) -> np.ndarray:
    """The model's classes of one answer, before any defence."""
    if OUTPUT_CLASSES in result:
        return np.asarray(result[OUTPUT_CLASSES]).reshape(-1)
    return np.asarray(result[OUTPUT_SCORES]).argmax(axis=-1).reshape(-1)


def image_shape(servable: Servable) -> tuple[int, int, int] | None:
    """(H, W, C) of the model's `images` input, None when unknown or not fixed."""
    default = servable.signatures.get(SERVING_DEFAULT)
    spec = default.inputs.get(INPUT_IMAGES) if default is not None else None
    if spec is None or spec.shape is None or len(spec.shape) != 4 or None in spec.shape[1:]:
        return None
    return tuple(int(d) for d in spec.shape[1:])


def detector_images(servable: Servable, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """The request's images as uint8 [N, H, W, C] (encoded ones decoded at the size of the
    model's `images` input), None when the request holds no contract image input."""
    images = inputs.get(INPUT_IMAGES)
    if images is not None and images.ndim == 4:
        return np.asarray(images, dtype=np.uint8)
    encoded = inputs.get(INPUT_IMAGE_BYTES)
    shape = image_shape(servable)
    if encoded is None or shape is None:
        return None
    h, w, c = shape
    decoded = [
        tf.image.resize(
            tf.io.decode_image(data, channels=c, expand_animations=False), (h, w), "area"
        )
        for data in encoded.reshape(-1)
    ]
    return np.clip(np.round(np.stack(decoded)), 0, 255).astype(np.uint8)


def batch_size(inputs: dict[str, np.ndarray]) -> int | None:
    """Rows of a request's first input (None for a scalar input)."""
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else None


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
