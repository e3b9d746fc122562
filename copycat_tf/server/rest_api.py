"""REST API: TF Serving's /v1/models routes, JSON formats and errors (reference §1)."""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NoReturn
from urllib.parse import unquote, urlsplit

import grpc
from google.protobuf import json_format
from tensorflow_serving.apis import model_pb2

from copycat_tf.server import tensors
from copycat_tf.server.core import ServingCore, log_access
from copycat_tf.server.status import ServingError, invalid

_V1 = re.compile(r"(?i)/v1/.*")
_POST = re.compile(
    r"(?i)/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
    r":(classify|regress|predict)"
)
_GET = re.compile(
    r"(?i)/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?"
)
# libevent's own 404 page for paths outside /v1/ (reference §1.1): HTML, not JSON.
_HTML_404 = (
    b"<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n"
    b"</BODY></HTML>\n"
)
_MAX_UNCOMPRESSED = 100 * 1024 * 1024
_INT64_MAX = 2**63 - 1
_RAPIDJSON = {
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Expecting ',' delimiter": "Missing a comma or '}' after an object member.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid control character at": "Invalid encoding in string.",
    "Invalid \\escape": "Invalid escape character in string.",
}


def error_body(message: str) -> bytes:
    return ('{\n    "error": ' + json.dumps(message) + "\n}").encode()


def parse_json_body(body: bytes) -> dict:
    """Parses a request body as TF Serving does (trailing bytes after the value ignored)."""
    if not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"JSON Parse error: Invalid encoding in string. at offset: {e.start}") from e
    start = len(text) - len(text.lstrip())
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as e:
        message = _RAPIDJSON.get(e.msg, e.msg)
        raise invalid(f"JSON Parse error: {message} at offset: {e.pos}") from e
    if not isinstance(value, dict):
        raise invalid(f"JSON Value: {text[:256]} Is not object")
    return value


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "copycat_tf-model-server"
    # Headers and body go out in separate writes; with Nagle's algorithm on, the second
    # waits for the client's delayed ACK (~40 ms per request).
    disable_nagle_algorithm = True
    server: RestServer

    # Any method is forwarded to the REST handler, as TF Serving does.
    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_GET

    def do_OPTIONS(self):
        ok = re.match(r"https?://", self.headers.get("Origin", "")) is not None
        self._send(200 if ok else 400, b"", content_type=None)

    def log_message(self, format, *args):  # access lines come from log_access instead
        pass

    def _send(self, status: int, body: bytes, content_type: str | None = "application/json"):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if self.server.cors:
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "POST, GET")
            self.send_header("Access-Control-Allow-Headers", "Content-Type")
        self.send_header("Content-Length", str(len(body)))
        if self.server.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        try:
            size = int(length) if length else 0
        except ValueError:
            raise invalid(f"Invalid Content-Length: {length}") from None
        limit = self.server.max_request_bytes
        if limit and size > limit:
            self.close_connection = True  # the body is not read; the connection is spent
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"Request body of {size} bytes exceeds the server's --max_request_bytes={limit}",
            )
        body = self.rfile.read(size) if size > 0 else b""
        if "gzip" in self.headers.get("Content-Encoding", "").lower():
            try:
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                body = d.decompress(body, _MAX_UNCOMPRESSED)
                if d.unconsumed_tail:
                    raise invalid("Uncompressed request body exceeds 100 MiB")
            except (zlib.error, gzip.BadGzipFile) as e:
                raise invalid(f"Failed to decompress gzip request body: {e}") from e
        return body

    def _dispatch(self):
        start = time.monotonic()
        path = urlsplit(self.path).path
        if not _V1.fullmatch(path):
            self._send(404, _HTML_404, content_type="text/html")
            return
        self.server.enter()
        info = {"model": "", "version": None, "batch": None}
        method = self.command
        try:
            body = self._read_body()
            self.server.core.admit(
                {k.lower(): v for k, v in self.headers.items()}, self.client_address[0]
            )
            status, payload = self._route(method, path, body, info)
        except ServingError as e:
            status, payload = e.http_status, error_body(e.message)
            if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_bytes" in e.message:
                status = 413
        except Exception as e:  # never let one request take the handler down silently
            status, payload = 500, error_body(f"Internal error: {type(e).__name__}: {e}")
        try:
            self._send(status, payload)
        finally:
            self.server.leave()
            log_access(
                "rest", method, info["model"], info["version"], info["batch"], str(status), start
            )

    def _route(self, method: str, path: str, body: bytes, info: dict) -> tuple[int, bytes]:
        core = self.server.core
        if method == "POST":
            m = _POST.fullmatch(path)
            if m and m.group(4) in ("predict", "classify", "regress"):
                name, version, label = _target(m)
                info["model"] = name
                if m.group(4) == "predict":
                    return 200, self._predict(core, name, version, label, body, info)
                return 200, self._classify_or_regress(core, name, version, label, body, m.group(4))
        elif method == "GET":
            m = _GET.fullmatch(path)
            if m:
                if not m.group(1):
                    raise invalid("Missing model name in request.")
                name, version, label = _target(m)
                info["model"] = name
                if m.group(4):
                    return 200, _metadata_json(core, name, version, label, info)
                return 200, json_format.MessageToJson(
                    core.model_status(name, version),
                    indent=1,
                    always_print_fields_with_no_presence=True,
                ).encode()
        raise invalid(f"Malformed request: {method} {path}")

    def _predict(self, core: ServingCore, name, version, label, body: bytes, info) -> bytes:
        request = parse_json_body(body)
        sig_name = request.get("signature_name", "")
        if not isinstance(sig_name, str):
            raise invalid(
                f"JSON Value: {json.dumps(request)[:256]} not formatted correctly. "
                "'signature_name' key must be a string value."
            )
        servable = core.store.resolve(name, version, label)
        info["version"] = servable.version
        _, signature = core.signature(servable, sig_name)
        inputs, row_format = tensors.request_inputs(request, signature)
        info["batch"] = next(iter(inputs.values())).shape[0] if inputs else 0
        outputs = core.run(
            servable,
            signature,
            inputs,
            core.visible_outputs(signature),
            timeout_s=self.server.timeout_s,
        )
        return tensors.predict_response_json(outputs, row_format).encode()

    def _classify_or_regress(self, core, name, version, label, body, verb) -> NoReturn:
        request = parse_json_body(body)
        examples = request.get("examples")
        if not isinstance(examples, list) or not examples:
            raise invalid(f"When method is {verb}, key 'examples' is expected and was not found")
        servable = core.store.resolve(name, version, label)
        core.refuse_classify_or_regress(servable, request.get("signature_name"), verb)


