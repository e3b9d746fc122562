"""No answered query lost or paid twice: kills, flaky and slow servers, torn journals."""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import tensorflow as tf
from cli_util import REPO
from server_util import ServerProcess
from test_steal import layout, steal

from copycat_tf.attack import journal
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.images import decode_png
from copycat_tf.errors import UserInputError


def _answered_images(server_log: str) -> int:
    """Images the server answered successfully, from its access log."""
    total = 0
    pattern = r"access grpc Predict model=m version=\d+ batch=(\d+) status=OK"
    for m in re.finditer(pattern, server_log):
        total += int(m.group(1))
    return total


def test_kill_and_resume_equals_uninterrupted_run(tiny_export, tmp_path):
    budget, batch, in_flight = 1200, 8, 2
    flags = lambda out, target: [  # noqa: E731
        sys.executable,
        "-m",
        "copycat_tf.steal",
        f"--target={target}",
        "--npd=synthetic:dead_leaves",
        f"--output_dir={out}",
        f"--query_budget={budget}",
        f"--query_batch_size={batch}",
        f"--max_in_flight={in_flight}",
        "--records_per_shard=100",
        "--seed=3",
        "--noprogress",
    ]
    env = {**os.environ, "PYTHONPATH": REPO}
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}", "--model_name=m", "--inject_latency_ms=100"
    ) as server:
        target = f"grpc://{server.grpc_target}/m"
        steal(
            tmp_path / "clean",
            target,
            budget,
            query_batch_size=batch,
            seed=3,
            records_per_shard=100,
            max_in_flight=in_flight,
        )
        log_before = _answered_images(server.log())
        rng = random.Random(7)
        kills = 0
        for _ in range(4):
            proc = subprocess.Popen(
                flags(tmp_path / "killed", target),
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(rng.uniform(4.0, 6.5))  # TF import ~3 s, then harvesting (~7 s)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        final = subprocess.run(
            flags(tmp_path / "killed", target),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert final.returncode == 0, final.stderr
        paid = _answered_images(server.log()) - log_before
    assert kills >= 2
    assert layout(tmp_path / "killed") == layout(tmp_path / "clean")
    m = fd.read_manifest(str(tmp_path / "killed"))
    assert m["records"] == budget and m["queries_spent"] == budget and m["status"] == "complete"
    # Re-sent only what was in flight at each kill (answered by the server, not yet received).
    assert budget <= paid <= budget + kills * in_flight * batch
    assert not os.path.exists(tmp_path / "killed" / "journal")


def test_flaky_server_loses_and_duplicates_nothing(tiny_export, tmp_path):
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}", "--model_name=m", "--inject_failure_rate=0.2"
    ) as flaky:
        m = steal(
            tmp_path / "flaky",
            f"grpc://{flaky.grpc_target}/m",
            300,
            max_in_flight=4,
            backoff_base_s=0.01,
            max_retries=20,
        )
        rest = steal(
            tmp_path / "flaky_rest",
            f"{flaky.rest}/v1/models/m",
            300,
            max_in_flight=4,
            backoff_base_s=0.01,
            max_retries=20,
        )
    assert m["retries"] > 0 and rest["retries"] > 0
    steal(tmp_path / "clean", f"savedmodel:{tiny_export[1]}", 300)
    assert layout(tmp_path / "flaky") == layout(tmp_path / "clean")
    assert layout(tmp_path / "flaky_rest") == layout(tmp_path / "clean")


def test_slow_server_stops_cleanly_then_resumes(tiny_export, tmp_path):
    out = tmp_path / "slow"
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}", "--model_name=m", "--inject_latency_ms=400"
    ) as slow:
        target = f"grpc://{slow.grpc_target}/m"
        with pytest.raises(UserInputError, match="DEADLINE_EXCEEDED.*after 2 retries"):
            steal(out, target, 64, timeout_s=0.1, max_retries=2, backoff_base_s=0.01)
        m = fd.read_manifest(str(out))
        assert m["status"] == "stopped" and m["records"] == 0
        m = steal(out, target, 64, timeout_s=5.0, max_in_flight=4)
    assert m["status"] == "complete" and m["records"] == 64
    steal(tmp_path / "clean", f"savedmodel:{tiny_export[1]}", 64)
    assert layout(out) == layout(tmp_path / "clean")


