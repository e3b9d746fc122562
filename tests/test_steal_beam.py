"""steal --runner: the steal as an Apache Beam pipeline (DirectRunner, worker processes),
against the embedded model server over real localhost sockets."""

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
from cli_util import error_lines, run_verb
from server_util import ServerProcess

from copycat_tf.attack import ranges as rg
from copycat_tf.attack.beam_steal import steal_beam
from copycat_tf.attack.label_modes import parse_label_mode
from copycat_tf.attack.steal import StealConfig, describe_target
from copycat_tf.attack.steal import steal as run_steal
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.preparation import Preparation
from copycat_tf.errors import UserInputError
from copycat_tf.recipe import Recipe
from copycat_tf.targets.base import TargetError
from copycat_tf.targets.retry import RetryPolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MONITORING = f"--monitoring_config_file={REPO}/experiments/fashion_mnist/monitoring.config"
TWO_PROCESSES = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
EXPLORE = {"adapt_after": 1000}  # the first 1,000 positions are the adaptation's exploration


@pytest.fixture(scope="module")
def server(tiny_export):
    with ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m", MONITORING) as s:
        yield s


@pytest.fixture(scope="module")
def npd_folder(tmp_path_factory):
    """folder:<path>: 9 pictures and one unreadable file (a skipped item per pass)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("npd")
    rng = np.random.default_rng(0)
    for i in range(9):
        pixels = rng.integers(0, 256, (24 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"p{i}.png")
    (root / "p4_broken.png").write_bytes(b"not a picture")
    return f"folder:{root}"


def config(output_dir, target, npd, budget, **overrides) -> StealConfig:
    """An in-process steal's config of what the runner steals (random order)."""
    overrides.setdefault("selection", "random")
    prep = Preparation.of(Recipe(npd_adapt_after=overrides.pop("adapt_after", 24)))
    if "cycle" in overrides:
        prep = dataclasses.replace(prep, cycle=overrides.pop("cycle"))
    return StealConfig(
        target=target,
        npd=npd,
        output_dir=str(output_dir),
        query_budget=budget,
        query_batch_size=8,
        records_per_shard=32,
        crops_per_image=4,
        preparation=prep,
        retry=RetryPolicy(max_retries=overrides.pop("max_retries", 8)),
        progress=False,
        **overrides,
    )


def records(directory) -> list:
    """(query index, label, PNG, source) of every record, in query order."""
    return sorted(
        (r["query_index"], r["label"], r["image_png"], r["source_id"])
        for r in fd.read_records(str(directory))
    )


