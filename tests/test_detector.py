"""The model server's extraction detector (copycat_tf/server/detector.py): its signals on
generated traffic, its actions over real gRPC and REST, its counters, its errors."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import requests
from conftest import write_fashion_idx
from server_util import grpc_predict, in_process_server

from copycat_tf.server.detector import (
    Detector,
    DetectorConfig,
    OodModel,
    block_average,
    flags_in_log,
    prada_features,
    shapiro_w,
)


def test_block_average_and_feature_bounds():
    x = np.arange(2 * 4 * 6 * 1, dtype=np.uint8).reshape(2, 4, 6, 1)
    avg = block_average(x, (2, 3))
    assert avg.shape == (2, 2, 3, 1)
    assert avg[0, 0, 0, 0] == np.mean(x[0, :2, :2, 0])
    assert avg[1, 1, 2, 0] == np.mean(x[1, 2:, 4:, 0])
    # uneven cells: 5 rows in 2 cells -> 2 + 3
    odd = block_average(np.ones((1, 5, 5, 3), np.uint8) * 7, (2, 2))
    assert odd.shape == (1, 2, 2, 3) and np.all(odd == 7)
    # uneven cells in both directions: each the mean of its pixels
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 30, 3), dtype=np.uint8)
    rows, cols = np.linspace(0, 28, 9).astype(int), np.linspace(0, 30, 8).astype(int)
    expected = [
        [x[:, rows[i] : rows[i + 1], cols[j] : cols[j + 1]].mean(axis=(1, 2)) for j in range(7)]
        for i in range(8)
    ]
    np.testing.assert_allclose(
        block_average(x, (8, 7)), np.transpose(expected, (2, 0, 1, 3)), rtol=1e-6
    )
    # raw pixels when they fit, block averages of at most 1,024 values when not
    assert prada_features(np.zeros((3, 28, 28, 1), np.uint8)).shape == (3, 784)
    big = prada_features(np.zeros((2, 64, 64, 3), np.uint8))
    assert big.shape[0] == 2 and big.shape[1] <= 1024


def test_shapiro_w():
    rng = np.random.default_rng(0)
    assert shapiro_w(rng.normal(size=500)) > 0.99
    assert shapiro_w(rng.exponential(size=500) ** 3) < 0.6
    assert shapiro_w(np.ones(50)) == 1.0


def test_shapiro_w_equals_scipy():
    """Our W (kept coefficients, a sort and two sums) is scipy's statistic."""
    from scipy import stats

    rng = np.random.default_rng(1)
    for n in (11, 12, 13, 50, 257, 2048, 5000):
        for values in (rng.normal(size=n), rng.exponential(size=n) ** 2, rng.uniform(size=n)):
            assert shapiro_w(values) == pytest.approx(stats.shapiro(values).statistic, abs=1e-6)


def _prada_one_by_one(state, feats, classes, max_set):
    """PRADA as the paper states it, a query at a time (what _Client.prada must equal); a
    request's queries are taken class by class, in their order within each class."""
    import math

    order = np.argsort(classes, kind="stable")
    for x, c in zip(feats[order], classes[order], strict=True):
        stored = state.sets.get(int(c))
        d = math.inf if stored is None else float(np.sqrt(((stored - x) ** 2).sum(1)).min())
        count, total, squares = state.set_sums.get(int(c), (0, 0.0, 0.0))
        grows = state.stored < max_set
        if d == math.inf:
            if not grows:
                continue
        elif d < 1e-6:  # an exact repeat
            continue
        else:
            state.distances.append(d)
            if not (grows and d > state.thresholds.get(int(c), 0.0)):
                continue
            count, total, squares = count + 1, total + d, squares + d * d
            mean = total / count
            state.thresholds[int(c)] = mean - math.sqrt(max(squares / count - mean * mean, 0))
            state.set_sums[int(c)] = (count, total, squares)
        state.sets[int(c)] = x[None] if stored is None else np.concatenate([stored, x[None]])
        state.stored += 1


