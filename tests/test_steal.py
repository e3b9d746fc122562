"""steal end to end against the embedded model server over real localhost sockets."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
from cli_util import error_lines, run_verb
from server_util import ServerProcess
from tensorboard.backend.event_processing import event_accumulator

from copycat_tf.attack.steal import StealConfig
from copycat_tf.attack.steal import steal as run_steal
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.images import decode_png
from copycat_tf.data.preparation import Preparation
from copycat_tf.errors import UserInputError
from copycat_tf.recipe import Recipe
from copycat_tf.targets.retry import RetryPolicy


@pytest.fixture(scope="module")
def server(tiny_export):
    with ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m") as s:
        yield s


def steal(output_dir, target, budget=90, **overrides):
    """steal() with small batches and shards; retry settings may be given flat."""
    names = ("timeout_s", "max_retries", "backoff_base_s")
    retry = {k: overrides.pop(k) for k in names if k in overrides}
    config = StealConfig(
        target=target,
        npd=overrides.pop("npd", "synthetic:dead_leaves"),
        output_dir=str(output_dir),
        query_budget=budget,
        query_batch_size=overrides.pop("query_batch_size", 16),
        records_per_shard=overrides.pop("records_per_shard", 32),
        crops_per_image=overrides.pop("crops_per_image", 1),
        retry=RetryPolicy(**retry),
        progress=False,
        **overrides,
    )
    return run_steal(config)


def layout(directory):
    """Everything that must match between two runs: shards and every record."""
    manifest = fd.read_manifest(str(directory))
    shards = [
        (s["file"], s["records"], s["first_index"], s["last_index"]) for s in manifest["shards"]
    ]
    records = [
        (
            r["query_index"],
            r["label"],
            r["image_png"],
            r["source_id"],
            None if "scores" not in r else r["scores"].tobytes(),
        )
        for r in fd.read_records(str(directory))
    ]
    return shards, records


def test_grpc_rest_and_in_process_steal_the_same_dataset(server, tiny_export, tmp_path):
    grpc_m = steal(tmp_path / "grpc", f"grpc://{server.grpc_target}/m")
    rest_m = steal(tmp_path / "rest", f"{server.rest}/v1/models/m")
    local_m = steal(tmp_path / "local", f"savedmodel:{tiny_export[1]}")
    for m in (grpc_m, rest_m, local_m):
        assert m["status"] == "complete" and m["records"] == 90 and m["queries_spent"] == 90
        assert [s["records"] for s in m["shards"]] == [32, 32, 26]
        assert sum(m["label_histogram"]) == 90
    assert rest_m["target_details"]["encoding"] == "b64_png"
    reference = layout(tmp_path / "local")
    assert layout(tmp_path / "grpc") == reference
    assert layout(tmp_path / "rest") == reference
    # The stored PNG is exactly what was sent; the label is what the target answers for it.
    loaded = tf.saved_model.load(tiny_export[1])
    records = fd.read_records(str(tmp_path / "grpc"))
    images = np.stack([decode_png(r["image_png"]) for r in records])
    assert images.shape == (90, 16, 16, 1)
    labels = loaded.signatures["serving_default"](images=tf.constant(images))["classes"]
    np.testing.assert_array_equal(labels.numpy(), [r["label"] for r in records])
    assert [r["query_index"] for r in records] == list(range(90))
    assert not os.path.exists(tmp_path / "grpc" / "journal")  # finished: nothing pending


def test_label_modes(server, tmp_path):
    target = f"grpc://{server.grpc_target}/m"
    steal(tmp_path / "h", target, 20)
    assert all("scores" not in r for r in fd.read_records(str(tmp_path / "h")))
    steal(tmp_path / "s", target, 20, label_mode="scores")
    for r in fd.read_records(str(tmp_path / "s")):
        assert r["scores"].shape == (3,) and abs(r["scores"].sum() - 1) < 1e-5
        assert r["scores"].argmax() == r["label"]
    steal(tmp_path / "k", target, 20, label_mode="topk:1")
    for r in fd.read_records(str(tmp_path / "k")):
        assert (r["scores"] > 0).sum() == 1 and r["scores"][r["label"]] == 1.0
    with pytest.raises(UserInputError, match="--label_mode"):
        steal(tmp_path / "x", target, 20, label_mode="soft")


def test_label_only_target(tiny_export, tmp_path):
    with ServerProcess(
        f"--model_base_path={tiny_export[0]}", "--model_name=m", "--output_defense=top1"
    ) as s:
        target = f"grpc://{s.grpc_target}/m"
        with pytest.raises(UserInputError, match="answers labels only"):
            steal(tmp_path / "a", target, 20, label_mode="scores")
        with pytest.raises(UserInputError, match="--num_classes"):
            steal(tmp_path / "b", target, 20)
        m = steal(tmp_path / "c", target, 20, num_classes=3)
        assert m["records"] == 20 and all(
            "scores" not in r for r in fd.read_records(str(tmp_path / "c"))
        )
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_exact_budget_and_extension(server, tmp_path):
    target = f"grpc://{server.grpc_target}/m"
    m = steal(tmp_path / "d", target, budget=37, query_batch_size=16, max_in_flight=3)
    assert m["records"] == 37 and m["queries_spent"] == 37 and m["requests"] == 3
    # A larger budget on a re-run extends the same dataset, continuing the NPD stream.
    m = steal(tmp_path / "d", target, budget=50, query_batch_size=16)
    assert m["records"] == 50 and m["queries_spent"] == 50
    indices = [r["query_index"] for r in fd.read_records(str(tmp_path / "d"))]
    assert indices == list(range(50))
    # The same budget again spends nothing more.
    m = steal(tmp_path / "d", target, budget=50)
    assert m["queries_spent"] == 50 and m["requests"] == 4


def test_corrupt_npd_files_are_skipped_and_listed(server, tmp_path):
    folder = tmp_path / "npd"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        image = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        (folder / f"ok{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    (folder / "sub" / "photo.jpg").write_bytes(
        tf.io.encode_jpeg(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).numpy()
    )
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folder / "sub" / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    m = steal(
        tmp_path / "f",
        f"grpc://{server.grpc_target}/m",
        budget=100,
        npd=f"folder:{folder}",
        crops_per_image=2,
        preparation=Preparation.of(Recipe(npd_cycle=False)),
    )
    assert m["status"] == "exhausted"
    assert m["records"] == 7 * 2 and m["skipped"]["count"] == 2 * 2
    skipped = {e["source_id"].split("#")[0] for e in m["skipped"]["examples"]}
    assert skipped == {"broken.png", os.path.join("sub", "empty.jpg")}
    sources = {r["source_id"] for r in fd.read_records(str(tmp_path / "f"))}
    assert os.path.join("sub", "photo.jpg#crop1") in sources


def test_workers_split_the_stream(server, tmp_path):
    target = f"grpc://{server.grpc_target}/m"
    steal(tmp_path / "all", target, budget=40)
    steal(tmp_path / "w0", target, budget=20, shard_index=0, num_shards=2)
    steal(tmp_path / "w1", target, budget=20, shard_index=1, num_shards=2)
    whole = {r["query_index"]: r["label"] for r in fd.read_records(str(tmp_path / "all"))}
    parts = {}
    for w in ("w0", "w1"):
        for r in fd.read_records(str(tmp_path / w)):
            assert r["query_index"] not in parts
            parts[r["query_index"]] = r["label"]
    assert parts == whole


def test_tensorboard_summaries(server, tmp_path):
    steal(tmp_path / "t", f"grpc://{server.grpc_target}/m", budget=40)
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "t" / "tensorboard" / "steal"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    assert {
        "steal/queries_spent",
        "steal/images_per_second",
        "steal/stolen_labels",
        "steal/top_class_share",
        "steal/label_entropy_bits",
        "steal/npd_samples",
    } <= set(acc.Tags()["tensors"])
    # The label histogram is a time series, not only a final picture.
    assert len(acc.Tensors("steal/stolen_labels")) >= 2


def test_steal_cli_end_to_end(server, tmp_path):
    out = tmp_path / "cli"
    flagfile = tmp_path / "steal.flags"
    flagfile.write_text(
        f"--target=grpc://{server.grpc_target}/m\n--npd=synthetic:noise\n"
        f"--output_dir={out}\n--query_budget=50\n--query_batch_size=8\n--records_per_shard=20\n"
    )
    proc = run_verb("steal", f"--flagfile={flagfile}")
    assert proc.returncode == 0, proc.stderr
    assert "steal complete: 50 records in 3 shard(s), 50/50 queries spent" in proc.stdout
    assert "oneDNN" not in proc.stdout + proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(f for f in os.listdir(out) if f.endswith(".tfrecord")) == [
        "fake-00000-of-00003.tfrecord",
        "fake-00001-of-00003.tfrecord",
        "fake-00002-of-00003.tfrecord",
    ]
    assert manifest["target"]["model"] == "m"
    assert manifest["target_details"]["url"] == f"grpc://{server.grpc_target}/m"
    assert manifest["target"]["input_shape"] == [16, 16, 1]


@pytest.mark.parametrize(
    "flags,fragment",
    [
        (["--target=ftp://x/m"], "unknown scheme"),
        (["--target=grpc://127.0.0.1:1/m"], "unreachable"),
        (["--target=GRPC/nope"], "unknown scheme"),
        (["--npd=folder:/nonexistent"], "does not exist"),
        (["--npd=synthetic:clouds"], "NPD generator 'clouds' unknown"),
        (["--npd=mix:1*synthetic:noise"], "at least two parts"),
        (["--label_mode=top3"], "--label_mode"),
    ],
)
def test_steal_bad_input(server, tmp_path, flags, fragment):
    base = [
        f"--target=grpc://{server.grpc_target}/m",
        "--npd=synthetic:noise",
        f"--output_dir={tmp_path / 'out'}",
        "--query_budget=10",
    ]
    proc = run_verb("steal", *base, *flags)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "out")  # nothing that could pass for a dataset


def test_steal_bad_input_in_process(server, tmp_path):
    target = f"grpc://{server.grpc_target}/m"
    with pytest.raises(UserInputError, match="has no model|Servable not found"):
        steal(tmp_path / "a", f"grpc://{server.grpc_target}/nope")
    with pytest.raises(UserInputError, match="--query_budget=0"):
        steal(tmp_path / "a", target, budget=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="holds no image files"):
        steal(tmp_path / "a", target, npd=f"folder:{tmp_path / 'empty'}")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("junk")
    with pytest.raises(UserInputError, match="none of its 1 files is a readable image"):
        steal(tmp_path / "a", target, npd=f"folder:{tmp_path / 'junk'}")
    assert not os.path.exists(tmp_path / "a")
    # A directory holding another run's dataset is refused, not mixed.
    steal(tmp_path / "b", target, budget=10)
    with pytest.raises(UserInputError, match="another run.*npd"):
        steal(tmp_path / "b", target, budget=10, npd="synthetic:noise")
    with pytest.raises(UserInputError, match="another run.*label_mode"):
        steal(tmp_path / "b", target, budget=10, label_mode="scores")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "thesis.pdf").write_text("precious")
    with pytest.raises(UserInputError, match="not empty and holds no fake dataset"):
        steal(tmp_path / "c", target, budget=10)


def test_resume_on_another_port_and_api(server, tiny_export, tmp_path):
    """The same model reached at another address (or over REST) continues the dataset."""
    steal(tmp_path / "r", f"grpc://{server.grpc_target}/m", budget=30)
    with ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m") as other:
        m = steal(tmp_path / "r", f"{other.rest}/v1/models/m", budget=60)
    assert m["records"] == 60 and m["target_details"]["transport"] == "rest"
    steal(tmp_path / "one", f"grpc://{server.grpc_target}/m", budget=60)
    # Same records (an extended budget closes the first run's last shard early).
    assert layout(tmp_path / "r")[1] == layout(tmp_path / "one")[1]


def _save_model(path, scores_of, constant=False):
    """A 16x16x1, 3-class SavedModel with the target signature whose `scores` output is
    scores_of(probabilities), e.g. another dtype than the contract's float32; `constant`
    answers class 0 for everything."""

    class Model(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 1], tf.uint8, name="images")])
        def serve(self, images):
            x = tf.reduce_mean(tf.cast(images, tf.float32), axis=[1, 2, 3])
            probabilities = tf.nn.softmax(tf.stack([x, 255 - x, tf.abs(x - 128)], axis=1) / 40)
            if constant:
                probabilities = tf.one_hot(tf.zeros_like(x, tf.int32), 3)
            return {
                "scores": scores_of(probabilities),
                "classes": tf.argmax(probabilities, axis=1, output_type=tf.int64),
            }

    model = Model()
    tmp = f"{path}.tmp"
    tf.saved_model.save(model, tmp, signatures={"serving_default": model.serve})
    os.rename(tmp, path)  # a version directory appears complete


def test_float16_scores_are_stolen_as_float32(tmp_path):
    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: tf.cast(p, tf.float16))
    with ServerProcess(f"--model_base_path={base}", "--model_name=m") as s:
        steal(tmp_path / "g", f"grpc://{s.grpc_target}/m", 20, label_mode="scores")
        steal(tmp_path / "r", f"{s.rest}/v1/models/m", 20, label_mode="scores")
    for name in ("g", "r"):
        for r in fd.read_records(str(tmp_path / name)):
            assert r["scores"].dtype == np.float32 and r["scores"].shape == (3,)
            assert abs(r["scores"].sum() - 1) < 1e-2 and r["scores"].argmax() == r["label"]


def test_an_answer_of_the_wrong_type_stops_the_steal_cleanly(tmp_path):
    """The target is replaced mid-steal by a version answering string scores."""
    import threading
    import time

    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: p)
    out = tmp_path / "d"
    errors = []
    config = tmp_path / "models.config"
    policy = "model_version_policy { all {} }"
    entry = f"name: 'm' base_path: '{base}' {policy}"
    config.write_text(f"model_config_list {{ config {{ {entry} }} }}")
    with ServerProcess(
        f"--model_config_file={config}",
        "--file_system_poll_wait_seconds=0.2",
        "--inject_latency_ms=40",
    ) as s:
        target = f"grpc://{s.grpc_target}/m"

        def run():
            try:
                steal(out, target, 10**5, query_batch_size=8, max_in_flight=1, label_mode="scores")
            except UserInputError as e:
                errors.append(str(e))

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while not (out / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _save_model(str(base / "2"), tf.strings.as_string)
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert errors, "the steal did not stop"
        assert "output 'scores'" in errors[0] and "expected floating-point" in errors[0]
        m = fd.read_manifest(str(out))
        assert m["status"] == "stopped" and 0 < m["queries_spent"] < 100_000
        # Nothing answered is lost: the same dataset continues against version 1 (every
        # version is served; unversioned requests reach the newest).
        spent = m["queries_spent"]
        m = steal(out, f"{target}/versions/1", spent + 8, query_batch_size=8, label_mode="scores")
    assert m["status"] == "complete" and m["records"] == spent + 8
    assert [r["query_index"] for r in fd.read_records(str(out))] == list(range(spent + 8))


def test_skewed_labels_and_an_exhausted_stream_are_reported_at_once(tmp_path):
    """A target answering one class for everything, and a folder that runs out."""
    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: p, constant=True)
    folder = tmp_path / "npd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        image = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
        (folder / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    out = tmp_path / "d"
    with ServerProcess(f"--model_base_path={base}", "--model_name=m") as s:
        proc = run_verb(
            "steal",
            f"--target=grpc://{s.grpc_target}/m",
            f"--npd=folder:{folder}",
            f"--output_dir={out}",
            "--query_budget=100",
            "--crops_per_image=4",
            "--nonpd_cycle",
            "--skew_check_after=10",
            "--query_batch_size=8",
            "--noprogress",
        )
    assert proc.returncode == 0, proc.stderr
    m = fd.read_manifest(str(out))
    assert m["status"] == "exhausted" and m["queries_spent"] == 20 == m["npd_exhausted_at"]
    assert "ends before the budget: only 20 of the 100 queries" in proc.stderr
    assert "--npd_cycle" in proc.stderr
    assert "the NPD stream ended before the budget: 20 of 100 queries spent" in proc.stdout
    warning = m["label_skew_warning"]
    assert "class 0 holds 100%" in warning and "never answered" in warning
    assert warning in proc.stderr and "--npd_background" in warning
    stats = m["label_statistics"]
    assert stats["top_share"] == 1.0 and stats["entropy_bits"] == 0.0
    assert "top class 0 at 100%, label entropy 0.00 of 1.58 bits" in proc.stdout


def test_adaptive_preparation_resumes_with_the_same_choices(tmp_path):
    """Explore-then-commit over backgrounds: the weights come from the exploration's
    answers, and a steal stopped before or after that point continues identically."""
    from PIL import Image

    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: p)  # its class follows the mean brightness
    folder = tmp_path / "npd"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # transparent pictures: the background decides what is seen
        rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rng.random((24, 24)) < 0.85, 0, 255)
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
    prep = Preparation.of(Recipe(npd_adapt_after=48, npd_background="black,white,grey"))
    settings = dict(npd=f"folder:{folder}", preparation=prep, crops_per_image=2)
    with ServerProcess(f"--model_base_path={base}", "--model_name=m") as s:
        target = f"grpc://{s.grpc_target}/m"
        whole = steal(tmp_path / "whole", target, 160, **settings)
        steal(tmp_path / "parts", target, 30, **settings)  # stops inside the exploration
        steal(tmp_path / "parts", target, 100, **settings)  # crosses it
        parts = steal(tmp_path / "parts", target, 160, **settings)  # resumes after it
    adaptation = whole["npd_adaptation"]
    assert adaptation["after"] == 48 and adaptation["answers"] == 48
    weights = [a["weight"] for a in adaptation["arms"]]
    assert len(weights) == 6 and abs(sum(weights) - 1) < 1e-3 and max(weights) > 1.3 * min(weights)
    assert parts["npd_adaptation"] == adaptation
    assert layout(tmp_path / "parts")[1] == layout(tmp_path / "whole")[1]


def test_kill_and_resume_with_preparation_and_adaptation(tmp_path):
    """kill -9 in the middle of a prepared, adaptive folder steal; the resumed dataset is
    the uninterrupted one."""
    import signal
    import subprocess
    import sys
    import time

    from cli_util import REPO
    from PIL import Image

    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: p)
    folder = tmp_path / "npd"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        rgba = rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rng.random((30, 30)) < 0.7, 0, 255)
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
    env = {**os.environ, "PYTHONPATH": REPO}
    with ServerProcess(
        f"--model_base_path={base}", "--model_name=m", "--inject_latency_ms=60"
    ) as s:

        def command(out):
            return [
                sys.executable,
                "-m",
                "copycat_tf.steal",
                f"--target=grpc://{s.grpc_target}/m",
                f"--npd=folder:{folder}",
                f"--output_dir={out}",
                "--query_budget=400",
                "--query_batch_size=8",
                "--max_in_flight=2",
                "--records_per_shard=50",
                "--crops_per_image=3",
                "--npd_adapt_after=120",
                "--noprogress",
            ]

        clean = subprocess.run(command(tmp_path / "clean"), env=env, cwd=REPO, capture_output=True)
        assert clean.returncode == 0, clean.stderr
        kills = 0
        for wait in (5.0, 7.5):  # TF import ~3 s, then stealing
            proc = subprocess.Popen(
                command(tmp_path / "killed"),
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(wait)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
        final = subprocess.run(
            command(tmp_path / "killed"), env=env, cwd=REPO, capture_output=True, text=True
        )
        assert final.returncode == 0, final.stderr
    assert kills >= 1
    assert layout(tmp_path / "killed") == layout(tmp_path / "clean")
    killed = fd.read_manifest(str(tmp_path / "killed"))
    assert killed["npd_adaptation"] == fd.read_manifest(str(tmp_path / "clean"))["npd_adaptation"]
