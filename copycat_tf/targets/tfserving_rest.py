"""TF Serving REST client: b64 PNGs through `serving_bytes` when the model has it."""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import get_model_metadata_pb2

from copycat_tf import contract
from copycat_tf.data.images import png_bytes
from copycat_tf.errors import UserInputError
from copycat_tf.targets.answers import prediction_from_outputs
from copycat_tf.targets.base import PermanentError, Prediction, Target, TargetInfo
from copycat_tf.targets.http import HttpSessions
from copycat_tf.targets.signatures import (
    ChosenSignature,
    bytes_signature,
    choose_from_map,
    parse_model_path,
)


class RestTarget(Target):
    """http(s)://host:port/v1/models/<model>[/versions/N|/labels/L]."""

    OPTIONS = ("signature", "api_key", "use_bytes_signature")

    def __init__(
        self,
        url: str,
        signature: str = contract.SERVING_DEFAULT,
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
        self._http = HttpSessions()
        self._chosen: ChosenSignature | None = None
        self._bytes: tuple[str, str] | None = None

    def describe(self) -> TargetInfo:
        where = f"target {self.url} metadata"
        body = self._http.get_json(self._base + "/metadata", where, self._headers)
        sigs = get_model_metadata_pb2.SignatureDefMap()
        try:
            json_format.ParseDict(
                body["metadata"]["signature_def"], sigs, ignore_unknown_fields=True
            )
            version = int(body.get("model_spec", {}).get("version", 0) or 0)
        except (ValueError, KeyError, TypeError, AttributeError, json_format.ParseError) as e:
            raise PermanentError(f"{where}: not TF Serving metadata: {e}") from e
        chosen = self._chosen = choose_from_map(self.url, sigs, self.signature)
        # Encoded PNGs through a `*_bytes` signature are ~10x smaller than pixel JSON.
        self._bytes = bytes_signature(sigs, chosen) if self._use_bytes else None
        return chosen.target_info(
            self.url,
            {
                "transport": "rest",
                "model": self.model,
                "version": version,
                "signature": self._bytes[0] if self._bytes else self.signature,
                "encoding": "b64_png" if self._bytes else "instances",
            },
        )

    def predict(
        self, images: np.ndarray, timeout_s: float = 30.0, encoded: list[bytes] | None = None
    ) -> Prediction:
        if self._chosen is None:
            self.describe()
        chosen = self._chosen
        if self._bytes:
            pngs = encoded if encoded is not None else [png_bytes(im) for im in images]
            body = {
                "signature_name": self._bytes[0],
                "instances": [{"b64": base64.b64encode(p).decode()} for p in pngs],
            }
        else:
            body = {
                "signature_name": self.signature,
                "instances": np.asarray(images).astype(chosen.input_dtype.as_numpy_dtype).tolist(),
            }
        where = f"target {self.url}"
        answer = self._http.post_json(
            self._base + ":predict", json.dumps(body).encode(), timeout_s, where, self._headers
        )
        rows = answer.get("predictions") if isinstance(answer, dict) else None
        if not isinstance(rows, list) or len(rows) != len(images):
            raise PermanentError(f"{where}: answer has no {len(images)} predictions")
        return prediction_from_outputs(
            _columns(rows, chosen, where), chosen.labels_out, chosen.scores_out, where
        )

    def close(self) -> None:
        self._http.close()


def _columns(rows: list, chosen: ChosenSignature, where: str) -> dict[str, np.ndarray]:
    """TF Serving's row format as {output: array}: a list of {output: value} objects when the
    answer has several outputs, else a list of bare values of the only one."""
    try:
        if rows and isinstance(rows[0], dict):
            names = [a for a in (chosen.labels_out, chosen.scores_out) if a and a in rows[0]]
            return {a: np.array([r[a] for r in rows]) for a in names}
        only = chosen.scores_out if chosen.scores_out and not chosen.labels_out else None
        return {only or chosen.labels_out: np.array(rows)}
    except (KeyError, TypeError, ValueError) as e:
        raise PermanentError(f"{where}: unexpected prediction rows: {e}") from e
