"""TF Serving REST client: b64 PNGs through `serving_bytes` when the model has it."""

from __future__ import annotations

import base64
import json
import threading
from urllib.parse import urlsplit

import numpy as np
import requests
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2

from copycat_tf.data.images import png_bytes
from copycat_tf.errors import UserInputError
from copycat_tf.targets.base import (
    PermanentError,
    Prediction,
    Target,
    TargetSpec,
    TransientError,
    parse_model_path,
)
from copycat_tf.targets.tfserving_grpc import parse_signature, signature_io

_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


def http_error(response: requests.Response, where: str) -> Exception:
    """TransientError (429, 5xx, 408) or PermanentError for a failed HTTP call."""
    try:
        detail = response.json().get("error", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    message = f"{where}: HTTP {response.status_code}: {str(detail)[:300]}"
    if response.status_code in _TRANSIENT_HTTP:
        return TransientError(message)
    return PermanentError(message)


def post_json(
    session,
    url,
    body: bytes,
    timeout_s: float,
    where: str,
    headers=None,
    content_type: str = "application/json",
):
    """POST a body; the parsed JSON answer, or a classified (transient/permanent) error."""
    try:
        response = session.post(
            url,
            data=body,
            timeout=timeout_s,
            headers={"Content-Type": content_type, **(headers or {})},
        )
    except (requests.ConnectionError, requests.Timeout) as e:
        raise TransientError(f"{where}: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise http_error(response, where)
    try:
        return response.json()
    except ValueError as e:
        raise PermanentError(f"{where}: answer is not JSON: {response.text[:200]}") from e


class HttpSessions:
    """One requests.Session per thread (sessions are not thread-safe), all closed at once."""

    def _init_sessions(self) -> None:
        self._local = threading.local()
        self._sessions: list[requests.Session] = []

    def _http(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            self._sessions.append(session)
        return session

    def close(self) -> None:
        for session in self._sessions:
            session.close()


class RestTarget(HttpSessions, Target):
    """http(s)://host:port/v1/models/<model>[/versions/N|/labels/L]."""

    OPTIONS = ("signature", "api_key", "use_bytes_signature")

    def __init__(
        self,
        url: str,
        signature: str = "serving_default",
        api_key: str | None = None,
        use_bytes_signature: bool = True,
    ):
        parts = urlsplit(url)
        prefix = "/v1/models/"
        if not parts.hostname or not parts.path.startswith(prefix):
            raise UserInputError(
                f"target URL {url!r}: expected http(s)://host:port/v1/models/<model>"
            )
        self.url = url
        self.model, self.version, self.label = parse_model_path(url, parts.path[len(prefix) :])
        self._base = url.rstrip("/")
        self.signature = signature
        self._headers = {"X-API-Key": api_key} if api_key else {}
        self._use_bytes = use_bytes_signature
        self._init_sessions()
        self._spec: TargetSpec | None = None

    def describe(self) -> TargetSpec:
        where = f"target {self.url} metadata"
        try:
            response = self._http().get(self._base + "/metadata", headers=self._headers, timeout=30)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TransientError(f"{where}: {type(e).__name__}: {e}") from e
        if response.status_code != 200:
            raise http_error(response, where)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        try:
            body = response.json()
            json_format.ParseDict(
                body["metadata"]["signature_def"], sigs, ignore_unknown_fields=True
            )
        except (ValueError, KeyError, json_format.ParseError) as e:
            raise PermanentError(f"{where}: not TF Serving metadata: {e}") from e
        self._input, self._dtype, shape, self._labels_out, self._scores_out, outputs = (
            parse_signature(self.url, sigs, self.signature)
        )
        # Encoded PNGs through a `*_bytes` signature are ~10x smaller than pixel JSON.
        self._bytes_sig = self._bytes_input = None
        if self._use_bytes:
            for name, sig in sigs.signature_def.items():
                sig_inputs, sig_outputs = signature_io(sig)
                if (
                    len(sig_inputs) == 1
                    and next(iter(sig_inputs)).endswith("_bytes")
                    and set(sig_outputs) >= {a for a in (self._labels_out, self._scores_out) if a}
                ):
                    self._bytes_sig, self._bytes_input = name, next(iter(sig_inputs))
                    break
        num_classes = outputs[self._scores_out][1][1] if self._scores_out else 0
        self._spec = TargetSpec(
            url=self.url,
            input_shape=shape,
            num_classes=max(int(num_classes or 0), 0),
            has_scores=self._scores_out is not None,
            details={
                "transport": "rest",
                "model": self.model,
                "version": int(body.get("model_spec", {}).get("version", 0) or 0),
                "signature": self._bytes_sig or self.signature,
                "encoding": "b64_png" if self._bytes_sig else "instances",
                "outputs": sorted(outputs),
            },
        )
        return self._spec

    def predict(self, images: np.ndarray, timeout_s: float = 30.0, encoded=None) -> Prediction:
        if self._spec is None:
            self.describe()
        if self._bytes_sig:
            pngs = encoded if encoded is not None else [png_bytes(im) for im in images]
            body = {
                "signature_name": self._bytes_sig,
                "instances": [{"b64": base64.b64encode(p).decode()} for p in pngs],
            }
        else:
            body = {
                "signature_name": self.signature,
                "instances": np.asarray(images).astype(self._dtype.as_numpy_dtype).tolist(),
            }
        answer = post_json(
            self._http(),
            self._base + ":predict",
            json.dumps(body).encode(),
            timeout_s,
            f"target {self.url}",
            self._headers,
        )
        rows = answer.get("predictions") if isinstance(answer, dict) else None
        if not isinstance(rows, list) or len(rows) != len(images):
            raise PermanentError(f"target {self.url}: answer has no {len(images)} predictions")
        return _rows_to_prediction(rows, self._labels_out, self._scores_out, self.url)


def _rows_to_prediction(rows, labels_out, scores_out, url) -> Prediction:
    try:
        if rows and isinstance(rows[0], dict):
            scores = np.array([r[scores_out] for r in rows], np.float32) if scores_out else None
            labels = (
                np.array([r[labels_out] for r in rows]) if labels_out else scores.argmax(axis=1)
            )
        elif scores_out and not labels_out:
            scores = np.array(rows, np.float32)
            labels = scores.argmax(axis=1)
        else:
            scores, labels = None, np.array(rows)
    except (KeyError, TypeError, ValueError) as e:
        raise PermanentError(f"target {url}: unexpected prediction rows: {e}") from e
    return Prediction(labels.astype(np.int64), scores)
