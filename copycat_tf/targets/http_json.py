"""Generic JSON-over-HTTP client for cloud prediction APIs (API key, request template).

  json+https://api.example.com/v1/classify   (the request goes to https://...)

Options:
  request_template  JSON text; the string "{{image_b64}}" is replaced by one image's
                    base64 PNG (one request per image), or "{{images_b64}}" by the list of a
                    batch's base64 PNGs (one request per batch). Empty: the PNG bytes are the
                    whole body (Content-Type image/png), one image per request.
  response_field    where the answer is: a dotted path, `*` for each list element, e.g.
                    "predictions.*.label", "scores", "results.*.probabilities".
                    A value may be an int (class index), a string (a class name), a list
                    of numbers (scores), or an object {class name: score}.
  input_shape       (H, W, C) the API expects (cloud APIs publish no metadata).
  num_classes / class_names   the label space (names are needed for string answers).
  headers           extra headers; api_key goes in api_key_header (never logged).
"""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

import numpy as np

from copycat_tf.data.images import png_bytes
from copycat_tf.errors import UserInputError
from copycat_tf.targets.base import PermanentError, Prediction, Target, TargetInfo
from copycat_tf.targets.http import HttpSessions

ONE = '"{{image_b64}}"'
MANY = '"{{images_b64}}"'


def resolve_field(value, path: str):
    """Follows a dotted path through JSON; `*` maps over a list."""
    if not path:
        return value
    head, _, rest = path.partition(".")
    if head == "*":
        if not isinstance(value, list):
            raise KeyError(f"expected a list at '*', got {type(value).__name__}")
        return [resolve_field(v, rest) for v in value]
    if isinstance(value, list) and head.isdigit():
        return resolve_field(value[int(head)], rest)
    if not isinstance(value, dict) or head not in value:
        raise KeyError(f"field {head!r} missing")
    return resolve_field(value[head], rest)


class JsonHttpTarget(Target):
    """A JSON prediction API described by options instead of metadata."""

    OPTIONS = (
        "request_template",
        "response_field",
        "input_shape",
        "num_classes",
        "class_names",
        "headers",
        "api_key",
        "api_key_header",
    )

    def __init__(
        self,
        url: str,
        request_template: str = "",
        response_field: str = "",
        input_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        headers: dict | None = None,
        api_key: str | None = None,
        api_key_header: str = "X-API-Key",
    ):
        self.url = url
        self._endpoint = url[len("json+") :]
        if not urlsplit(self._endpoint).hostname:
            raise UserInputError(f"target URL {url!r}: expected json+http(s)://host[:port]/path")
        if not input_shape or len(input_shape) != 3:
            raise UserInputError(
                f"target {url}: a JSON API publishes no input spec; pass --input_shape=HxWxC"
            )
        self.class_names = list(class_names or [])
        self.num_classes = int(num_classes or len(self.class_names))
        if self.num_classes < 2:
            raise UserInputError(
                f"target {url}: pass --num_classes or --class_names (the API's label space)"
            )
        if not response_field:
            raise UserInputError(f"target {url}: pass --response_field (where labels are)")
        if request_template:
            if MANY in request_template:
                self._batch = True
            elif ONE in request_template:
                self._batch = False
            else:
                raise UserInputError(
                    f"target {url}: --request_template must contain {ONE} or {MANY}"
                )
            json.loads(request_template.replace(MANY, "[]").replace(ONE, '""'))
        else:
            self._batch = False
        self._template = request_template
        self._field = response_field
        self._shape = tuple(int(d) for d in input_shape)
        self._headers = dict(headers or {})
        if api_key:
            self._headers[api_key_header] = api_key
        self._key_header = api_key_header if api_key else None
        self._http = HttpSessions()

    def describe(self) -> TargetInfo:
        return TargetInfo(
            url=self.url,
            input_shape=self._shape,
            num_classes=self.num_classes,
            has_scores=None,  # known only from answers; scores are kept when they come
            details={
                "transport": "json-http",
                "model": self._endpoint,
                "response_field": self._field,
                "batched": self._batch,
                "headers": sorted(self._headers),
            },  # names only, never values
            max_batch_size=0 if self._batch else 1,
        )

    def _post(self, body: bytes, content_type: str, timeout_s: float):
        return self._http.post_json(
            self._endpoint,
            body,
            timeout_s,
            f"target {self.url}",
            self._headers,
            content_type,
        )

    def _value_to_label(self, value) -> tuple[int, np.ndarray | None]:
        if isinstance(value, bool):
            raise PermanentError(f"target {self.url}: boolean label {value!r}")
        if isinstance(value, int):
            return value, None
        if isinstance(value, str):
            if value not in self.class_names:
                raise PermanentError(
                    f"target {self.url}: answered class {value!r} not in --class_names"
                )
            return self.class_names.index(value), None
        if isinstance(value, dict):
            missing = [c for c in self.class_names if c not in value]
            if not self.class_names or missing:
                raise PermanentError(
                    f"target {self.url}: score object needs --class_names covering its keys"
                )
            scores = np.array([float(value[c]) for c in self.class_names], np.float32)
            return int(scores.argmax()), scores
        if isinstance(value, list):
            scores = np.array(value, np.float32)
            return int(scores.argmax()), scores
        raise PermanentError(f"target {self.url}: cannot read a label from {value!r}")

    def predict(
        self, images: np.ndarray, timeout_s: float = 30.0, encoded: list[bytes] | None = None
    ) -> Prediction:
        pngs = encoded if encoded is not None else [png_bytes(im) for im in images]
        b64 = [base64.b64encode(p).decode() for p in pngs]
        if self._batch:
            answers = [
                self._post(
                    self._template.replace(MANY, json.dumps(b64)).encode(),
                    "application/json",
                    timeout_s,
                )
            ]
        elif self._template:
            answers = [
                self._post(
                    self._template.replace(ONE, json.dumps(b)).encode(),
                    "application/json",
                    timeout_s,
                )
                for b in b64
            ]
        else:
            answers = [self._post(p, "image/png", timeout_s) for p in pngs]
        values = []
        try:
            for answer in answers:
                got = resolve_field(answer, self._field)
                values.extend(got if self._batch else [got])
        except (KeyError, IndexError) as e:
            raise PermanentError(
                f"target {self.url}: --response_field {self._field!r} not in answer: {e}"
            ) from e
        if len(values) != len(images):
            raise PermanentError(
                f"target {self.url}: {len(values)} answers for {len(images)} images"
            )
        parsed = [self._value_to_label(v) for v in values]
        labels = np.array([p[0] for p in parsed], np.int64)
        scores = None
        if all(p[1] is not None for p in parsed):
            scores = np.stack([p[1] for p in parsed])
        return Prediction(labels, scores)

    def close(self) -> None:
        self._http.close()
