"""train_target end to end as a user runs it, and its one-line errors for bad input."""

import json
import os

import pytest
import tensorflow as tf
from cli_util import error_lines, run_verb
from conftest import write_idx


def _flags(fashion_dir, tmp_path, *extra):
    return [
        "--pd_data=fashion_mnist",
        f"--data_dir={fashion_dir}",
        f"--workdir={tmp_path / 'run'}",
        f"--model_base_path={tmp_path / 'models'}",
        "--epochs=1",
        "--batch_size=32",
        "--verbose=0",
        *extra,
    ]


def test_train_target_end_to_end_and_rerun(fashion_dir, tmp_path):
    flagfile = tmp_path / "target.flags"
    flagfile.write_text("\n".join(_flags(fashion_dir, tmp_path)) + "\n")
    proc = run_verb("train_target", f"--flagfile={flagfile}")
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    for noise in ("oneDNN", "cuda drivers", "cuInit"):
        assert noise not in proc.stdout + proc.stderr
    run = tmp_path / "run"
    assert "--pd_data=fashion_mnist" in (run / "flags.txt").read_text()
    assert json.loads((run / "config.json").read_text())["model"] == "small_cnn"
    summary = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0 and summary["test"]["num_examples"] == 40
    export_dir = tmp_path / "models" / "target" / "1"
    assert summary["export_dir"] == str(export_dir)
    loaded = tf.saved_model.load(str(export_dir))
    assert {"serving_default", "serving_bytes"} <= set(loaded.signatures)
    assert (export_dir / "assets.extra" / "class_names.txt").read_text().startswith("t-shirt")

    # Same workdir again: resumes (nothing to train) and reuses the export.
    again = run_verb("train_target", f"--flagfile={flagfile}")
    assert again.returncode == 0, again.stderr
    assert os.listdir(tmp_path / "models" / "target") == ["1"]

    # A different run in the same workdir is refused, not mixed.
    other = run_verb("train_target", f"--flagfile={flagfile}", "--model=alexnet")
    assert other.returncode != 0 and "holds a different run" in other.stderr


def _expect_one_line_error(proc, pattern):
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]


def test_unknown_model(fashion_dir, tmp_path):
    proc = run_verb("train_target", *_flags(fashion_dir, tmp_path, "--model=lenet"))
    assert proc.returncode != 0
    assert "--model" in proc.stderr and "small_cnn" in proc.stderr


def test_unknown_dataset(fashion_dir, tmp_path):
    proc = run_verb("train_target", *_flags(fashion_dir, tmp_path), "--pd_data=mnist")
    _expect_one_line_error(proc, "problem-domain spec 'mnist' is not understood")


def test_missing_data_dir(tmp_path):
    proc = run_verb("train_target", *_flags(str(tmp_path / "nope"), tmp_path))
    _expect_one_line_error(proc, "does not exist")
    assert not (tmp_path / "models" / "target" / "1").exists()


def test_corrupt_idx(fashion_dir, tmp_path):
    with open(os.path.join(fashion_dir, "train-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(b"\x1f\x8b garbage")
    proc = run_verb("train_target", *_flags(fashion_dir, tmp_path))
    _expect_one_line_error(proc, "train-labels-idx1-ubyte.gz")


def test_wrong_image_shape(fashion_dir, tmp_path):
    import numpy as np

    write_idx(os.path.join(fashion_dir, "train-images-idx3-ubyte"), np.zeros((120, 20, 20)))
    proc = run_verb("train_target", *_flags(fashion_dir, tmp_path))
    _expect_one_line_error(proc, "expected images of shape [N, 28, 28]")


def test_existing_version_refused_before_training(fashion_dir, tmp_path):
    (tmp_path / "models" / "target" / "3").mkdir(parents=True)
    proc = run_verb("train_target", *_flags(fashion_dir, tmp_path, "--version=3"))
    _expect_one_line_error(proc, "already exists")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unwritable_export_dir(fashion_dir, tmp_path):
    blocker = tmp_path / "models"
    blocker.write_text("a file, not a directory")
    proc = run_verb("train_target", *_flags(fashion_dir, tmp_path))
    _expect_one_line_error(proc, "cannot be created")


@pytest.mark.parametrize("flag", ["--epochs=0", "--batch_size=-1", "--mixed_precision=fp8"])
def test_flag_validation(fashion_dir, tmp_path, flag):
    proc = run_verb("train_target", *_flags(fashion_dir, tmp_path, flag))
    assert proc.returncode != 0
    assert flag.split("=")[0].lstrip("-") in proc.stderr


def test_help_lists_every_flag_cleanly():
    proc = run_verb("train_target", "--help")  # absl exits 1 after printing help
    for flag in ("--pd_data", "--model:", "--epochs", "--mixed_precision", "--strategy"):
        assert flag in proc.stdout
    assert "oneDNN" not in proc.stdout + proc.stderr
