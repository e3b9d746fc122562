"""The model server in front of a hostile client: every hole a probe found, closed.

Each test reproduces one finding against a real server process on loopback.
"""

import base64
import concurrent.futures
import gzip
import json
import random
import socket
import struct
import time
import zlib

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from conftest import export_tiny_model
from server_util import OPTIONS, ServerProcess, grpc_predict, images, wait_for
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from copycat_tf.server.core import check_image_sizes
from copycat_tf.server.status import ServingError


def _reload(target, base_path, metadata=None, name="m"):
    config = model_server_config_pb2.ModelServerConfig()
    entry = config.model_config_list.config.add()
    entry.name, entry.base_path, entry.model_platform = name, str(base_path), "tensorflow"
    with grpc.insecure_channel(target) as channel:
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = model_management_pb2.ReloadConfigRequest(config=config)
        return stub.HandleReloadConfigRequest(request, 30, metadata=metadata)


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _raw_http(port: int, request: bytes, timeout=10.0) -> bytes:
    """Sends bytes on a fresh connection; returns what the server answered first."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


# ----------------------------------------------------------------------------- who gets in


def test_model_reload_is_off_unless_enabled(tiny_export):
    with ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m") as server:
        code, details = _code(lambda: _reload(server.grpc_target, "/etc"))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "--allow_reload_config" in details
        assert grpc_predict(server.grpc_target, images()).outputs["scores"].float_val


def test_reload_needs_an_admin_key_and_a_path_under_the_roots(tmp_path, tiny_export):
    root = tmp_path / "models"
    export_tiny_model(str(root), name="m", version=1)
    outside = tmp_path / "elsewhere"
    export_tiny_model(str(outside), name="m", version=1)
    (root / "link").symlink_to(outside)
    (tmp_path / "keys").write_text("predict-key\n")
    (tmp_path / "admin").write_text("admin-key\n")
    with ServerProcess(
        f"--model_base_path={root / 'm'}",
        "--model_name=m",
        "--allow_reload_config",
        f"--model_root={root}",
        f"--api_keys_file={tmp_path / 'keys'}",
        f"--admin_keys_file={tmp_path / 'admin'}",
        api_key="predict-key",
    ) as server:
        target = server.grpc_target
        predict_key = [("x-api-key", "predict-key")]
        admin = [("x-api-key", "admin-key")]
        code, _ = _code(lambda: _reload(target, root / "m", predict_key))
        assert code == grpc.StatusCode.PERMISSION_DENIED  # a prediction key is no admin key
        assert _code(lambda: _reload(target, root / "m"))[0] == grpc.StatusCode.PERMISSION_DENIED
        for escape in (outside / "m", root / "m" / ".." / ".." / "elsewhere" / "m", "/proc"):
            code, details = _code(lambda e=escape: _reload(target, e, admin))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "model roots" in details
            assert str(tmp_path) not in details and "/proc" not in details
        code, details = _code(lambda: _reload(target, root / "link" / "m", admin))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # a symlink out of the root
        assert _reload(target, root / "m", admin).status.error_code == 0
        assert grpc_predict(target, images(), predict_key).outputs["scores"].float_val


def test_a_model_reloaded_away_and_back_is_served_again(tmp_path, tiny_export):
    root = tmp_path / "models"
    export_tiny_model(str(root), name="a", version=1, seed=1)
    export_tiny_model(str(root), name="b", version=1, seed=2)
    with ServerProcess(
        f"--model_base_path={root / 'a'}",
        "--model_name=m",
        "--allow_reload_config",
        f"--model_root={root}",
        "--file_system_poll_wait_seconds=0.2",
        model="m",
    ) as server:
        target = server.grpc_target
        first = grpc_predict(target, images()).outputs["scores"].float_val[:]
        _reload(target, root / "b")
        assert wait_for(
            lambda: grpc_predict(target, images()).outputs["scores"].float_val[:] != first
        )
        _reload(target, root / "a")  # the original config again
        assert wait_for(
            lambda: grpc_predict(target, images()).outputs["scores"].float_val[:] == first
        )


def test_a_broken_version_does_not_echo_paths(tmp_path):
    root = tmp_path / "models"
    export_tiny_model(str(root), name="m", version=1)
    flags = [f"--model_base_path={root / 'm'}", "--model_name=m"]
    with ServerProcess(*flags, "--file_system_poll_wait_seconds=0.2") as server:
        broken = root / "m" / "2"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"garbage")

        def errors():
            status = requests.get(f"{server.rest}/v1/models/m").json()["model_version_status"]
            return [s["status"]["error_message"] for s in status if s["version"] == "2"]

        assert wait_for(lambda: any(errors()))
        assert str(tmp_path) not in errors()[0] and "DecodeError" in errors()[0]


@pytest.fixture(scope="module")
def keyed(tiny_export, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("k-1\n")
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}",
        "--model_name=m",
        f"--api_keys_file={keys}",
        "--max_request_bytes=2000000",
        "--max_auth_failures_per_minute=1000",
        api_key="k-1",
    ) as server:
        yield server


def test_the_key_is_checked_before_the_body_is_read(keyed):
    # 200 MiB announced, nothing sent: the answer comes at once, without the body.
    head = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n"
    start = time.monotonic()
    answer = _raw_http(keyed.rest_port, head)
    assert _status(answer) == 401 and time.monotonic() - start < 5
    # An invalid gzip body gets 401 (not a decompression error): never decompressed.
    r = requests.post(
        f"{keyed.rest}/v1/models/m:predict",
        data=b"not gzip at all",
        headers={"Content-Encoding": "gzip"},
    )
    assert r.status_code == 401
    # gRPC: garbage bytes as the request message get UNAUTHENTICATED, not a parse error.
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        code, _ = _code(lambda: predict(b"\xff" * 5000, timeout=30))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = _code(
            lambda: predict(b"\xff" * 5000, timeout=30, metadata=[("x-api-key", "k-1")])
        )
        assert code == grpc.StatusCode.INTERNAL  # a real client's garbage is parsed, and fails


def test_wrong_keys_are_rate_limited_per_address(tiny_export, tmp_path):
    (tmp_path / "keys").write_text("right\n")
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}",
        "--model_name=m",
        f"--api_keys_file={tmp_path / 'keys'}",
        "--max_auth_failures_per_minute=5",
        api_key="right",
    ) as server:
        url = f"{server.rest}/v1/models/m"
        codes = [
            requests.get(url, headers={"x-api-key": f"guess-{i}"}).status_code for i in range(8)
        ]
        assert codes[:5] == [401] * 5 and codes[5:] == [429] * 3
        # Once refused, the address is refused whatever key it sends, for the minute.
        assert requests.get(url, headers={"x-api-key": "right"}).status_code == 429
        code, _ = _code(lambda: grpc_predict(server.grpc_target, images(), [("x-api-key", "x")]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ----------------------------------------------------------------------------- work for nothing


@pytest.fixture(scope="module")
def server(tiny_export):
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}",
        "--model_name=m",
        "--max_request_bytes=4000000",
        "--max_image_pixels=1000000",
        "--rest_api_timeout_in_ms=3000",
    ) as s:
        yield s


def test_max_request_bytes_bounds_the_decompressed_body(server):
    bomb = gzip.compress(b" " * 60_000_000)  # ~60 KB that expand to 60 MB
    assert len(bomb) < 4_000_000
    r = requests.post(
        f"{server.rest}/v1/models/m:predict", data=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]


def _declared(dims, dtype=types_pb2.DT_UINT8, **fields):
    proto = tensor_pb2.TensorProto(
        dtype=dtype,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
        ),
        **fields,
    )
    req = predict_pb2.PredictRequest()
    req.model_spec.name = "m"
    req.inputs["images"].CopyFrom(proto)
    return req


def test_declared_sizes_are_checked_before_allocating(server):
    rss = server.rss_kb()
    with grpc.insecure_channel(server.grpc_target, options=OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for req in (
            _declared([1275510, 16, 16, 1]),
            _declared([1275510, 16, 16, 1], int_val=[7]),
            _declared([10**9], types_pb2.DT_STRING),
            _declared([2**62, 16, 16, 1]),
        ):
            start = time.monotonic()
            code, details = _code(lambda r=req: stub.Predict(r, 30))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, details
            assert time.monotonic() - start < 5
    assert server.rss_kb() - rss < 100_000  # KiB: nothing of gigabytes was allocated


def test_large_requests_are_split_or_refused_as_tf_serving_does(tiny_export):
    flags = [f"--model_base_path={tiny_export[0]}", "--model_name=m", "--max_batch_size=16"]
    x = images(40)
    with ServerProcess(*flags) as split:
        assert len(grpc_predict(split.grpc_target, x).outputs["classes"].int64_val) == 40
    with ServerProcess(*flags, "--noenable_large_batch_splitting") as refuse:
        code, details = _code(lambda: grpc_predict(refuse.grpc_target, x))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "Task size 40 is larger than maximum input batch size 16"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gif_header(width: int, height: int) -> bytes:
    """A one-pixel-of-data GIF that declares width x height pixels."""
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + image + b"\x02\x02\x44\x01\x00\x3b"


def test_image_size_check_reads_png_headers_itself_and_other_formats_with_pil():
    small_png = tf.io.encode_png(images(3)[0]).numpy()
    small_jpeg = tf.io.encode_jpeg(images(3)[1]).numpy()
    fine = np.array([small_png, small_jpeg, b"not an image"], dtype=object)
    check_image_sizes("image_bytes", fine, 28 * 28)  # the decoder answers for the last one
    for big, what in (
        (_png_header(20000, 20000), "a 20000x20000 image"),
        (_gif_header(3000, 2000), "a 3000x2000 image"),
        (_png_header(29, 28), "a 29x28 image"),
    ):
        batch = np.array([small_png, big], dtype=object)
        with pytest.raises(ServingError) as e:
            check_image_sizes("image_bytes", batch, 28 * 28)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"element 1 of input 'image_bytes' is {what}" in e.value.message


def test_oversized_encoded_images_are_not_decoded(server):
    rss = server.rss_kb()
    b64 = base64.b64encode(_png_header(20000, 20000)).decode()
    r = requests.post(
        f"{server.rest}/v1/models/m:predict",
        json={"signature_name": "serving_bytes", "instances": [{"b64": b64}] * 8},
    )
    assert r.status_code == 400 and "--max_image_pixels" in r.json()["error"]
    assert server.rss_kb() - rss < 100_000
    small = base64.b64encode(tf.io.encode_png(images(1)[0]).numpy()).decode()
    r = requests.post(
        f"{server.rest}/v1/models/m:predict",
        json={"signature_name": "serving_bytes", "instances": [{"b64": small}]},
    )
    assert r.status_code == 200


# ----------------------------------------------------------------------------- bad input: 400


BAD_BODIES = [
    ("nested 10,000 deep", b'{"instances": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"),
    ("pixel 300", b'{"instances": [[[[300]]]]}'),
    ("pixel 2**70", b'{"instances": [[[[' + str(2**70).encode() + b"]]]]}"),
    ("integer of 5000 digits", b'{"instances": [[[[' + b"9" * 5000 + b"]]]]}"),
    ("lone surrogate", b'{"signature_name": "serving_bytes", "instances": ["\\ud800"]}'),
    ("scalar input", b'{"inputs": 5}'),
    ("true as a pixel", json.dumps({"instances": [[[[True]] * 16] * 16]}).encode()),
    (
        "a pixel true among numbers",
        json.dumps({"instances": [[[[1]] * 15 + [[True]]] * 16]}).encode(),
    ),
]


@pytest.mark.parametrize("name,body", BAD_BODIES, ids=[n for n, _ in BAD_BODIES])
def test_bad_json_gets_400_not_500(server, name, body):
    r = requests.post(f"{server.rest}/v1/models/m:predict", data=body)
    assert r.status_code == 400, (name, r.status_code, r.text[:300])
    assert r.json()["error"]


def test_bad_grpc_shapes_get_invalid_argument(server):
    with grpc.insecure_channel(server.grpc_target, options=OPTIONS) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for req in (_declared([], int_val=[1]), _declared([2**62, 16, 16, 1])):
            assert _code(lambda r=req: stub.Predict(r, 30))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_content_length_of_a_terabyte_is_413(server):
    head = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
    assert _status(_raw_http(server.rest_port, head)) == 413


def test_a_string_output_in_the_row_format(tmp_path):
    """A model answering strings: the instances (row) format works like the columnar one."""

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x):
            return {"label": tf.strings.as_string(x[:, 0]), "value": x[:, 1]}

    model = Model()
    tf.saved_model.save(
        model, str(tmp_path / "s" / "1"), signatures={"serving_default": model.serve}
    )
    with ServerProcess(f"--model_base_path={tmp_path / 's'}", "--model_name=s", model="s") as s:
        rows = requests.post(f"{s.rest}/v1/models/s:predict", json={"instances": [[1, 2], [3, 4]]})
        assert rows.status_code == 200, rows.text
        assert [p["value"] for p in rows.json()["predictions"]] == [2.0, 4.0]
        columns = requests.post(f"{s.rest}/v1/models/s:predict", json={"inputs": [[1, 2]]})
        assert columns.status_code == 200


# ----------------------------------------------------------------------------- HTTP framing


def test_http_framing_is_handled(server):
    body = json.dumps({"instances": images(1).tolist()}).encode()
    half = len(body) // 2
    chunked = (
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{half:x}\r\n".encode()
        + body[:half]
        + b"\r\n"
        + f"{len(body) - half:x}\r\n".encode()
        + body[half:]
        + b"\r\n0\r\n\r\n"
    )
    assert _status(_raw_http(server.rest_port, chunked)) == 200
    twice = (
        b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 5\r\n\r\n{}"
    )
    assert _status(_raw_http(server.rest_port, twice)) == 400
    # A body that never comes does not hold the server past its request timeout.
    slow = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    start = time.monotonic()
    answer = _raw_http(server.rest_port, slow, timeout=20)
    assert _status(answer) == 408 and time.monotonic() - start < 15


def test_a_hundred_simultaneous_clients_and_hangups(server):
    x = images(1)

    def one(i):
        if i % 10 == 0:  # some hang up mid-request
            with socket.create_connection(("127.0.0.1", server.rest_port)) as s:
                s.sendall(b"POST /v1/models/m:predict HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            return 200
        return requests.post(
            f"{server.rest}/v1/models/m:predict", json={"instances": x.tolist()}, timeout=60
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        codes = list(pool.map(one, range(100)))
    assert codes == [200] * 100
    assert "Traceback" not in server.log()


# ----------------------------------------------------------------------------- fuzz


def _hostile(rng: random.Random) -> tuple[str, bytes, dict]:
    """A request of one of the classes above, with random parameters."""
    kind = rng.randrange(7)
    if kind == 0:
        depth = rng.randrange(100, 20_000)
        return "POST", b'{"instances": ' + b"[" * depth + b"]" * depth + b"}", {}
    if kind == 1:
        value = rng.choice([256, -1, 2**64, 2**70, 10**4500, 1.5])
        return "POST", b'{"instances": [[[[' + str(value).encode() + b"]]]]}", {}
    if kind == 2:
        return (
            "POST",
            gzip.compress(b"[" * rng.randrange(10**6, 6 * 10**6)),
            {"Content-Encoding": "gzip"},
        )
    if kind == 3:
        b64 = base64.b64encode(_png_header(rng.randrange(2000, 40000), 30000)).decode()
        body = {"signature_name": "serving_bytes", "instances": [{"b64": b64}]}
        return "POST", json.dumps(body).encode(), {}
    if kind == 4:
        return "POST", json.dumps({"inputs": rng.choice([5, True, None, "x", [], {}])}).encode(), {}
    if kind == 5:
        return "POST", b'{"signature_name": "serving_bytes", "instances": ["\\udc00\\ud800"]}', {}
    return "GET", bytes(rng.getrandbits(8) for _ in range(50)), {}


def test_fuzz_hostile_inputs_get_4xx_and_the_server_stays_correct(tiny_export):
    rng = random.Random(7)
    x = images(2, seed=3)
    expected = (
        tf.saved_model.load(tiny_export[1])
        .signatures["serving_default"](images=tf.constant(x))["classes"]
        .numpy()
    )
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}",
        "--model_name=m",
        "--max_request_bytes=4000000",
        "--max_image_pixels=1000000",
    ) as server:
        for _ in range(10):
            grpc_predict(server.grpc_target, x)
        rss = server.rss_kb()
        url = f"{server.rest}/v1/models/m:predict"
        deadline = time.monotonic() + 60
        for i in range(120):
            if time.monotonic() > deadline:
                break
            method, body, headers = _hostile(rng)
            r = requests.request(method, url, data=body, headers=headers, timeout=30)
            assert 400 <= r.status_code < 500, (i, r.status_code, r.text[:200])
        with grpc.insecure_channel(server.grpc_target, options=OPTIONS) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for _ in range(40):
                dims = [
                    rng.choice([0, 1, 16, 2**20, 2**40, 2**62]) for _ in range(rng.randrange(5))
                ]
                code, _ = _code(lambda d=dims: stub.Predict(_declared(d), 30))
                assert code in (grpc.StatusCode.INVALID_ARGUMENT,), (dims, code)
        got = grpc_predict(server.grpc_target, x).outputs["classes"].int64_val
        np.testing.assert_array_equal(got, expected)
        assert server.proc.poll() is None and "Traceback" not in server.log()
        assert server.rss_kb() - rss < 150_000  # KiB
