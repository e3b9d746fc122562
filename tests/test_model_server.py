"""Conformance of the embedded model server with TF Serving's REST and gRPC APIs.

One server subprocess on free localhost ports in front of a tiny exported model; gRPC is
exercised through the official tensorflow_serving.apis stubs, REST through requests. The
expected codes and messages come from ../shared/reference/tfserving-api.md.
"""

import base64
import gzip
import json

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from server_util import OPTIONS, ServerProcess
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from copycat_tf.server.tensors import format_float, format_floats


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    base, _ = tiny_export
    config = tmp_path_factory.mktemp("cfg") / "models.config"
    config.write_text(
        "model_config_list {\n"
        f"  config {{ name: 'm' base_path: '{base}' model_platform: 'tensorflow'\n"
        "    version_labels { key: 'stable' value: 1 } }\n"
        f"  config {{ name: 'other' base_path: '{base}' }}\n"
        "}\n"
    )
    with ServerProcess(f"--model_config_file={config}", "--max_request_bytes=8000000") as s:
        yield s


@pytest.fixture(scope="module")
def reference(tiny_export):
    """The exported model called in-process: what every answer must reproduce."""
    loaded = tf.saved_model.load(tiny_export[1])

    def predict(images):
        out = loaded.signatures["serving_default"](images=tf.constant(images))
        return out["scores"].numpy(), out["classes"].numpy()

    return predict


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_target, options=OPTIONS)
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def images(n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def png_b64(image):
    return base64.b64encode(tf.io.encode_png(image).numpy()).decode()


# ----------------------------------------------------------------------------- REST


def test_rest_status(server):
    r = requests.get(f"{server.rest}/v1/models/m")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json() == {
        "model_version_status": [
            {
                "version": "1",
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }
    assert (
        len(requests.get(f"{server.rest}/v1/models/m/versions/1").json()["model_version_status"])
        == 1
    )
    # A label is ignored by the status call (all versions returned).
    assert requests.get(f"{server.rest}/v1/models/m/labels/stable").status_code == 200


@pytest.mark.parametrize(
    "path,status,message",
    [
        ("/v1/models/nope", 404, "Could not find any versions of model nope"),
        ("/v1/models/m/versions/9", 404, "Could not find version 9 of model m"),
        ("/v1/models", 400, "Missing model name in request."),
        (
            "/v1/models/m/versions/99999999999999999999",
            400,
            "Failed to convert version: 99999999999999999999 to numeric.",
        ),
        ("/v1/models/nope/metadata", 404, "Servable not found for request: Latest(nope)"),
        ("/v1/models/m/versions/7/metadata", 404, "Servable not found for request: Specific(m, 7)"),
        ("/v1/models/m/labels/canary/metadata", 400, "Unrecognized servable version label: canary"),
        ("/v1/models/m:predict", 400, "Malformed request: GET /v1/models/m:predict"),
    ],
)
def test_rest_get_errors(server, path, status, message):
    r = requests.get(server.rest + path)
    assert r.status_code == status
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"error": message}


def test_rest_paths_outside_v1_get_html_404(server):
    r = requests.get(f"{server.rest}/healthz")
    assert r.status_code == 404 and r.text.startswith("<HTML><HEAD>")


def test_rest_metadata(server):
    body = requests.get(f"{server.rest}/v1/models/m/metadata").json()
    assert body["model_spec"] == {"name": "m", "signature_name": "", "version": "1"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "serving_bytes", "__saved_model_init_op"} <= set(sigs)
    images_in = sigs["serving_default"]["inputs"]["images"]
    assert images_in["dtype"] == "DT_UINT8"
    assert [d["size"] for d in images_in["tensor_shape"]["dim"]] == ["-1", "16", "16", "1"]
    assert sigs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert set(sigs["serving_default"]["outputs"]) == {"scores", "classes"}
    assert sigs["serving_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"


def test_rest_predict_row_format(server, reference):
    x = images(3)
    r = requests.post(f"{server.rest}/v1/models/m:predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    scores, classes = reference(x)
    predictions = r.json()["predictions"]
    assert [p["classes"] for p in predictions] == classes.tolist()
    # %g / %.9g formatting round-trips float32 exactly.
    np.testing.assert_array_equal(np.array([p["scores"] for p in predictions], np.float32), scores)


def test_rest_predict_columnar_versions_and_labels(server, reference):
    x = images(2, seed=1)
    scores, classes = reference(x)
    for path in ("m", "m/versions/1", "m/labels/stable", "other"):
        r = requests.post(f"{server.rest}/v1/models/{path}:predict", json={"inputs": x.tolist()})
        assert r.status_code == 200, (path, r.text)
        out = r.json()["outputs"]
        assert out["classes"] == classes.tolist()
        np.testing.assert_array_equal(np.array(out["scores"], np.float32), scores)


def test_rest_predict_b64_serving_bytes(server, reference):
    x = images(2, seed=2)
    body = {
        "signature_name": "serving_bytes",
        "instances": [{"b64": png_b64(im)} for im in x],
    }
    r = requests.post(f"{server.rest}/v1/models/m:predict", json=body)
    assert r.status_code == 200, r.text
    scores, _ = reference(x)
    got = np.array([p["scores"] for p in r.json()["predictions"]], np.float32)
    np.testing.assert_allclose(got, scores, rtol=1e-5, atol=1e-6)
    # Named-input objects in row format work too.
    body["instances"] = [{"image_bytes": {"b64": png_b64(im)}} for im in x]
    assert requests.post(f"{server.rest}/v1/models/m:predict", json=body).status_code == 200


def test_rest_gzip_body(server):
    raw = json.dumps({"instances": images(1).tolist()}).encode()
    r = requests.post(
        f"{server.rest}/v1/models/m:predict",
        data=gzip.compress(raw),
        headers={"Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text


def _post(server, path, data):
    if isinstance(data, (dict, list)):
        data = json.dumps(data)
    return requests.post(f"{server.rest}{path}", data=data)


GOOD_IMAGE = images(1).tolist()


@pytest.mark.parametrize(
    "path,body,status,fragment",
    [
        ("/v1/models/m:predict", "", 400, "JSON Parse error: The document is empty"),
        ("/v1/models/m:predict", "{not json", 400, "JSON Parse error: "),
        ("/v1/models/nope:predict", "{bad", 400, "JSON Parse error: "),  # parsed first
        ("/v1/models/m:predict", "[1, 2]", 400, "Is not object"),
        (
            "/v1/models/nope:predict",
            {"instances": GOOD_IMAGE},
            404,
            "Servable not found for request: Latest(nope)",
        ),
        (
            "/v1/models/m/versions/4:predict",
            {"instances": GOOD_IMAGE},
            404,
            "Servable not found for request: Specific(m, 4)",
        ),
        (
            "/v1/models/m/labels/x:predict",
            {"instances": GOOD_IMAGE},
            400,
            "Unrecognized servable version label: x",
        ),
        (
            "/v1/models/m:predict",
            {"signature_name": "nope", "instances": GOOD_IMAGE},
            400,
            'Serving signature name: "nope" not found in signature def',
        ),
        (
            "/v1/models/m:predict",
            {"signature_name": 3, "instances": GOOD_IMAGE},
            400,
            "'signature_name' key must be a string value.",
        ),
        (
            "/v1/models/m:predict",
            {"instances": GOOD_IMAGE, "inputs": GOOD_IMAGE},
            400,
            "expecting only one of 'inputs' or 'instances' keys to exist",
        ),
        ("/v1/models/m:predict", {"foo": 1}, 400, "Missing 'inputs' or 'instances' key"),
        ("/v1/models/m:predict", {"instances": []}, 400, "No values in 'instances' array"),
        (
            "/v1/models/m:predict",
            {"instances": [["x"]]},
            400,
            'JSON Value: "x" Type: String is not of expected type: uint8',
        ),
        ("/v1/models/m:predict", {"instances": [[[[1.5]]]]}, 400, "is not of expected type: uint8"),
        ("/v1/models/m:predict", {"instances": [[1, 2], [3]]}, 400, "Expecting"),
        (
            "/v1/models/m:predict",
            {"inputs": [[1, 2], [3]]},
            400,
            "Encountered list at unexpected size",
        ),
        ("/v1/models/m:predict", {"instances": [[[[1]]]]}, 400, "signature expects"),
        (
            "/v1/models/m:predict",
            {"signature_name": "serving_bytes", "instances": [{"b64": "!!notbase64"}]},
            400,
            "Unable to base64 decode",
        ),
        (
            "/v1/models/m:predict",
            {
                "signature_name": "serving_bytes",
                "instances": [{"b64": base64.b64encode(b"no").decode()}],
            },
            400,
            "",
        ),
        ("/v1/models/m/metadata", {}, 400, "Malformed request: POST /v1/models/m/metadata"),
        ("/v1/models/m/version/1:predict", {}, 400, "Malformed request"),
        ("/v1/models/m:PREDICT", {}, 400, "Malformed request"),
        (
            "/v1/models/m:classify",
            {"examples": [{"x": 1.0}]},
            400,
            "Expected classification signature method_name to be tensorflow/serving/classify. "
            "Was: tensorflow/serving/predict",
        ),
        (
            "/v1/models/m:regress",
            {"foo": 1},
            400,
            "When method is regress, key 'examples' is expected and was not found",
        ),
    ],
)
def test_rest_error_table(server, path, body, status, fragment):
    r = _post(server, path, body)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    assert fragment in r.json()["error"]


def test_rest_oversize_payload(server):
    r = requests.post(f"{server.rest}/v1/models/m:predict", data=b"x" * 8_000_001)
    assert r.status_code == 413 and "max_request_bytes" in r.json()["error"]


def test_float_formatting_matches_tf_serving():
    values = [9000000, 999999, 0.5, 0.0003, 0.00003, 555557.5]
    assert [format_float(float(np.float32(v))) for v in values] == [
        "9e+06",
        "999999.0",
        "0.5",
        "0.0003",
        "3e-05",
        "555557.5",
    ]
    assert [format_float(v) for v in (float("nan"), float("inf"), -float("inf"))] == [
        "NaN",
        "Infinity",
        "-Infinity",
    ]


def test_vectorised_float_formatting_is_format_float_value_by_value():
    rng = np.random.default_rng(7)
    magnitudes = 10.0 ** rng.integers(-40, 39, 3000)
    singles = (rng.standard_normal(3000) * magnitudes).astype(np.float32)
    singles[:6] = [0.0, -0.0, 1.0, 9e6, 555557.5, np.float32(1 / 3)]
    scores = rng.dirichlet(np.ones(10), 50).astype(np.float32)  # softmax-like outputs
    doubles = rng.standard_normal(2000) * 10.0 ** rng.integers(-300, 300, 2000)
    special = np.array([0.25, np.nan, np.inf, -np.inf, 3e-05], np.float32)
    for array in (singles, scores, doubles, special, np.zeros((0,), np.float32)):
        double = array.dtype == np.float64
        assert format_floats(array) == [format_float(v, double) for v in array.ravel().tolist()]


# ----------------------------------------------------------------------------- gRPC


def _request(x, name="m", **spec):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    for k, v in spec.items():
        if k == "version":
            req.model_spec.version.value = v
        else:
            setattr(req.model_spec, k, v)
    if x is not None:
        req.inputs["images"].CopyFrom(tf.make_tensor_proto(x))
    return req


def test_grpc_predict_tensor_content(stub, reference):
    x = images(4, seed=3)
    req = _request(x)
    assert req.inputs["images"].tensor_content  # make_tensor_proto packs bytes
    resp = stub.Predict(req, 30)
    scores, classes = reference(x)
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["scores"]), scores)
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["classes"]), classes)
    # TF Serving answers with typed fields, and echoes the effective model spec.
    assert len(resp.outputs["scores"].float_val) == 12
    assert not resp.outputs["scores"].tensor_content
    assert resp.model_spec.name == "m" and resp.model_spec.version.value == 1
    assert resp.model_spec.signature_name == "serving_default"


def test_grpc_predict_typed_values_with_last_value_repeated(stub, reference):
    req = _request(None, version=1)
    proto = req.inputs["images"]
    proto.dtype = tf.uint8.as_datatype_enum
    for d in (2, 16, 16, 1):
        proto.tensor_shape.dim.add().size = d
    proto.int_val.extend([7, 9])  # the rest of the 512 values repeat the last one
    resp = stub.Predict(req, 30)
    expected = np.full((2, 16, 16, 1), 9, np.uint8)
    expected.flat[0] = 7
    np.testing.assert_array_equal(tf.make_ndarray(resp.outputs["scores"]), reference(expected)[0])


def test_grpc_version_label_and_output_filter(stub):
    req = _request(images(1), version_label="stable")
    req.output_filter.append("classes")
    resp = stub.Predict(req, 30)
    assert set(resp.outputs) == {"classes"} and resp.model_spec.version.value == 1


def test_grpc_serving_bytes(stub, reference):
    x = images(2, seed=4)
    req = _request(None, signature_name="serving_bytes")
    pngs = [tf.io.encode_png(im).numpy() for im in x]
    req.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(pngs))
    resp = stub.Predict(req, 30)
    np.testing.assert_allclose(
        tf.make_ndarray(resp.outputs["scores"]), reference(x)[0], rtol=1e-5, atol=1e-6
    )


def test_grpc_message_over_4_mib(stub):
    x = np.zeros((17000, 16, 16, 1), np.uint8)  # 4.35 MB of tensor_content
    resp = stub.Predict(_request(x), 120)
    assert tf.make_ndarray(resp.outputs["classes"]).shape == (17000,)


def _grpc_error(call, request):
    with pytest.raises(grpc.RpcError) as info:
        call(request, 30)
    return info.value.code(), info.value.details()


def test_grpc_predict_errors(stub):
    cases = []
    req = predict_pb2.PredictRequest()
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"))
    req = _request(images(1), name="")
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."))
    cases.append(
        (
            _request(images(1), name="nope"),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(nope)",
        )
    )
    cases.append(
        (
            _request(images(1), version=5),
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Specific(m, 5)",
        )
    )
    cases.append(
        (
            _request(images(1), version_label="x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Unrecognized servable version label: x",
        )
    )
    cases.append(
        (
            _request(images(1), signature_name="x"),
            grpc.StatusCode.FAILED_PRECONDITION,
            'Serving signature key "x" not found.',
        )
    )
    req = _request(images(1))
    req.inputs["extra"].CopyFrom(tf.make_tensor_proto([1.0]))
    cases.append(
        (req, grpc.StatusCode.INVALID_ARGUMENT, "input size does not match signature: 2!=1")
    )
    req = _request(None)
    req.inputs["pixels"].CopyFrom(tf.make_tensor_proto(images(1)))
    cases.append(
        (
            req,
            grpc.StatusCode.INVALID_ARGUMENT,
            "Signature input alias: images(feed name: serving_default_images:0) not "
            "found in request",
        )
    )
    cases.append(
        (
            _request(images(1).astype(np.float32)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Expects arg[0] to be uint8 but float32 is provided",
        )
    )
    req = _request(images(2))
    req.inputs["images"].tensor_content = b"\x00" * 10
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "tensor parsing error: images"))
    req = _request(images(1))
    req.output_filter.append("logits")
    cases.append(
        (
            req,
            grpc.StatusCode.INVALID_ARGUMENT,
            "output tensor alias not found in signature: logits",
        )
    )
    req = _request(images(1))
    req.output_filter.extend(["classes", "classes"])
    cases.append((req, grpc.StatusCode.INVALID_ARGUMENT, "duplicate output tensor alias: classes"))
    cases.append(
        (
            _request(np.zeros((1, 8, 8, 1), np.uint8)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "signature expects [?,16,16,1]",
        )
    )
    for request, code, fragment in cases:
        got_code, details = _grpc_error(stub.Predict, request)
        assert got_code == code, (fragment, got_code, details)
        assert fragment in details, (fragment, details)


def test_grpc_metadata(stub):
    req = get_model_metadata_pb2.GetModelMetadataRequest()
    req.model_spec.name = "m"
    req.metadata_field.append("signature_def")
    resp = stub.GetModelMetadata(req, 30)
    assert resp.model_spec.name == "m" and resp.model_spec.version.value == 1
    assert resp.metadata["signature_def"].type_url.endswith("tensorflow.serving.SignatureDefMap")
    sigs = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sigs)
    assert sigs.signature_def["serving_default"].inputs["images"].dtype == tf.uint8.as_datatype_enum

    empty = get_model_metadata_pb2.GetModelMetadataRequest()
    empty.model_spec.name = "m"
    assert _grpc_error(stub.GetModelMetadata, empty) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "GetModelMetadataRequest must specify at least one metadata_field",
    )
    req.metadata_field[:] = ["foo"]
    assert _grpc_error(stub.GetModelMetadata, req)[1] == "Metadata field foo is not supported"


def test_grpc_status(server):
    channel = grpc.insecure_channel(server.grpc_target)
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = "m"
    status = models.GetModelStatus(req, 30).model_version_status
    assert [(s.version, s.state) for s in status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]
    req.model_spec.name = "nope"
    assert _grpc_error(models.GetModelStatus, req) == (
        grpc.StatusCode.NOT_FOUND,
        "Could not find any versions of model nope",
    )
    req.model_spec.name = "m"
    req.model_spec.version.value = 3
    assert _grpc_error(models.GetModelStatus, req)[1] == "Could not find version 3 of model m"


def test_grpc_classify_on_a_predict_signature(stub):
    req = classification_pb2.ClassificationRequest()
    req.model_spec.name = "m"
    req.input.example_list.examples.add()
    code, details = _grpc_error(stub.Classify, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("Expected classification signature method_name")


def test_grpc_oversize_payload(stub):
    x = np.zeros((33000, 16, 16, 1), np.uint8)  # 8.4 MB > --max_request_bytes=8000000
    code, details = _grpc_error(stub.Predict, _request(x))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
