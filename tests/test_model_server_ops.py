"""Operations of the model server: hot reload, broken versions, auth, rate limits,
output defences, a full queue, draining on SIGTERM, and a fuzz run."""

import base64
import concurrent.futures
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from cli_util import REPO, error_lines, run_verb
from conftest import export_tiny_model
from server_util import OPTIONS, ServerProcess, grpc_predict, images, in_process_server, wait_for
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from copycat_tf.server.defenses import parse_defense


def _rest_predict(server, x, headers=None, path="m"):
    return requests.post(
        f"http://127.0.0.1:{server.rest_port}/v1/models/{path}:predict",
        json={"instances": x.tolist()},
        headers=headers or {},
        timeout=60,
    )


def test_hot_reload_and_broken_version(tmp_path):
    base = str(tmp_path / "models")
    export_tiny_model(base, version=1, seed=1)
    with in_process_server(os.path.join(base, "m"), poll_seconds=0.2) as server:
        target = f"127.0.0.1:{server.grpc_port}"
        assert grpc_predict(target, images()).model_spec.version.value == 1
        export_tiny_model(base, version=2, seed=2)
        assert wait_for(lambda: grpc_predict(target, images()).model_spec.version.value == 2)
        status = requests.get(f"http://127.0.0.1:{server.rest_port}/v1/models/m").json()
        states = {s["version"]: s["state"] for s in status["model_version_status"]}
        assert states == {"2": "AVAILABLE", "1": "END"}

        # A broken version 3 never takes down version 2.
        broken = tmp_path / "models" / "m" / "3"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"garbage")
        assert wait_for(
            lambda: any(
                s["version"] == "3" and s["state"] == "END" and s["status"]["error_message"]
                for s in requests.get(f"http://127.0.0.1:{server.rest_port}/v1/models/m").json()[
                    "model_version_status"
                ]
            )
        )
        assert grpc_predict(target, images()).model_spec.version.value == 2
        # Fixing version 3 in place (new directory contents) gets it loaded.
        shutil.rmtree(broken)
        export_tiny_model(base, version=3, seed=3)
        assert wait_for(lambda: grpc_predict(target, images()).model_spec.version.value == 3)


def test_version_policies_from_config_file(tmp_path):
    from copycat_tf.server.model_store import parse_model_config_file

    base = str(tmp_path / "models")
    for v in (1, 2, 3):
        export_tiny_model(base, version=v, seed=v)
    config = tmp_path / "models.config"
    config.write_text(
        "model_config_list {\n"
        "  config { name: 'all' base_path: 'models/m' model_version_policy { all {} } }\n"
        "  config { name: 'two' base_path: 'models/m' "
        "model_version_policy { specific { versions: 1 versions: 3 } }\n"
        "    version_labels { key: 'canary' value: 3 } }\n"
        "  config { name: 'latest2' base_path: 'models/m' "
        "model_version_policy { latest { num_versions: 2 } } }\n"
        "}\n"
    )
    models = parse_model_config_file(str(config))  # relative base paths: next to the file
    with in_process_server("", models=models, poll_seconds=0) as server:

        def versions(name):
            body = requests.get(f"http://127.0.0.1:{server.rest_port}/v1/models/{name}").json()
            return sorted(
                int(s["version"]) for s in body["model_version_status"] if s["state"] == "AVAILABLE"
            )

        assert versions("all") == [1, 2, 3]
        assert versions("two") == [1, 3]
        assert versions("latest2") == [2, 3]
        r = _rest_predict(server, images(1), path="two/labels/canary")
        assert r.status_code == 200


def test_bad_model_config_file(tmp_path):
    from copycat_tf.server.model_store import parse_model_config_file

    config = tmp_path / "models.config"
    config.write_text("model_config_list { config { name: 'x' base_pat: '/x' } }")
    with pytest.raises(ValueError, match="not a ModelServerConfig text proto"):
        parse_model_config_file(str(config))


