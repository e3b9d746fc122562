"""The demo's --quick path end to end on a tiny configuration."""

import json
import os

from cli_util import run_verb

from copycat_tf.recipe import Recipe


def test_demo_quick_end_to_end(fashion_dir, tmp_path):
    workdir = tmp_path / "demo"
    proc = run_verb(
        "demo",
        "--quick",
        f"--data_dir={fashion_dir}",
        "--npd=synthetic:dead_leaves",
        "--query_budget=300",
        "--epochs=1",
        "--eval_examples=40",
        f"--workdir={workdir}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "copycat_tf demo: stealing a fashion_mnist classifier with up to 300 queries" in out
    assert "stolen with 300 queries of synthetic:dead_leaves (budget 300, complete)" in out
    assert "━" not in out  # no Keras progress bars in a pipe (one line per epoch)
    assert f"copycat trained with --augment={Recipe.augment}" in out
    for line in ("accuracy", "macro-F1", "agreement with target", "TensorBoard: tensorboard"):
        assert line in out
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert report["num_examples"] == 40 and 0 <= report["agreement"] <= 1
    assert (workdir / "eval" / "report.md").exists()
    assert (workdir / "eval" / "confusion_copycat.png").exists()
    manifest = json.loads((workdir / "fake_npd" / "manifest.json").read_text())
    assert manifest["queries_spent"] == 300
    assert manifest["target_details"]["url"].startswith("grpc://127.0.0.1:")
    # The server it started is gone, and drained cleanly.
    log = (workdir / "model_server.log").read_text()
    assert "model server stopped" in log
    assert "oneDNN" not in out + proc.stderr
    assert os.path.isdir(workdir / "models" / "copycat" / "1")