def _target(match) -> tuple[str, int | None, str | None]:
    name = unquote(match.group(1))
    version = match.group(2)
    if version is not None:
        number = int(version)
        if number > _INT64_MAX:
            raise invalid(f"Failed to convert version: {version} to numeric.")
        version = number
    label = unquote(match.group(3)) if match.group(3) else None
    return name, version, label


def _metadata_json(core: ServingCore, name, version, label, info) -> bytes:
    servable = core.store.resolve(name, version, label)
    info["version"] = servable.version
    spec = model_pb2.ModelSpec(name=name)
    spec.version.value = servable.version
    sig_map = core.signature_def_map(servable)
    spec_json = json_format.MessageToJson(
        spec,
        indent=1,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
    )
    sigs_json = json_format.MessageToJson(
        sig_map,
        indent=1,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
    )
    return (
        '{\n"model_spec":' + spec_json + ',\n"metadata": {"signature_def": ' + sigs_json + "}\n}\n"
    ).encode()


class RestServer(ThreadingHTTPServer):
    """The HTTP server; counts requests in flight so a shutdown can drain them."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address,
        core: ServingCore,
        max_request_bytes: int = 0,
        timeout_s: float = 30.0,
        cors: bool = False,
    ):
        super().__init__(address, _Handler)
        self.core = core
        self.max_request_bytes = max_request_bytes
        self.timeout_s = timeout_s
        self.cors = cors
        self.draining = False
        self._in_flight = 0
        self._cond = threading.Condition()

    def enter(self) -> None:
        with self._cond:
            self._in_flight += 1

    def leave(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Stops accepting, then waits for requests in flight; True when none remain."""
        self.draining = True
        self.shutdown()
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)