def test_api_keys(tmp_path, tiny_export):
    keys = tmp_path / "keys.txt"
    keys.write_text("# keys\nsecret-1\n\nsecret-2\n")
    from copycat_tf.server.core import parse_api_keys_file

    with in_process_server(tiny_export[0], api_keys=parse_api_keys_file(str(keys))) as server:
        r = _rest_predict(server, images())
        assert r.status_code == 401 and "predictions" not in r.text
        assert "API key" in r.json()["error"]
        assert _rest_predict(server, images(), {"X-API-Key": "wrong"}).status_code == 401
        assert _rest_predict(server, images(), {"X-API-Key": "secret-1"}).status_code == 200
        assert (
            _rest_predict(server, images(), {"Authorization": "Bearer secret-2"}).status_code == 200
        )
        # Status and metadata are protected too: nothing about the model leaks.
        r = requests.get(f"http://127.0.0.1:{server.rest_port}/v1/models/m/metadata")
        assert r.status_code == 401 and "signature_def" not in r.text

        target = f"127.0.0.1:{server.grpc_port}"
        with pytest.raises(grpc.RpcError) as info:
            grpc_predict(target, images())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        resp = grpc_predict(target, images(), metadata=[("x-api-key", "secret-1")])
        assert resp.outputs["scores"].float_val


def test_rate_limit(tiny_export):
    with in_process_server(tiny_export[0], rate_limit_qps=2.0) as server:
        codes = [_rest_predict(server, images(1)).status_code for _ in range(8)]
        assert codes[:2] == [200, 200] and 429 in codes
        body = _rest_predict(server, images(1)).json()
        assert "Rate limit" in body.get("error", "Rate limit")
        time.sleep(1.1)  # the bucket refills
        assert _rest_predict(server, images(1)).status_code == 200
        target = f"127.0.0.1:{server.grpc_port}"
        errors = []
        for _ in range(6):
            try:
                grpc_predict(target, images(1))
            except grpc.RpcError as e:
                errors.append(e.code())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in errors


def test_top1_defense_returns_no_scores(tiny_export):
    with in_process_server(tiny_export[0], defense=parse_defense("top1")) as server:
        r = _rest_predict(server, images(3))
        assert r.status_code == 200
        # One output left: TF Serving's row format lists its values without a name.
        predictions = r.json()["predictions"]
        assert len(predictions) == 3 and all(isinstance(p, int) for p in predictions)
        assert "scores" not in r.text
        resp = grpc_predict(f"127.0.0.1:{server.grpc_port}", images(3))
        assert set(resp.outputs) == {"classes"}
        meta = requests.get(f"http://127.0.0.1:{server.rest_port}/v1/models/m/metadata").json()
        sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
        assert set(sig["outputs"]) == {"classes"}


@pytest.mark.parametrize("spec", ["topk:1", "round:1", "reverse_sigmoid:0.7,0.5", "gaussian:0.05"])
def test_score_defenses_over_the_wire(tiny_export, spec):
    loaded = tf.saved_model.load(tiny_export[1])
    x = images(4, seed=5)
    clean = loaded.signatures["serving_default"](images=tf.constant(x))["scores"].numpy()
    with in_process_server(tiny_export[0], defense=parse_defense(spec)) as server:
        predictions = _rest_predict(server, x).json()["predictions"]
    scores = np.array([p["scores"] for p in predictions])
    classes = np.array([p["classes"] for p in predictions])
    np.testing.assert_array_equal(classes, scores.argmax(axis=1))
    assert not np.allclose(scores, clean, atol=1e-9)
    if spec == "topk:1":
        assert ((scores > 0).sum(axis=1) == 1).all()
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
    elif spec == "round:1":
        np.testing.assert_allclose(scores, np.round(clean, 1), atol=1e-7)
    else:
        np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
        assert (scores >= 0).all()


@pytest.mark.parametrize("spec", ["topk:0", "round:x", "reverse_sigmoid:1", "blur", "top1:3"])
def test_bad_defense_spec(spec):
    with pytest.raises(ValueError, match="--output_defense"):
        parse_defense(spec)


def test_full_queue_answers_503_and_unavailable(tiny_export):
    with in_process_server(
        tiny_export[0], max_enqueued=1, num_batch_threads=1, max_batch_size=1
    ) as server:
        big = images(3000, seed=6)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda _: _rest_predict(server, big).status_code, range(12)))
        assert 503 in codes and 200 in codes
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            grpc_codes = list(
                pool.map(lambda _: _grpc_code(f"127.0.0.1:{server.grpc_port}", big), range(12))
            )
        assert grpc.StatusCode.UNAVAILABLE in grpc_codes
        assert _rest_predict(server, images(1)).status_code == 200


