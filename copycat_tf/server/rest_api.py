"""REST API: TF Serving's /v1/models routes, JSON formats and errors (reference §1).

HTTP itself (framing, chunked bodies, keep-alive, timeouts, a deep listen backlog) is
aiohttp's; this module translates requests to ServingCore calls and answers back. The key
is checked on the headers before any of the body is read; the body (compressed and
decompressed) is bounded by --max_request_bytes; JSON is parsed with orjson (the
standard library's parser gives TF Serving's error messages when orjson refuses).
Model work runs on a thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import threading
import time
import zlib
from typing import NoReturn
from urllib.parse import unquote

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format
from tensorflow_serving.apis import model_pb2

from copycat_tf.server import tensors
from copycat_tf.server.core import ServingCore, batch_size, client_identity
from copycat_tf.server.metrics import DEFAULT_PATH as DEFAULT_METRICS_PATH
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
# Without --max_request_bytes, bodies are bounded like gRPC messages.
DEFAULT_MAX_BODY = 2**31 - 1
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


class _OneLine(logging.Filter):
    """aiohttp logs a client's malformed request or hang-up with a traceback; one line is
    enough for the client's fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"[:500]
            record.args, record.exc_info, record.exc_text = (), None, None
        return True


_AIOHTTP_LOG = logging.getLogger("aiohttp.server")
if not any(isinstance(f, _OneLine) for f in _AIOHTTP_LOG.filters):
    _AIOHTTP_LOG.addFilter(_OneLine())


def error_body(message: str) -> bytes:
    return ('{\n    "error": ' + json.dumps(message) + "\n}").encode()


def parse_json_body(body: bytes) -> dict:
    """Parses a request body as TF Serving does (trailing bytes after the value ignored).

    Raises:
      ServingError: INVALID_ARGUMENT with RapidJSON's messages (as TF Serving's).
    """
    if not body.strip():
        raise invalid("JSON Parse error: The document is empty")
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = _parse_slowly(body)  # exact messages, trailing bytes, huge numbers
    if not isinstance(value, dict):
        raise invalid(f"JSON Value: {body[:256].decode(errors='replace')} Is not object")
    return value


def _parse_slowly(body: bytes):
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
    except RecursionError:
        raise invalid("JSON Parse error: The document is nested too deeply.") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise invalid(f"JSON Parse error: Invalid value. ({e})") from None
    return value


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body (de-chunked by aiohttp, gunzipped here), never more than `limit` bytes
    either way; an oversized body is refused before it is read."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(f"Request body of {declared} bytes", limit)
    chunks, size = [], 0
    while True:
        chunk = await request.content.read(1 << 20)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise _too_large("Request body", limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if "gzip" in request.headers.get("Content-Encoding", "").lower():
        try:
            decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            body = decompressor.decompress(body, limit)
        except zlib.error as e:
            raise invalid(f"Failed to decompress gzip request body: {e}") from e
        if decompressor.unconsumed_tail:
            raise _too_large("Uncompressed request body", limit)
    return body


def _too_large(what: str, limit: int) -> ServingError:
    return ServingError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{what} exceeds the server's --max_request_bytes={limit}",
    )


class _Routes:
    """What a REST request asks of the ServingCore (runs on a worker thread)."""

    def __init__(self, core: ServingCore, timeout_s: float):
        self.core = core
        self.timeout_s = timeout_s

    def route(self, method: str, path: str, body: bytes, info: dict) -> tuple[int, bytes]:
        core = self.core
        if method == "POST":
            m = _POST.fullmatch(path)
            if m and m.group(4) in ("predict", "classify", "regress"):
                name, version, label = _target(m)
                info["model"] = name
                if m.group(4) == "predict":
                    return 200, self._predict(name, version, label, body, info)
                return 200, self._classify_or_regress(name, version, label, body, m.group(4))
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

    def _predict(self, name, version, label, body: bytes, info) -> bytes:
        core = self.core
        # Raw pixels: parse the small part of the body now, the numbers in one go later.
        split = tensors.split_numeric_body(body)
        request = split.request if split else parse_json_body(body)
        sig_name = request.get("signature_name", "")
        if not isinstance(sig_name, str):
            raise invalid(
                f"JSON Value: {json.dumps(request)[:256]} not formatted correctly. "
                "'signature_name' key must be a string value."
            )
        servable = core.store.resolve(name, version, label)
        info["version"] = servable.version
        _, signature = core.signature(servable, sig_name)
        inputs = tensors.numeric_inputs(split, signature) if split else None
        row_format = bool(split) and split.key == "instances"
        if inputs is None:
            request = parse_json_body(body) if split else request
            # numpy would read true as 1: check value by value when booleans occur.
            exact = b"true" in body or b"false" in body
            inputs, row_format = tensors.request_inputs(request, signature, exact)
        info["batch"] = batch_size(inputs)
        outputs = core.run(
            servable,
            signature,
            inputs,
            core.visible_outputs(signature),
            timeout_s=self.timeout_s,
            client=info.get("client", ""),
        )
        return tensors.predict_response_json(outputs, row_format).encode()

    def _classify_or_regress(self, name, version, label, body, verb) -> NoReturn:
        request = parse_json_body(body)
        examples = request.get("examples")
        if not isinstance(examples, list) or not examples:
            raise invalid(f"When method is {verb}, key 'examples' is expected and was not found")
        servable = self.core.store.resolve(name, version, label)
        self.core.refuse_classify_or_regress(servable, request.get("signature_name"), verb)


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


