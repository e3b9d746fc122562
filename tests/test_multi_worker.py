"""train_target --strategy=multi_worker_mirrored: two local CPU worker processes on
loopback ports (TF_CONFIG), the chief writing checkpoints, TensorBoard and the export;
a lost worker restarts the job, which resumes after the last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from cli_util import error_lines, run_verb
from server_util import ServerProcess, free_port

from copycat_tf.recipe import Recipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 12


def _launch(args, ports, tmp_path, attempt, verb="train_target"):
    """Both workers of the cluster on `ports`; (process, log path) each."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    out = []
    for i in range(len(ports)):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}),
        }
        log = tmp_path / f"worker{i}-{attempt}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"copycat_tf.{verb}", *args],
                cwd=REPO,
                env=env,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        out.append((proc, log))
    return out


def _state(run):
    path = run / "checkpoints" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"epoch": 0}


def test_two_workers_train_export_and_resume_after_a_lost_worker(fashion_dir, tmp_path):
    run, models = tmp_path / "run", tmp_path / "models"
    args = [
        "--pd_data=fashion_mnist",
        f"--data_dir={fashion_dir}",
        f"--workdir={run}",
        f"--model_base_path={models}",
        "--model_name=t",
        "--strategy=multi_worker_mirrored",
        f"--epochs={EPOCHS}",
        "--batch_size=16",
        "--mixed_precision=float32",
        "--verbose=0",
    ]
    workers = _launch(args, [free_port(), free_port()], tmp_path, 0)
    deadline = time.monotonic() + 300
    while _state(run)["epoch"] < 2:
        assert time.monotonic() < deadline, (tmp_path / "worker0-0.log").read_text()[-3000:]
        assert all(p.poll() is None for p, _ in workers), (tmp_path / "worker0-0.log").read_text()[
            -3000:
        ]
        time.sleep(0.05)
    # Worker 1 is lost; the job (both workers) is restarted, as a cluster manager does.
    for proc, _ in reversed(workers):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = _state(run)["epoch"]
    assert 2 <= done_before < EPOCHS
    assert not (models / "t" / "1").exists()  # nothing exported before the end
    workers = _launch(args, [free_port(), free_port()], tmp_path, 1)
    for proc, log in workers:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    chief, other = (log.read_text() for _, log in workers)
    assert f"resuming {run} after epoch {done_before}" in chief
    assert "target small_cnn on fashion_mnist" in chief and "test accuracy" in chief
    assert "worker 1: trained 12 epoch(s) with the chief" in other
    state = _state(run)
    assert [h["epoch"] for h in state["history"]] == list(range(1, EPOCHS + 1))
    assert all(np.isfinite(h["train/loss"]) for h in state["history"])
    assert sorted(os.listdir(run / "tensorboard")) == ["eval", "train"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_done"] == EPOCHS and metrics["export_dir"].endswith("t/1")
    # The export is served and answers finite scores.
    with ServerProcess(f"--model_base_path={models / 't'}", "--model_name=t", model="t") as s:
        import grpc  # noqa: F401  (the server's client stack)
        from server_util import grpc_predict

        x = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
        answer = grpc_predict(s.grpc_target, x, model="t")
        import tensorflow as tf

        scores = tf.make_ndarray(answer.outputs["scores"])
        assert scores.shape == (4, 10) and np.isfinite(scores).all()


def test_tpu_strategy_without_a_tpu_is_one_line(fashion_dir, tmp_path):
    proc = run_verb(
        "train_target",
        "--pd_data=fashion_mnist",
        f"--data_dir={fashion_dir}",
        f"--workdir={tmp_path / 'run'}",
        "--strategy=tpu",
    )
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert line.startswith("train_target: error: --strategy=tpu: no TPU found (")
    assert line.endswith("run on a TPU host (or set TPU_NAME), or pick another --strategy")


def test_two_workers_train_a_copycat(tiny_export, tmp_path):
    """train_copycat on a fake dataset stolen from the tiny model, on two workers."""
    from copycat_tf.attack.steal import StealConfig, steal

    fake = tmp_path / "fake"
    steal(
        StealConfig(
            f"savedmodel:{tiny_export[1]}", "synthetic:shapes", str(fake), 96, progress=False
        )
    )
    args = [
        f"--fake_dataset={fake}",
        f"--workdir={tmp_path / 'c'}",
        f"--model_base_path={tmp_path / 'models'}",
        "--strategy=multi_worker_mirrored",
        "--epochs=2",
        "--min_steps=0",
        "--batch_size=16",
        "--mixed_precision=float32",
        "--verbose=0",
    ]
    workers = _launch(args, [free_port(), free_port()], tmp_path, 0, verb="train_copycat")
    for proc, log in workers:
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    chief, other = (log.read_text() for _, log in workers)
    assert f"copycat {Recipe().model}" in chief and "SavedModel" in chief
    assert "worker 1: trained 2 epoch(s) with the chief" in other
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["stages"]["npd"]["epochs_done"] == 2
    assert os.path.isdir(metrics["export_dir"])