def _grpc_code(target, x):
    try:
        grpc_predict(target, x)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_sigterm_drains_in_flight_requests(tiny_export):
    server = ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m")
    with server:
        body = json.dumps({"instances": images(20000, seed=7).tolist()})  # ~10 MB
        results = {}

        def call():
            results["r"] = requests.post(f"{server.rest}/v1/models/m:predict", data=body)

        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)  # the server is now reading, decoding or running it
        code, stderr = server.stop()
        t.join(60)
    assert results["r"].status_code == 200
    assert len(results["r"].json()["predictions"]) == 20000
    assert code == 0
    assert "access rest POST model=m version=1 batch=20000 status=200" in stderr
    assert "model server stopped" in stderr


def _fuzz_rest(server, rng: random.Random) -> int:
    paths = [
        "/v1/models/m:predict",
        "/v1/models/m",
        "/v1/models/m/metadata",
        "/v1/models/%00:predict",
        "/v1/models/m/versions/1:predict",
        "/v1/x",
        "/v1/models/m/labels/%ZZ:predict",
        "/" + "a" * 3000,
    ]
    bodies = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'{"instances": null}',
        b'{"instances": [null]}',
        b'{"instances": [[[[300]]]]}',
        b'{"inputs": {"images": "x"}}',
        b"\xff\xfe\x00",
        b'{"instances": [' + b"[" * 500 + b"]" * 500 + b"]}",
        b'{"signature_name": "serving_bytes", "instances": [{"b64": "AAAA"}]}',
        b'{"instances": [{"b64": "AAAA", "x": 1}]}',
        b'{"instances": NaN}',
        bytes(rng.getrandbits(8) for _ in range(200)),
    ]
    method = rng.choice(["POST", "GET", "PUT", "DELETE"])
    body = rng.choice(bodies)
    if rng.random() < 0.3:
        body = body[: rng.randrange(len(body) + 1)]
    r = requests.request(method, server.rest + rng.choice(paths), data=body, timeout=30)
    assert r.status_code in (200, 400, 404, 413, 500, 501) or r.status_code >= 400
    return r.status_code


def _fuzz_grpc(stub, rng: random.Random) -> None:
    req = predict_pb2.PredictRequest()
    req.model_spec.name = rng.choice(["m", "", "nope"])
    proto = req.inputs[rng.choice(["images", "image_bytes", "zzz"])]
    proto.dtype = rng.choice([0, 1, 3, 4, 7, 9, 19, 99])
    for _ in range(rng.randrange(6)):
        proto.tensor_shape.dim.add().size = rng.choice([-1, 0, 1, 16, 3, 2**40])
    if rng.random() < 0.5:
        proto.tensor_content = bytes(rng.getrandbits(8) for _ in range(rng.randrange(600)))
    else:
        proto.string_val.append(b"\x89PNG garbage")
    with pytest.raises(grpc.RpcError):
        stub.Predict(req, 30)


def _garbage_on_grpc_port(port: int, rng: random.Random) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 2000))))
        s.settimeout(2)
        with contextlib.suppress(TimeoutError, ConnectionError):
            s.recv(1024)


def test_fuzz_both_apis_then_still_correct(tiny_export):
    rng = random.Random(1234)
    loaded = tf.saved_model.load(tiny_export[1])
    x = images(2, seed=8)
    expected = loaded.signatures["serving_default"](images=tf.constant(x))
    with ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m") as server:
        for _ in range(20):  # warm up so RSS measures growth, not first-use allocation
            _rest_predict(server, x)
        rss_before = server.rss_kb()
        with grpc.insecure_channel(server.grpc_target, options=OPTIONS) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for i in range(400):
                kind = i % 4
                if kind in (0, 1):
                    _fuzz_rest(server, rng)
                elif kind == 2:
                    _fuzz_grpc(stub, rng)
                else:
                    _garbage_on_grpc_port(server.grpc_port, rng)
        rss_after = server.rss_kb()
        # Good requests still get correct answers over both APIs.
        r = _rest_predict(server, x)
        np.testing.assert_array_equal(
            np.array([p["scores"] for p in r.json()["predictions"]], np.float32),
            expected["scores"].numpy(),
        )
        resp = grpc_predict(server.grpc_target, x)
        np.testing.assert_array_equal(
            tf.make_ndarray(resp.outputs["classes"]), expected["classes"].numpy()
        )
        b64 = base64.b64encode(tf.io.encode_png(x[0]).numpy()).decode()
        r = requests.post(
            f"{server.rest}/v1/models/m:predict",
            json={"signature_name": "serving_bytes", "instances": [{"b64": b64}]},
        )
        assert r.status_code == 200
        assert server.proc.poll() is None
    assert rss_after - rss_before < 150_000, (rss_before, rss_after)  # KiB