def test_journal_recovers_answers_and_cuts_a_torn_tail(tmp_path):
    j = journal.Journal(str(tmp_path / "j"))
    j.append([(0, journal.RECORD, b"zero"), (2, journal.SKIP, b'{"source_id": "x"}')])
    j.append([(1, journal.RECORD, b"one")])
    j.close(remove_if_empty=False)
    segment = os.path.join(tmp_path, "j", os.listdir(tmp_path / "j")[0])
    with open(segment, "ab") as f:
        f.write(b"\x10\x00\x00\x00garbage-from-a-kill")
    j = journal.Journal(str(tmp_path / "j"))
    entries = j.recover()
    assert [(e.index, e.kind, e.payload) for e in entries] == [
        (0, journal.RECORD, b"zero"),
        (2, journal.SKIP, b'{"source_id": "x"}'),
        (1, journal.RECORD, b"one"),
    ]
    j.append([(3, journal.RECORD, b"three")])
    j.retire(watermark=3)  # the first segment only holds indices < 3: deleted
    assert [e.index for e in journal.Journal(str(tmp_path / "j")).recover()] == [3]


def test_corrupt_shard_is_detected(tiny_export, tmp_path):
    steal(tmp_path / "d", f"savedmodel:{tiny_export[1]}", 40)
    shard = tmp_path / "d" / fd.read_manifest(str(tmp_path / "d"))["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="corrupt"):
        fd.read_records(str(tmp_path / "d"))


# ----------------------------------------------------------------------------- JSON API


class _CloudApi(BaseHTTPRequestHandler):
    """A small JSON prediction API with an API key, backed by the real tiny SavedModel."""

    protocol_version = "HTTP/1.1"
    model = None
    key = "k-123"

    def log_message(self, *args):
        pass

    def _answer(self, status, body):
        import json

        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        import base64
        import json

        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Ocp-Apim-Subscription-Key") != self.key:
            self._answer(401, {"error": {"code": "Unauthorized", "message": "bad key"}})
            return
        pngs = [base64.b64decode(x) for x in json.loads(body)["images"]]
        images = np.stack([decode_png(p) for p in pngs])
        out = self.model.signatures["serving_default"](images=tf.constant(images))
        names = ["zero", "one", "two"]
        self._answer(
            200,
            {
                "results": [
                    {
                        "label": names[int(c)],
                        "confidence": {n: float(s) for n, s in zip(names, row, strict=False)},
                    }
                    for c, row in zip(out["classes"].numpy(), out["scores"].numpy(), strict=False)
                ]
            },
        )


@pytest.fixture
def cloud_api(tiny_export):
    _CloudApi.model = tf.saved_model.load(tiny_export[1])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CloudApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"json+http://127.0.0.1:{server.server_address[1]}/classify"
    server.shutdown()
    server.server_close()


def _json_options(key, field="results.*.label"):
    return {
        "request_template": '{"images": "{{images_b64}}", "model": "latest"}',
        "response_field": field,
        "input_shape": (16, 16, 1),
        "class_names": ["zero", "one", "two"],
        "api_key": key,
        "api_key_header": "Ocp-Apim-Subscription-Key",
    }


def test_generic_json_api_with_api_key(cloud_api, tiny_export, tmp_path):
    with pytest.raises(UserInputError, match="HTTP 401"):
        steal(tmp_path / "nokey", cloud_api, 20, target_options=_json_options("wrong"))
    m = steal(tmp_path / "json", cloud_api, 40, target_options=_json_options("k-123"))
    assert m["records"] == 40
    assert m["target_details"]["headers"] == ["Ocp-Apim-Subscription-Key"]
    assert "k-123" not in (tmp_path / "json" / "manifest.json").read_text()
    steal(tmp_path / "local", f"savedmodel:{tiny_export[1]}", 40)
    assert [r[:3] for r in layout(tmp_path / "json")[1]] == [
        r[:3] for r in layout(tmp_path / "local")[1]
    ]
    # Score objects {class name: score} become score vectors.
    steal(
        tmp_path / "scores",
        cloud_api,
        10,
        label_mode="scores",
        target_options=_json_options("k-123", field="results.*.confidence"),
    )
    for r in fd.read_records(str(tmp_path / "scores")):
        assert r["scores"].shape == (3,) and r["scores"].argmax() == r["label"]