def rows_answered(server) -> float:
    """Images the server's model computed so far (its Prometheus batch-size sum)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{server.rest}/monitoring/prometheus/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("batching_session:batch_size_sum"):
                return sample.value
    raise AssertionError("no batch-size histogram in the metrics")


def test_plan_wave_meets_the_budget_exactly():
    # Nothing committed: new ranges cut at multiples of the range size, as many positions
    # as answers still needed.
    wave = rg.plan_wave(5, 30, {}, 16)
    assert (wave.end, wave.new, wave.reused) == (35, [(5, 16), (16, 32), (32, 35)], [])
    # The exploration's end cuts a wave.
    assert rg.plan_wave(0, 100, {}, 16, stop_at=24).new == [(0, 16), (16, 24)]
    # Committed ranges count their real answers (two skips): the gap after them is longer.
    committed = {(0, 16): {"start": 0, "end": 16, "records": 14}}
    wave = rg.plan_wave(0, 20, committed, 16)
    assert (wave.end, [s["start"] for s in wave.reused], wave.new) == (22, [0], [(16, 22)])
    # A hole left by a lost worker is filled; the range after it is reused.
    committed[(16, 32)] = {"start": 16, "end": 32, "records": 16}
    committed.pop((0, 16))
    wave = rg.plan_wave(0, 40, committed, 16)
    assert wave.new == [(0, 16), (32, 40)] and [s["start"] for s in wave.reused] == [16]
    # A committed range holding more answers than the budget leaves is refused.
    with pytest.raises(ValueError, match="only 10 answers remain"):
        rg.plan_wave(16, 10, committed, 16)


def test_max_qps_is_shared_among_the_workers_the_options_name():
    from apache_beam.options.pipeline_options import PipelineOptions

    from copycat_tf.attack.beam_steal import num_workers

    def workers(*args):
        return num_workers(PipelineOptions(list(args)))

    assert workers("--runner=DirectRunner", *TWO_PROCESSES) == 2
    assert workers("--runner=DirectRunner") == 1  # Beam's default
    assert workers("--runner=DirectRunner", "--direct_num_workers=0") == os.cpu_count()
    assert workers("--runner=DataflowRunner", "--num_workers=3", "--max_num_workers=8") == 8
    assert workers("--runner=FlinkRunner", "--num_workers=4") == 4
    assert workers("--runner=SparkRunner") == 1  # unknown: the whole --max_qps per worker


def test_beam_steal_writes_the_in_process_records(server, npd_folder, tmp_path):
    """Two worker processes: the records of the in-process engine (unreadable items
    skipped, the adapted preparation after the exploration), the budget exactly, a
    manifest train_copycat reads."""
    target = f"grpc://{server.grpc_target}/m"
    budget = 77  # a partial last range and a partial last request
    reference = run_steal(config(tmp_path / "one", target, npd_folder, budget))
    before = rows_answered(server)
    m = steal_beam(
        config(tmp_path / "beam", target, npd_folder, budget), "DirectRunner", TWO_PROCESSES, 16
    )
    assert rows_answered(server) - before == budget  # every image paid for once
    assert records(tmp_path / "beam") == records(tmp_path / "one")
    for key in ("status", "records", "queries_spent", "label_histogram", "next_index"):
        assert m[key] == reference[key], key
    assert m["skipped"]["count"] == reference["skipped"]["count"] > 0
    assert m["npd_adaptation"] == reference["npd_adaptation"]
    assert (m["engine"], m["runner"], m["num_workers"]) == ("beam", "DirectRunner", 2)
    assert sum(w["records"] for w in m["workers"]) == budget
    assert all(s["records"] <= 16 for s in m["shards"])
    data = fd.load_fake_data([str(tmp_path / "beam")])
    assert sorted(data.query_indices.tolist()) == [r[0] for r in records(tmp_path / "one")]
    # The same command again: everything is committed, nothing is sent.
    before = rows_answered(server)
    again = steal_beam(
        config(tmp_path / "beam", target, npd_folder, budget), "DirectRunner", TWO_PROCESSES, 16
    )
    assert rows_answered(server) == before
    assert again["shards"] == m["shards"] and again["status"] == "complete"
    # A larger budget extends the dataset like the in-process engine does.
    run_steal(config(tmp_path / "one", target, npd_folder, 120))
    steal_beam(config(tmp_path / "beam", target, npd_folder, 120), "DirectRunner", [], 16)
    assert records(tmp_path / "beam") == records(tmp_path / "one")


def test_beam_steal_of_a_short_stream_is_exhausted_like_in_process(server, npd_folder, tmp_path):
    target = f"grpc://{server.grpc_target}/m"
    reference = run_steal(config(tmp_path / "one", target, npd_folder, 60, cycle=False))
    m = steal_beam(
        config(tmp_path / "beam", target, npd_folder, 60, cycle=False), "DirectRunner", [], 16
    )
    assert m["status"] == reference["status"] == "exhausted"
    assert m["queries_spent"] == reference["queries_spent"] == 36  # 9 pictures x 4 crops
    assert records(tmp_path / "beam") == records(tmp_path / "one")


def test_a_failed_pipeline_resumes_without_paying_twice(tiny_export, npd_folder, tmp_path):
    """The target goes away mid-run: the pipeline fails with a one-line error; re-run
    against the target back on another port, it sends only what was never answered."""
    out = tmp_path / "beam"
    flags = (f"--model_base_path={tiny_export[0]}", "--model_name=m", MONITORING)
    with ServerProcess(*flags, "--inject_latency_ms=150") as slow:
        cfg = config(out, f"grpc://{slow.grpc_target}/m", npd_folder, 200, max_retries=0)
        killer = _stop_when(slow, out, committed=2)
        with pytest.raises(UserInputError, match="re-run the same command to continue"):
            steal_beam(cfg, "DirectRunner", TWO_PROCESSES, 16)
        killer.join()
    kept = _answers_on_disk(out)
    assert 0 < kept < 200
    with ServerProcess(*flags) as s:
        cfg = config(out, f"grpc://{s.grpc_target}/m", npd_folder, 200)
        m = steal_beam(cfg, "DirectRunner", TWO_PROCESSES, 16)
        assert rows_answered(s) == 200 - kept
    run_steal(config(tmp_path / "one", f"savedmodel:{tiny_export[1]}", npd_folder, 200))
    assert m["queries_spent"] == 200 and records(out) == records(tmp_path / "one")


def test_a_retried_range_pays_only_for_what_was_not_answered(tiny_export, npd_folder, tmp_path):
    """What a runner does when a bundle fails (a request failing for good, a worker lost):
    it gives the same range to a worker again. The retry reads the answers staged by the
    failed attempt back and sends only the requests that have none."""
    out, r = tmp_path / "beam", rg.Range(0, 320)  # ~40 requests, within the exploration
    flags = (f"--model_base_path={tiny_export[0]}", "--model_name=m", MONITORING)
    with ServerProcess(*flags, "--inject_latency_ms=150") as slow:
        cfg = config(out, f"grpc://{slow.grpc_target}/m", npd_folder, 320, max_retries=0, **EXPLORE)
        staging = out / rg.RANGES_DIR / r.name
        stopper = _stop_once(slow, lambda: len(list(staging.glob("*.tfrecord"))) >= 3)
        with _range_worker(cfg) as worker, pytest.raises(TargetError):
            worker.process(r)  # the failure, injected once: the target goes away
        stopper.join()
    staged = _answers_on_disk(out)
    assert not rg.committed_summaries(str(out)) and staged >= 3 * cfg.query_batch_size
    with ServerProcess(*flags) as s:
        target = f"grpc://{s.grpc_target}/m"
        with _range_worker(config(out, target, npd_folder, 320, **EXPLORE)) as worker:
            retried = worker.process(r)  # the runner's retry
        assert rows_answered(s) == retried["records"] - staged
        with _range_worker(config(tmp_path / "clean", target, npd_folder, 320, **EXPLORE)) as w:
            clean = w.process(r)  # the same range, never interrupted
    assert retried["labels"] == clean["labels"] and retried["skips"] == clean["skips"]
    assert retried["shard"] == clean["shard"]  # the same records, byte for byte (sha256)


def test_kill_9_during_a_beam_steal_then_resume(server, tiny_export, npd_folder, tmp_path):
    out = tmp_path / "beam"
    args = [
        f"--target=grpc://{server.grpc_target}/m",
        f"--npd={npd_folder}",
        f"--output_dir={out}",
        "--query_budget=240",
        "--query_batch_size=8",
        "--crops_per_image=4",
        "--npd_adapt_after=24",
        "--range_size=16",
        "--noprogress",
        "--runner=DirectRunner",
        *TWO_PROCESSES,
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "copycat_tf.steal", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    while len(rg.committed_summaries(str(out)) if out.exists() else {}) < 3:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes
    proc.wait()
    kept = _answers_on_disk(out)
    before = rows_answered(server)
    proc = run_verb("steal", *args)
    assert proc.returncode == 0, proc.stderr
    assert "steal complete: 240 records" in proc.stdout
    assert rows_answered(server) - before == 240 - kept
    run_steal(config(tmp_path / "one", f"savedmodel:{tiny_export[1]}", npd_folder, 240))
    assert records(out) == records(tmp_path / "one")


def test_beam_steal_errors_are_one_line(server, tmp_path):
    target = f"grpc://{server.grpc_target}/m"
    base = [f"--target={target}", "--npd=synthetic:noise", "--query_budget=10", "--noprogress"]
    # Flags steal does not know are Beam's, and only with --runner.
    proc = run_verb("steal", *base, f"--output_dir={tmp_path / 'a'}", "--direct_num_workers=2")
    assert error_lines(proc) == [
        "steal: error: unknown flag(s) --direct_num_workers=2; see --help (Beam pipeline "
        "options are taken with --runner only)"
    ]
    # A dataset stolen in process is not resumed by the runner.
    proc = run_verb("steal", *base, f"--output_dir={tmp_path / 'ip'}")
    assert proc.returncode == 0, proc.stderr
    proc = run_verb("steal", *base, f"--output_dir={tmp_path / 'ip'}", "--runner=DirectRunner")
    assert error_lines(proc) == [
        f"steal: error: --output_dir {tmp_path / 'ip'} holds a fake dataset stolen in process; "
        "resume it without --runner, or pass a new --output_dir"
    ]
    cfg = StealConfig(
        target, "synthetic:noise", str(tmp_path / "b"), 10, progress=False, selection="random"
    )
    cases = [
        (
            dataclasses.replace(cfg, selection="entropy"),
            "--runner with --selection=entropy: a query selection chooses each round from the "
            "answers of the round before; run it without --runner (in process)",
        ),
        (
            dataclasses.replace(cfg, num_shards=2),
            "--runner splits the stream among its workers itself; drop --shard_index/--num_shards",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(UserInputError) as e:
            steal_beam(bad, "DirectRunner", [], 16)
        assert str(e.value) == message
    # Another run's directory is refused before anything is sent.
    steal_beam(cfg, "DirectRunner", [], 16)
    with pytest.raises(UserInputError, match=r"holds a fake dataset of another run \(npd: "):
        steal_beam(dataclasses.replace(cfg, seed=3), "DirectRunner", [], 16)


def _answers_on_disk(out) -> int:
    """Answers committed in ranges or staged in requests."""
    committed = rg.committed_summaries(str(out))
    staged = 0
    for path in (out / rg.RANGES_DIR).glob("*/*.tfrecord"):
        staged += len(rg._read_records(str(path)))
    return sum(s["records"] for s in committed.values()) + staged


def _stop_when(server, out, committed: int):
    """A thread that stops `server` once `committed` ranges of `out` are committed."""
    return _stop_once(
        server, lambda: out.exists() and len(rg.committed_summaries(str(out))) >= committed
    )


@contextlib.contextmanager
def _range_worker(cfg: StealConfig):
    """A worker of the pipeline (what each Beam worker process runs), opened on cfg."""
    client, info, num_classes = describe_target(cfg, parse_label_mode(cfg.label_mode))
    client.close()
    worker = rg.RangeWorker(cfg, info.input_shape, num_classes, 0.0)
    worker.open()
    try:
        yield worker
    finally:
        worker.close()


def _stop_once(server, condition):
    """A thread that stops `server` once `condition()` holds (at most 240 s)."""
    import threading

    def watch():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not condition():
            time.sleep(0.02)
        server.stop()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