class RestServer:
    """The REST front end: an aiohttp server on its own event-loop thread.

    Args:
      address: (host, port); port 0 picks a free one.
      core: the ServingCore.
      max_request_bytes: largest body, compressed or not (0: DEFAULT_MAX_BODY).
      timeout_s: a request's time limit (reading the body and the model call).
      cors: add TF Serving's CORS headers.
      threads: worker threads for model calls.
      backlog: listen backlog (pending connections the kernel queues).
      metrics_path: where GET answers the Prometheus metrics (when core.metrics is set).
    """

    def __init__(
        self,
        address: tuple[str, int],
        core: ServingCore,
        max_request_bytes: int = 0,
        timeout_s: float = 30.0,
        cors: bool = False,
        threads: int = 16,
        backlog: int = 1024,
        metrics_path: str = DEFAULT_METRICS_PATH,
    ):
        self.core = core
        self.metrics_path = metrics_path
        self.routes = _Routes(core, timeout_s)
        self.max_body = max_request_bytes or DEFAULT_MAX_BODY
        self.timeout_s = timeout_s
        self.cors = cors
        self.draining = False
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="rest")
        self._loop = asyncio.new_event_loop()
        self._in_flight = 0
        self._cond = threading.Condition()
        app = web.Application(client_max_size=self.max_body)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Bodies are gunzipped here, within the size limit, not by aiohttp.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, auto_decompress=False
        )
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, address[0], address[1], backlog=backlog)
        self._loop.run_until_complete(site.start())  # raises OSError when the port is taken
        self.server_address = tuple(self._runner.addresses[0][:2])
        self._thread = threading.Thread(target=self._loop.run_forever, name="rest", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        method = request.method
        path = request.raw_path.split("?", 1)[0]
        if method == "OPTIONS":
            origin = request.headers.get("Origin", "")
            return self._response(200 if re.match(r"https?://", origin) else 400, b"", None)
        metrics = self.core.metrics
        if metrics is not None and path == self.metrics_path and method == "GET":
            return await self._metrics(request, metrics)
        if not _V1.fullmatch(path):
            return self._response(404, _HTML_404, "text/html")
        info = {"model": "", "version": None, "batch": None}
        with self._cond:
            self._in_flight += 1
        try:
            status, payload = await self._answer(request, method, path, info)
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()
        self.core.record("rest", method, info, str(status), start)
        return self._response(status, payload, "application/json")

    async def _metrics(self, request: web.Request, metrics) -> web.Response:
        """The Prometheus exposition (keys as for the model routes)."""
        try:
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.core.admit(headers, request.remote or "")
        except ServingError as e:
            return self._response(e.http_status, error_body(e.message), "application/json")
        body, content_type = metrics.render()
        return self._response(200, body, content_type)

    async def _answer(self, request, method, path, info) -> tuple[int, bytes]:
        try:
            # The key first, from the headers alone: nothing else is read for a stranger.
            headers = {k.lower(): v for k, v in request.headers.items()}
            self.core.admit(headers, request.remote or "")
            info["client"] = client_identity(headers, request.remote or "")
            body = await asyncio.wait_for(_read_body(request, self.max_body), self.timeout_s)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._pool, self.routes.route, method, path, body, info
            )
        except ServingError as e:
            status = e.http_status
            if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_request_bytes" in e.message:
                status = 413
            return status, error_body(e.message)
        except TimeoutError:
            return 408, error_body(f"Request not received within {self.timeout_s:g}s")
        except Exception as e:  # never let one request take the server down silently
            return 500, error_body(f"Internal error: {type(e).__name__}: {e}")

    def _response(self, status: int, body: bytes, content_type: str | None) -> web.Response:
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        if self.cors:
            headers["Access-Control-Allow-Origin"] = "*"
            headers["Access-Control-Allow-Methods"] = "POST, GET"
            headers["Access-Control-Allow-Headers"] = "Content-Type"
        if self.draining:
            headers["Connection"] = "close"
        return web.Response(status=status, body=body, headers=headers)

    # ------------------------------------------------------------------ lifecycle

    def drain(self, timeout_s: float) -> bool:
        """Stops accepting, then waits for requests in flight; True when none remain."""
        self.draining = True
        future = asyncio.run_coroutine_threadsafe(self._stop_listening(), self._loop)
        future.result(timeout=timeout_s + 5)
        with self._cond:
            return self._cond.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    async def _stop_listening(self) -> None:
        for site in list(self._runner.sites):
            await site.stop()

    def server_close(self) -> None:
        """Closes connections, the event loop and the worker threads."""
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        # Connections that would not close in time die with the loop.
        with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
            future.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