@pytest.mark.parametrize("max_set", [3000, 40])
def test_prada_requests_equal_queries_one_by_one(max_set):
    """A request's vectorised runs give the distances, sets and thresholds of its rows
    taken one by one: fresh queries, near copies, exact repeats, a set that fills up."""
    from copycat_tf.server.detector import _Client

    cfg = DetectorConfig(signals=("prada",), max_set=max_set)
    fast, slow = _Client(cfg), _Client(cfg)
    rng = np.random.default_rng(3)
    seen = []
    for r in range(8):
        fresh = rng.integers(0, 256, (64, 12, 12, 1), dtype=np.uint8)
        near = np.clip(fresh.astype(int) + rng.integers(-3, 4, fresh.shape), 0, 255)
        images = np.concatenate([fresh, near.astype(np.uint8), *seen[-1:]])
        classes = rng.integers(0, 4, len(images))
        order = rng.permutation(len(images))
        images, classes = images[order], classes[order]
        seen.append(fresh[:16])
        feats = prada_features(images)
        fast.prada(feats, classes, max_set)
        _prada_one_by_one(slow, feats, classes, max_set)
        assert fast.stored == slow.stored, r
        # float32 matrix products: distances agree to ~1e-4 (near copies lie ~0.1 apart)
        np.testing.assert_allclose(list(fast.distances), list(slow.distances), atol=2e-4)
        assert sorted(fast.sets) == sorted(slow.sets)
        for c, vectors in slow.sets.items():
            np.testing.assert_array_equal(fast.sets[c], vectors)
            assert fast.thresholds.get(c) == pytest.approx(slow.thresholds.get(c), abs=2e-4)
    assert len(slow.distances) > 500
    if max_set == 40:
        assert slow.stored == 40  # the set filled up and the runs went on without it
    else:
        assert slow.stored > 40  # the set grew in every round, never full