@pytest.mark.parametrize(
    "flags,fragment",
    [
        ([], "nothing to serve"),
        (["--model_base_path=/tmp/x", "--output_defense=blur"], "--output_defense='blur'"),
        (["--model_config_file=/nonexistent/models.config"], "cannot be read"),
        (["--model_base_path=/tmp/x", "--api_keys_file=/nonexistent"], "--api_keys_file"),
        (["--model_base_path=/tmp/x", "--port=9000", "--rest_api_port=9000"], "must differ"),
        (
            ["--model_base_path=/tmp/x", f"--monitoring_config_file={REPO}/README.md"],
            "not a MonitoringConfig text proto",
        ),
    ],
)
def test_model_server_bad_flags(flags, fragment):
    from cli_util import error_lines, run_verb

    proc = run_verb("model_server", *flags, timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_model_server_port_in_use(tiny_export):
    from cli_util import error_lines, run_verb

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_verb(
            "model_server",
            f"--model_base_path={tiny_export[0]}",
            "--host=127.0.0.1",
            f"--port={port}",
            timeout=120,
        )
    assert proc.returncode != 0
    assert f"cannot bind gRPC port 127.0.0.1:{port}" in error_lines(proc)[-1]


def test_server_process_takes_new_ports_when_its_ports_were_taken(tiny_export):
    """Between choosing a free port and the server binding it, another process (a parallel
    test worker) may take it: the runner starts again on new ports."""
    server = ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m")
    taken = server.grpc_port
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        with server:
            assert server.grpc_port != taken and f"--port={server.grpc_port}" in server.args
            assert grpc_predict(server.grpc_target, images(1)).outputs["classes"].int64_val


def test_batching_parameters_file_with_a_misspelt_field(tmp_path, tiny_export):
    good = tmp_path / "good.txt"
    good.write_text("max_batch_size { value: 8 }\nnum_batch_threads { value: 1 }\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("max_batch_size { value: 8 }\nmax_enqueued_batchs { value: 4 }\n")
    flags = [f"--model_base_path={tiny_export[0]}", "--model_name=m"]
    with ServerProcess(*flags, f"--batching_parameters_file={good}") as server:
        assert _rest_predict(server, images(3)).status_code == 200
    proc = run_verb(
        "model_server",
        f"--model_base_path={tiny_export[0]}",
        f"--batching_parameters_file={bad}",
        timeout=120,
    )
    assert proc.returncode == 2
    lines = error_lines(proc)
    assert len(lines) == 1 and "max_enqueued_batchs" in lines[0] and str(bad) in lines[0], lines


def test_servers_start_from_a_process_with_live_grpc_channels(tmp_path):
    """grpcio >= 1.81 aborts a forked child before exec when Popen closes its descriptors
    while channels are live (grpc/grpc#43055): one server start in ~8 died with SIGABRT.
    spawn() must start children reliably from such a process (the demo, study, tests)."""
    code = (
        "import sys\n"
        "from concurrent import futures\n"
        "import grpc\n"
        "from copycat_tf.server.process import spawn\n"
        "server = grpc.server(futures.ThreadPoolExecutor(2))\n"
        "port = server.add_insecure_port('127.0.0.1:0')\n"
        "server.start()\n"
        "channel = grpc.insecure_channel(f'127.0.0.1:{port}')\n"
        "grpc.channel_ready_future(channel).result(timeout=30)\n"
        "codes = []\n"
        "with open(sys.argv[1], 'w') as log:\n"
        "    for _ in range(150):\n"
        "        codes.append(spawn(['true'], {}, log).wait())\n"
        "print(sum(c != 0 for c in codes))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "log")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "0", (tmp_path / "log").read_text()[-2000:]


def test_spawned_children_die_with_their_parent(tmp_path):
    """A killed demo or test (SIGKILL: no cleanup runs) leaves no orphan server behind."""
    log = tmp_path / "child.log"
    child = (
        "import sys, time\n"
        "from copycat_tf.server.process import die_with_parent\n"
        "die_with_parent()\n"
        "print('ready', flush=True, file=sys.stderr)\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import os, sys, time\n"
        "from copycat_tf.server.process import spawn\n"
        f"with open({str(log)!r}, 'w') as log:\n"
        f"    proc = spawn([sys.executable, '-c', {child!r}], dict(os.environ), log)\n"
        "print(proc.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(
        [sys.executable, "-c", parent], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        child_pid = int(proc.stdout.readline())
        assert wait_for(lambda: "ready" in log.read_text(), timeout=60), log.read_text()
        assert _running(child_pid)
    finally:
        proc.kill()
        proc.wait()
    assert wait_for(lambda: not _running(child_pid), timeout=30)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (its new parent may reap it late)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_prometheus_metrics_as_tf_serving_exports_them(tmp_path, tiny_export):
    """--monitoring_config_file: the REST port serves request counts and latencies per
    model, API and status, model-call batch sizes, the queue depth and the rows answered
    through a defence, in the text format prometheus_client's own parser reads; the path
    needs the API key like the model routes."""
    from prometheus_client.parser import text_string_to_metric_families

    config = tmp_path / "monitoring.txt"
    config.write_text('prometheus_config { enable: true, path: "/metrics/here" }\n')
    keys = tmp_path / "keys"
    keys.write_text("k-1\n")
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}",
        "--model_name=m",
        f"--monitoring_config_file={config}",
        f"--api_keys_file={keys}",
        "--output_defense=top1",
        api_key="k-1",
    ) as server:
        key = {"x-api-key": "k-1"}
        assert _rest_predict(server, images(3), headers=key).status_code == 200
        assert _rest_predict(server, images(1), headers=key, path="nope").status_code == 404
        grpc_predict(server.grpc_target, images(2), metadata=[("x-api-key", "k-1")])
        url = f"http://127.0.0.1:{server.rest_port}/metrics/here"
        assert requests.get(url, timeout=30).status_code == 401  # no key, no metrics
        answer = requests.get(url, headers=key, timeout=30)
        default = f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics"
        assert requests.get(default, headers=key, timeout=30).status_code == 404  # moved
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(name, **labels):
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    count = ":tensorflow:serving:request_count_total"
    rest = {"model_name": "m", "entrypoint": "REST", "method": "POST"}
    assert value(count, status="200", **rest) == 1
    # An unknown model name is not a label value a client can add (unbounded series).
    assert value(count, **{**rest, "model_name": "-"}, status="404") == 1
    assert not [k for k in samples if ("model_name", "nope") in k[1]]
    assert value(count, model_name="m", entrypoint="GRPC", method="Predict", status="OK") == 1
    latency = ":tensorflow:serving:request_latency_seconds_count"
    assert value(latency, status="200", **rest) == 1
    batches = ":tensorflow:serving:batching_session:batch_size"
    assert value(f"{batches}_count", model_name="m") == 2  # one model call per request
    assert value(f"{batches}_sum", model_name="m") == 5  # 3 + 2 rows
    assert (":tensorflow:serving:batching_session:queue_depth", ()) in samples
    assert value(":copycat:serving:defended_rows_total", model_name="m", defense="top1") == 5


def test_monitoring_config_file_errors(tmp_path):
    from copycat_tf.errors import UserInputError
    from copycat_tf.server import app

    config = tmp_path / "monitoring.txt"
    config.write_text("prometheus_config { enable: true }")
    assert app._monitoring(str(config), 8501).path == "/monitoring/prometheus/metrics"
    with pytest.raises(UserInputError, match="pass --rest_api_port too"):
        app._monitoring(str(config), 0)
    config.write_text('prometheus_config { enable: true, path: "metrics" }')
    with pytest.raises(UserInputError, match="must be a URL path from /"):
        app._monitoring(str(config), 8501)
    config.write_text("prometheus_config { enabled: true }")  # misspelt field
    with pytest.raises(UserInputError, match="not a MonitoringConfig text proto"):
        app._monitoring(str(config), 8501)
    with pytest.raises(UserInputError, match="cannot be read"):
        app._monitoring(str(tmp_path / "missing.txt"), 8501)
    assert not app._monitoring("", 0).enabled
