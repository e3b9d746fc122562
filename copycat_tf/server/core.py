"""What both APIs share: access control, input checks, batched model calls, defences."""

from __future__ import annotations

import copy
import dataclasses
import logging as pylogging
import threading
import time

import grpc
import numpy as np
import tensorflow as tf

from copycat_tf.server.batching import BatchScheduler
from copycat_tf.server.defenses import SCORES, OutputDefense
from copycat_tf.server.model_store import ModelStore, Servable, SignatureInfo
from copycat_tf.server.status import ServingError, invalid

ACCESS_LOG = pylogging.getLogger("copycat_tf.access")


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
        return [k for k in signature.outputs if not (self.defense.hides_scores and k == SCORES)]

    def signature_defs_for_metadata(self, servable: Servable) -> dict:
        """SignatureDefs as stored, minus outputs the defence hides."""
        if not self.defense.hides_scores:
            return servable.signature_defs
        defs = {}
        for key, sig in servable.signature_defs.items():
            sig = copy.deepcopy(sig)
            if SCORES in sig.outputs:
                del sig.outputs[SCORES]
            defs[key] = sig
        return defs

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