def _pattern_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Natural-looking in-distribution traffic: a bright band at one of 10 heights over
    dim noise (the conftest Fashion-MNIST patterns)."""
    from conftest import make_pattern_images

    labels = np.random.default_rng(seed).integers(0, 10, n)
    return make_pattern_images(labels, size=size, seed=seed), labels


def _jbda_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic-sample attack (Papernot et al.'s augmentation): a few seeds, each query a
    small step away from an earlier one, so most distances are tiny."""
    rng = np.random.default_rng(seed)
    seeds, labels = _pattern_images(10, seed)
    out = [seeds]
    while sum(len(x) for x in out) < n:
        base = out[-1]
        step = rng.choice([-3, 3], size=base.shape)
        out.append(np.clip(base.astype(int) + step, 0, 255).astype(np.uint8))
    images = np.concatenate(out)[:n]
    return images, np.tile(labels, len(images) // 10 + 1)[:n]


def test_prada_flags_a_synthetic_sample_attack_not_benign_clients(caplog):
    cfg = DetectorConfig(signals=("prada",), min_queries=100, delta=0.9)
    detector = Detector(cfg)
    for client in range(10):  # benign: 10 clients, 600 queries each, batches of 50
        images, labels = _pattern_images(600, seed=100 + client)
        for i in range(0, 600, 50):
            assert detector.observe(f"b{client}", images[i : i + 50], labels[i : i + 50]) == ""
        status = detector.status(f"b{client}")
        assert status["flagged_by"] == "" and status["last_w"] >= 0.9, status
    images, labels = _jbda_like(600, seed=7)
    fired = [detector.observe("attacker", images[i : i + 50], labels[i : i + 50]) for i in (0,)]
    for i in range(50, 600, 50):
        fired.append(detector.observe("attacker", images[i : i + 50], labels[i : i + 50]))
    assert fired.count("prada") == 1  # once, then the client stays flagged
    status = detector.status("attacker")
    assert status["flagged_by"] == "prada" and 100 <= status["flagged_at"] <= 600
    assert status["last_w"] < 0.9
    assert detector.flagged("attacker") == "prada" and detector.flagged("b0") == ""
    # The log line says it, and reads back (the detector study parses server logs).
    assert flags_in_log(caplog.text) == [("attacker", "prada", status["flagged_at"])]


def test_prada_memory_is_bounded_per_client_and_clients_are_forgotten():
    cfg = DetectorConfig(signals=("prada",), max_set=40, window=200, max_clients=3)
    detector = Detector(cfg)
    rng = np.random.default_rng(0)
    for k in range(5):
        images = rng.integers(0, 256, (300, 28, 28, 1), dtype=np.uint8)
        detector.observe(f"c{k}", images, rng.integers(0, 10, 300))
    assert detector.tracked() == 3
    assert detector.status("c0")["queries"] == 0  # least recently seen: forgotten
    status = detector.status("c4")
    assert status["stored"] <= 40 and status["queries"] == 300
    state = detector._clients["c4"]
    assert sum(len(v) for v in state.sets.values()) <= 40 and len(state.distances) <= 200


def test_ood_flags_noise_not_in_distribution_clients(tmp_path):
    data = write_fashion_idx(str(tmp_path / "fashion"), n_train=400, n_test=40)
    cfg = DetectorConfig(
        signals=("ood",), calibration="pd:fashion_mnist:train", calibration_size=400, min_queries=50
    )
    detector = Detector(cfg, data_dir=data)
    for client in range(10):
        images, labels = _pattern_images(200, seed=200 + client)
        assert detector.observe(f"b{client}", images, labels) == ""
        assert detector.status(f"b{client}")["outside_share"] < 0.1
    noise = np.random.default_rng(1).integers(0, 256, (60, 28, 28, 1), dtype=np.uint8)
    assert detector.observe("noise", noise, np.zeros(60, int)) == "ood"
    assert detector.status("noise")["outside_share"] > 0.9


def test_ood_model_threshold_is_a_held_out_quantile():
    rng = np.random.default_rng(0)
    images = np.clip(rng.normal(100, 20, (1000, 16, 16, 1)), 0, 255).astype(np.uint8)
    model = OodModel(images, 0.95)
    fresh = np.clip(rng.normal(100, 20, (2000, 16, 16, 1)), 0, 255).astype(np.uint8)
    assert 0.01 < model.outside(fresh).mean() < 0.12
    assert model.outside(255 - fresh // 4).mean() > 0.99


@pytest.mark.parametrize("action", ["block", "degrade"])
def test_detector_actions_over_grpc_and_rest_with_counters(tmp_path, tiny_export, action):
    """Two API keys: the attacker's noise is flagged by ood, and from the flagging request
    on refused (block) or answered through the degrade defence; the benign client, from the
    same address, is answered exactly all along; the counters say so."""
    from prometheus_client.parser import text_string_to_metric_families

    from copycat_tf.server.app import DetectorConfig as AppDetectorConfig
    from copycat_tf.server.metrics import MonitoringConfig

    assert AppDetectorConfig is DetectorConfig
    folder = tmp_path / "calibration"
    folder.mkdir()
    import tensorflow as tf

    benign, _ = _pattern_images(160, seed=3, size=16)  # the tiny model's input
    for i, image in enumerate(benign[:100]):
        (folder / f"{i:03d}.png").write_bytes(tf.io.encode_png(image).numpy())
    cfg = DetectorConfig(
        signals=("ood",),
        action=action,
        calibration=f"folder:{folder}",
        calibration_size=100,
        min_queries=20,
        degrade="gaussian:5",
    )
    from copycat_tf.server.detector import parse_signals

    assert parse_signals("ood,prada,ood") == ("ood", "prada")
    noise = np.random.default_rng(1).integers(0, 256, (20, 16, 16, 1), dtype=np.uint8)
    with in_process_server(
        tiny_export[0],
        api_keys=frozenset({"attacker", "benign"}),
        detector=cfg,
        monitoring=MonitoringConfig(enabled=True),
    ) as server:
        target = f"127.0.0.1:{server.grpc_port}"
        rest = f"http://127.0.0.1:{server.rest_port}/v1/models/m:predict"
        servable = server.core.store.resolve("m", None, None)
        clean = servable.run("serving_default", {"images": noise})["scores"]
        # A request is judged before it is answered: the one that flags the client too.
        if action == "block":
            import grpc

            for _ in range(2):
                with pytest.raises(grpc.RpcError) as e:
                    grpc_predict(target, noise, metadata=[("x-api-key", "attacker")])
                assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert server.core.detector.flagged(_identity("attacker")) == "ood"
            r = requests.post(rest, json={"instances": noise.tolist()}, headers=_key("attacker"))
            assert r.status_code == 403 and "extraction" in r.json()["error"]
        else:
            for _ in range(2):
                degraded = grpc_predict(target, noise, metadata=[("x-api-key", "attacker")])
                assert not np.allclose(tf.make_ndarray(degraded.outputs["scores"]), clean)
            r = requests.post(rest, json={"instances": noise.tolist()}, headers=_key("attacker"))
            assert r.status_code == 200
        # The benign key, same address: answered exactly over REST (a retry included).
        for start in (100, 120, 140, 140):
            sent = benign[start : start + 20]
            r = requests.post(rest, json={"instances": sent.tolist()}, headers=_key("benign"))
            assert r.status_code == 200
            exact = servable.run("serving_default", {"images": sent})["scores"]
            assert np.allclose(r.json()["predictions"][0]["scores"], exact[0], atol=1e-6)
        assert server.core.detector.flagged(_identity("benign")) == ""
        metrics = requests.get(
            f"http://127.0.0.1:{server.rest_port}/monitoring/prometheus/metrics",
            headers=_key("benign"),
            timeout=30,
        ).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert samples[(":copycat:serving:detector_flagged_clients_total", (("signal", "ood"),))] == 1
    assert samples[(":copycat:serving:detector_action_rows_total", (("action", action),))] == 60
    assert samples[(":copycat:serving:detector_tracked_clients", ())] == 2


def _key(key: str) -> dict:
    return {"x-api-key": key}


def _identity(key: str) -> str:
    from copycat_tf.server.core import client_identity

    return client_identity({"x-api-key": key}, "127.0.0.1")


def test_detector_sees_encoded_images_too(tiny_export):
    """A client cannot evade the detector by sending its images encoded (serving_bytes)."""
    import base64

    import tensorflow as tf

    noise = np.random.default_rng(2).integers(0, 256, (30, 16, 16, 1), dtype=np.uint8)
    cfg = DetectorConfig(signals=("prada",), min_queries=5)
    with in_process_server(tiny_export[0], detector=cfg) as server:
        url = f"http://127.0.0.1:{server.rest_port}/v1/models/m:predict"
        instances = [{"b64": base64.b64encode(tf.io.encode_png(x).numpy()).decode()} for x in noise]
        r = requests.post(
            url, json={"signature_name": "serving_bytes", "instances": instances}, timeout=30
        )
        assert r.status_code == 200
        assert server.core.detector.status("127.0.0.1")["queries"] == 30


def test_detector_bad_flags_are_one_line_errors():
    """Each bad --detector* value names the flag (the verb prints it as its one line)."""
    import types

    from copycat_tf.errors import UserInputError
    from copycat_tf.server import app

    defaults = {
        f"detector_{k}": v
        for k, v in dataclasses.asdict(DetectorConfig()).items()
        if k not in ("signals",)
    }
    defaults["detector_data_dir"] = None
    for flags, fragment in (
        ({"detector": "prada,fft"}, "unknown signal(s) fft"),
        ({"detector": "ood"}, "--detector=ood needs --detector_calibration"),
        ({"detector": "prada", "detector_delta": 1.5}, "--detector_delta=1.5"),
        ({"detector": "prada", "detector_degrade": "blur"}, "--detector_degrade='blur'"),
        ({"detector": "prada", "detector_window": 10}, "min_queries <= window"),
        (
            {"detector": "ood", "detector_calibration": "folder:/nonexistent/dir"},
            "--detector_calibration='folder:/nonexistent/dir'",
        ),
    ):
        values = types.SimpleNamespace(**{**defaults, **flags})
        with pytest.raises(UserInputError, match=re.escape(fragment)):
            app._detector(values)
    assert not app._detector(types.SimpleNamespace(**defaults, detector="")).enabled


def test_detector_bad_flag_from_the_command_line():
    from cli_util import error_lines, run_verb

    proc = run_verb("model_server", "--model_base_path=/tmp/x", "--detector=ood", timeout=120)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and "--detector_calibration" in lines[0], proc.stderr


def _png_folder(folder, images, prefix: str = ""):
    """`folder` (created when missing) with one PNG per image; returns it."""
    import tensorflow as tf

    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        (folder / f"{prefix}{i:02d}.png").write_bytes(tf.io.encode_png(image).numpy())
    return folder


def _flagfile(name: str, **replace) -> list[str]:
    """The flags of an experiment flagfile, some replaced (None: dropped)."""
    from cli_util import REPO

    out = []
    with open(f"{REPO}/experiments/fashion_mnist/{name}") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key = line[2:].split("=", 1)[0]
            if key in replace:
                if replace[key] is None:
                    continue
                line = f"--{key}={replace[key]}"
            out.append(line)
    return out


def test_cloud_api_emulation_end_to_end(tmp_path, tiny_export):
    """The experiment's commercial-API flagfiles on a tiny model: REST only, an API key, a
    rate limit, top-1 answers and the detector; the attack goes through the generic JSON
    client one PNG per request, spends its budget exactly, and the detector catches it."""
    import json

    from cli_util import REPO, run_verb
    from prometheus_client.parser import text_string_to_metric_families
    from server_util import ServerProcess

    keys = tmp_path / "keys"
    keys.write_text("cloud-key-1\n")
    calibration = _png_folder(tmp_path / "calibration", _pattern_images(60, seed=5, size=16)[0])
    server_flags = _flagfile(
        "cloud_api_server.flags",
        rest_api_port=None,
        model_name="m",
        model_base_path=tiny_export[0],
        api_keys_file=keys,
        detector_calibration=f"folder:{calibration}",
        monitoring_config_file=f"{REPO}/experiments/fashion_mnist/monitoring.config",
    )
    assert "--output_defense=top1" in server_flags and "--port=0" in server_flags
    with ServerProcess(*server_flags, model="m", api_key="cloud-key-1") as server:
        proc = run_verb(
            "steal",
            f"--flagfile={REPO}/experiments/fashion_mnist/cloud_api.flags",
            f"--target=json+http://127.0.0.1:{server.rest_port}/v1/models/m:predict",
            "--input_shape=16x16x1",
            "--num_classes=3",
            f"--api_key_file={keys}",
            "--npd=synthetic:noise",
            f"--output_dir={tmp_path / 'fake'}",
            "--query_budget=150",
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = requests.get(
            f"{server.rest}/monitoring/prometheus/metrics",
            headers={"x-api-key": "cloud-key-1"},
            timeout=30,
        ).text
        log = server.log()
    manifest = json.loads((tmp_path / "fake" / "manifest.json").read_text())
    assert manifest["records"] == 150 and manifest["status"] == "complete"
    assert "cloud-key-1" not in json.dumps(manifest)
    assert "flagged by ood" in log and "cloud-key-1" not in log
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    answered = (
        ":tensorflow:serving:request_count_total",
        (("entrypoint", "REST"), ("method", "POST"), ("model_name", "m"), ("status", "200")),
    )
    assert samples[answered] == 150  # one image per request, none paid twice
    assert samples[(":copycat:serving:detector_flagged_clients_total", (("signal", "ood"),))] == 1
    assert (
        samples[
            (":copycat:serving:defended_rows_total", (("defense", "top1"), ("model_name", "m")))
        ]
        == 150
    )


def test_ood_calibration_is_fitted_at_start_and_too_few_images_fail_there(tmp_path, tiny_export):
    """The server fits the ood model before it opens its ports; a calibration folder of 3
    pictures (taken once each) is refused there, in one line, not at the first request."""
    from cli_util import error_lines, run_verb

    folder = _png_folder(tmp_path / "calibration", _pattern_images(3, seed=2, size=16)[0])
    proc = run_verb(
        "model_server",
        f"--model_base_path={tiny_export[0]}",
        "--model_name=m",
        "--port=0",
        "--detector=ood",
        f"--detector_calibration=folder:{folder}",
        timeout=120,
    )
    assert proc.returncode != 0
    errors = [line for line in error_lines(proc) if "error:" in line]  # after load logs
    assert len(errors) == 1 and "3 distinct images of (16, 16, 1)" in errors[0], proc.stderr
    assert "--detector_calibration" in errors[0] and "Traceback" not in proc.stderr
    cfg = DetectorConfig(signals=("ood",), calibration=f"folder:{folder}", calibration_size=50)
    _png_folder(folder, _pattern_images(30, seed=3, size=16)[0], prefix="more")
    with in_process_server(tiny_export[0], detector=cfg) as server:
        assert list(server.core.detector._ood) == [(16, 16, 1)]  # before any request
