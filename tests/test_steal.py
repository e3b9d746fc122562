"""steal end to end against the embedded model server over real localhost sockets."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
from cli_util import error_lines, run_verb
from server_util import ServerProcess
from tensorboard.backend.event_processing import event_accumulator

from copycat_tf.attack.progress import skew_advice
from copycat_tf.attack.steal import StealConfig
from copycat_tf.attack.steal import steal as run_steal
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.images import decode_png
from copycat_tf.data.preparation import LEGACY, Preparation
from copycat_tf.errors import UserInputError
from copycat_tf.recipe import Recipe
from copycat_tf.targets.retry import RetryPolicy


@pytest.fixture(scope="module")
def server(tiny_export):
    with ServerProcess(f"--model_base_path={tiny_export[0]}", "--model_name=m") as s:
        yield s


def steal(output_dir, target, budget=90, **overrides):
    """steal() with small batches and shards; retry settings may be given flat. A steal
    split across workers is in random order (as steal's --num_shards defaults to)."""
    if overrides.get("num_shards", 1) > 1:
        overrides.setdefault("selection", "random")
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
            r.get("chosen_by"),
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


def test_a_rate_limited_target_costs_time_not_queries(tiny_export, tmp_path):
    """Against a served rate limit, an attacker pacing at the limit (--max_qps) is never
    refused; one that is not is refused and retries; both steal the same dataset."""
    import time

    flags = (f"--model_base_path={tiny_export[0]}", "--model_name=m", "--rate_limit_qps=4")
    with ServerProcess(*flags) as s:
        target = f"grpc://{s.grpc_target}/m"
        start = time.monotonic()
        paced = steal(tmp_path / "paced", target, 48, query_batch_size=8, max_qps=4.0)
        elapsed = time.monotonic() - start
        eager = steal(tmp_path / "eager", target, 48, query_batch_size=8, max_in_flight=4)
    assert paced["queries_spent"] == eager["queries_spent"] == 48
    assert paced["requests"] == 6 and paced["transient_errors"] == 0
    assert elapsed >= 5 / 4  # 6 requests at 4 per second
    assert eager["transient_errors"] > 0 and eager["status"] == "complete"
    assert eager["requests"] == 6 + eager["transient_errors"]  # every refusal was retried
    assert layout(tmp_path / "paced") == layout(tmp_path / "eager")
    # A limit of one request a second: the metadata request right after another client
    # request of the same address is refused at first, then asked again, not given up.
    # The server allows no burst at 1 request/s, so pacing exactly at the limit was refused
    # for about every third request (any request arriving a little early); after a refusal
    # the pacing keeps a few per cent of margin (ad hoc, 25 requests: 14-15 refusals
    # before, 1-2 after).
    flags = (f"--model_base_path={tiny_export[0]}", "--model_name=m", "--rate_limit_qps=1")
    with ServerProcess(*flags) as s:
        m = steal(
            tmp_path / "slow", f"grpc://{s.grpc_target}/m", 96, query_batch_size=8, max_qps=1.0
        )
        assert m["status"] == "complete" and m["queries_spent"] == 96
        assert m["requests"] == 12 + m["transient_errors"] and m["transient_errors"] <= 3
        # Not told the limit, 4 requests in flight: pacing starts at the first refusal and
        # adapts (ad hoc, 25 requests: 113 refusals before, 4 after).
        m = steal(tmp_path / "unpaced", f"grpc://{s.grpc_target}/m", 96, query_batch_size=8)
        assert m["requests"] == 12 + m["transient_errors"] and m["transient_errors"] <= 8


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
        (["--selection=random", "--selection_random=0.5"], "--selection_random=0.5 shares out"),
        (["--num_shards=2", "--selection=entropy"], "run it with --num_shards=1"),
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


def test_a_dataset_made_before_jitter_on_resumes_with_its_pixels(server, tmp_path):
    """A manifest whose preparation has no jitter_on was made with the jitter on the whole
    canvas: resuming it under the new default is refused with the flag that resumes it,
    and that flag continues it exactly as the uninterrupted run."""
    from PIL import Image

    folder = tmp_path / "npd"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(6):
        rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rng.random((24, 24)) < 0.5, 0, 255)
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
    target = f"grpc://{server.grpc_target}/m"
    canvas = Preparation.of(Recipe(npd_jitter_on="canvas", npd_adapt_after=0))
    settings = dict(npd=f"folder:{folder}", crops_per_image=3)
    steal(tmp_path / "whole", target, 40, preparation=canvas, **settings)
    steal(tmp_path / "old", target, 20, preparation=canvas, **settings)
    path = tmp_path / "old" / fd.MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["npd"]["preparation"]["jitter_on"]  # as steal wrote it before the knob
    path.write_text(json.dumps(manifest))
    assert fd.read_manifest(str(tmp_path / "old"))["npd"]["preparation"]["jitter_on"] == "canvas"
    picture = Preparation.of(Recipe(npd_adapt_after=0))
    with pytest.raises(UserInputError, match="--npd_jitter_on=canvas"):
        steal(tmp_path / "old", target, 40, preparation=picture, **settings)
    steal(tmp_path / "old", target, 40, preparation=canvas, **settings)
    assert layout(tmp_path / "old")[1] == layout(tmp_path / "whole")[1]
    # The new default sends other pixels (the backgrounds stay exact).
    steal(tmp_path / "new", target, 40, preparation=picture, **settings)
    assert layout(tmp_path / "new")[1] != layout(tmp_path / "whole")[1]


def test_merge_the_workers_of_a_split_steal(server, tmp_path):
    """Two workers of one steal become one dataset: the records of the unsplit run (same
    positions, pixels, sources), one manifest with summed figures; what is not one run's
    complete set of finished workers is refused."""
    from copycat_tf.attack.merge import merge

    target = f"grpc://{server.grpc_target}/m"
    for i in range(2):
        steal(tmp_path / f"w{i}", target, 30, shard_index=i, num_shards=2)
    single = steal(tmp_path / "single", target, 60)
    workers = [str(tmp_path / "w1"), str(tmp_path / "w0")]  # any order
    m = merge(workers, str(tmp_path / "merged"))
    assert (m["records"], m["queries_spent"], m["num_workers"], m["status"]) == (
        60,
        60,
        2,
        "complete",
    )
    assert sum(m["label_histogram"]) == 60 and m["label_statistics"]["answers"] == 60
    assert [w["shard_index"] for w in m["workers"]] == [0, 1]
    pixels = lambda d: sorted((r[0], r[2], r[3]) for r in layout(d)[1])  # noqa: E731
    assert pixels(tmp_path / "merged") == pixels(tmp_path / "single")
    assert single["records"] == 60
    data = fd.load_fake_data([str(tmp_path / "merged")])
    assert sorted(data.query_indices.tolist()) == list(range(60))
    # A merge is not a steal's dataset: steal refuses to resume it.
    with pytest.raises(UserInputError, match="merge of worker datasets"):
        steal(tmp_path / "merged", target, 90)
    with pytest.raises(UserInputError, match="not empty"):
        merge(workers, str(tmp_path / "merged"))
    with pytest.raises(UserInputError, match="given twice"):
        merge([workers[0], workers[0]], str(tmp_path / "x"))
    with pytest.raises(UserInputError, match="at least two"):
        merge(workers[:1], str(tmp_path / "x"))
    steal(tmp_path / "other_seed", target, 30, shard_index=1, num_shards=2, seed=5)
    with pytest.raises(UserInputError, match="not workers of one steal"):
        merge([workers[1], str(tmp_path / "other_seed")], str(tmp_path / "x"))
    for i in range(2):
        steal(tmp_path / f"t{i}", target, 10, shard_index=i, num_shards=3)
    with pytest.raises(UserInputError, match="shard_index 2 missing"):
        merge([str(tmp_path / "t0"), str(tmp_path / "t1")], str(tmp_path / "x"))
    path = tmp_path / "w0" / fd.MANIFEST
    path.write_text(path.read_text().replace('"status": "complete"', '"status": "stopped"'))
    with pytest.raises(UserInputError, match="w0 is stopped"):
        merge(workers, str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")  # nothing that could pass for a dataset


def test_merge_and_steal_flags_on_the_command_line(server, tmp_path):
    target = f"grpc://{server.grpc_target}/m"
    for i in range(2):
        steal(tmp_path / f"w{i}", target, 20, shard_index=i, num_shards=2)
    merged = tmp_path / "merged"
    proc = run_verb(
        "steal", f"--merge={tmp_path / 'w0'},{tmp_path / 'w1'}", f"--output_dir={merged}"
    )
    assert proc.returncode == 0, proc.stderr
    assert "merged 2 workers (complete): 40 records" in proc.stdout
    assert fd.read_manifest(str(merged))["records"] == 40
    proc = run_verb("steal", f"--output_dir={tmp_path / 'new'}", "--npd=synthetic:noise")
    assert proc.returncode == 2
    assert error_lines(proc) == [
        "steal: error: --target, --query_budget required (or --merge=DIR,... to merge)"
    ]


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


def _brightness_target(tmp_path, pictures, mode="RGB"):
    """(model base path, NPD folder): the 3-class brightness model of _save_model, and a
    folder of the given pixel arrays as PNGs."""
    from PIL import Image

    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: p)  # class 0 bright, 1 dark, 2 mid-grey
    folder = tmp_path / "npd"
    folder.mkdir()
    for i, pixels in enumerate(pictures):
        Image.fromarray(pixels, mode).save(folder / f"{i}.png")
    return base, folder


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


def test_skew_advice_names_the_knobs_not_in_use():
    recipe = Recipe()
    plain = Preparation.parse("white", 0.0, 0.0, 0.0, "0.25,1.0", "0.75,1.33", True, 0)
    advice = skew_advice("folder:/x", plain, "random")
    for knob in ("--npd_background=random", "--npd_invert=0.5", "--npd_jitter", "--npd_crop_area"):
        assert knob in advice
    assert "--npd=mix:" in advice and "--selection=class_balance" in advice
    full = skew_advice("mix:0.5*folder:/x|0.5*synthetic:shapes", Preparation.of(recipe), "entropy")
    assert "--npd_" not in full and "--npd=mix" not in full
    assert "--selection=class_balance" in full
    assert "--selection_pool" in skew_advice("synthetic:shapes", None, "class_balance")
    assert "a new steal with the NPD preparation" in skew_advice("folder:/x", LEGACY, "random")
    canvas = Preparation.of(Recipe(npd_jitter_on="canvas"))
    assert "--npd_jitter_on=picture" in skew_advice("folder:/x", canvas, "random")


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
    # The advice names what this steal does not use yet: its preparation and its query
    # selection are the recipe's (class_balance: a larger pool to choose from).
    assert warning in proc.stderr and "--selection_pool" in warning
    assert "--selection=class_balance" not in warning
    assert "--npd=mix:" in warning and "--npd_background" not in warning
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
    settings = dict(npd=f"folder:{folder}", preparation=prep, crops_per_image=2, selection="random")
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


@pytest.mark.parametrize("reuse", [False, True], ids=["fresh_rounds", "selection_reuse"])
def test_kill_and_resume_with_preparation_adaptation_and_selection(tmp_path, reuse):
    """kill -9 in the middle of a prepared, adaptive folder steal choosing its queries in
    rounds (killed while stealing or while a scout trains); the resumed dataset is the
    uninterrupted one. With --selection_reuse a round also carries the round before's
    unchosen candidates over and warm-starts its scout from the saved one; that run also
    draws a quarter of each round at random (--selection_random)."""
    import signal
    import subprocess
    import sys
    import time

    from cli_util import REPO

    rng = np.random.default_rng(1)
    pictures = []
    for _ in range(8):
        rgba = rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)
        rgba[..., 3] = np.where(rng.random((30, 30)) < 0.7, 0, 255)
        pictures.append(rgba)
    base, folder = _brightness_target(tmp_path, pictures, "RGBA")
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
                "--query_budget=300",
                "--query_batch_size=8",
                "--max_in_flight=2",
                "--records_per_shard=50",
                "--crops_per_image=3",
                "--npd_adapt_after=120",
                "--selection=class_balance",
                "--selection_round=120",
                "--noprogress",
                *(["--selection_reuse", "--selection_random=0.25"] if reuse else []),
                *([] if reuse else ["--selection_random=0"]),
            ]

        clean = subprocess.run(command(tmp_path / "clean"), env=env, cwd=REPO, capture_output=True)
        assert clean.returncode == 0, clean.stderr
        kills = 0
        for wait in (5.0, 6.5):  # TF import ~3 s, then stealing
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
    clean = fd.read_manifest(str(tmp_path / "clean"))
    assert killed["npd_adaptation"] == clean["npd_adaptation"]
    assert [r["after"] for r in killed["selection_record"]["rounds"]] == [120, 240]
    carried = [r.get("carried", 0) for r in killed["selection_record"]["rounds"]]
    assert (carried[1] > 0) == reuse, killed["selection_record"]["rounds"]
    drawn = [r.get("drawn_at_random", 0) for r in killed["selection_record"]["rounds"]]
    assert drawn == ([30, 15] if reuse else [0, 0])


def _label_entropy(labels, num_classes):
    p = np.bincount(labels, minlength=num_classes) / max(len(labels), 1)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def test_class_balance_selection_flattens_labels_and_resumes_its_choice(tmp_path):
    """A target whose answers follow brightness, NPD pictures mostly dark: after the
    exploration a scout chooses candidates round by round, each round's choice is saved
    before it is sent, a resumed steal sends exactly the saved choice, and the labels past
    the exploration are less skewed than the random order's."""
    from PIL import Image

    from copycat_tf.attack import selection as sel

    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: p)  # class 0 bright, 1 dark, 2 mid-grey
    folder = tmp_path / "npd"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        level = 230 if i % 6 == 0 else (120 if i % 6 == 1 else 25)  # dark ones dominate
        pixels = np.clip(rng.normal(level, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")
    prep = Preparation.of(
        Recipe(npd_adapt_after=64, npd_background="black", npd_invert=0.0, npd_jitter=0.0)
    )
    settings = dict(
        npd=f"folder:{folder}", preparation=prep, crops_per_image=4, selection_random=0.0
    )
    with ServerProcess(f"--model_base_path={base}", "--model_name=m") as s:
        target = f"grpc://{s.grpc_target}/m"
        plain = steal(tmp_path / "random", target, 256, selection="random", **settings)
        settings["selection_round"] = 64
        chosen = steal(tmp_path / "chosen", target, 256, selection="class_balance", **settings)
        saved = sel.load_selection(str(tmp_path / "chosen"))
        steal(tmp_path / "again", target, 256, selection="class_balance", **settings)
        # Stopped inside the exploration, then resumed with the choice already on disk (as
        # after a kill between saving the choice and sending it): it is read, not redone.
        steal(tmp_path / "resumed", target, 40, selection="class_balance", **settings)
        assert not os.path.exists(tmp_path / "resumed" / sel.SELECTION_FILE)  # not yet due
        shutil.copy(tmp_path / "chosen" / sel.SELECTION_FILE, tmp_path / "resumed")
        steal(tmp_path / "resumed", target, 256, selection="class_balance", **settings)
        # Not the same dataset: refused with the flag that resumes it.
        with pytest.raises(UserInputError, match="made with --selection=class_balance: resume"):
            steal(tmp_path / "chosen", target, 200, selection="random", **settings)
    assert layout(tmp_path / "resumed")[1] == layout(tmp_path / "chosen")[1]
    # The scout is seeded: the same run chooses the same queries.
    assert layout(tmp_path / "again")[1] == layout(tmp_path / "chosen")[1]
    assert chosen["queries_spent"] == 256 == plain["queries_spent"]
    # Rounds of 64 (--selection_round): after 64 explored, 128 and 256 answers.
    rounds = chosen["selection_record"]["rounds"]
    assert [(r["after"], r["pool"], r["scout"]["trained_on"]) for r in rounds] == [
        (64, 640, 64),
        (128, 640, 128),
        (192, 640, 192),
    ]
    assert all("chosen" not in r and "guesses" not in r for r in rounds)
    # Scouts judged on what they chose: brightness is easy to learn (a scout scoring the
    # wrong candidates would agree by chance only).
    assert min(r["scout_agreement"] for r in rounds[:2]) > 0.8
    assert "scout_agreement" not in rounds[2]
    assert [len(r["chosen"]) for r in saved["rounds"]] == [64, 64, 64]
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "chosen" / "tensorboard" / "steal"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"selection/pool", "selection/predicted_labels", "selection/scout_agreement"} <= tags
    assert [e.step for e in acc.Tensors("selection/round")] == [64, 128, 192]
    assert saved["rounds"][1]["pool_start"] == saved["rounds"][0]["pool_end"]
    records = fd.read_records(str(tmp_path / "chosen"))
    assert [r["query_index"] for r in records] == list(range(256))
    for r in records[64:]:
        assert r["source_id"].endswith(f"@{sel.position(saved, r['query_index'])}")
        assert r["chosen_by"] == ("class_balance", (r["query_index"] - 64) // 64)
    assert all("chosen_by" not in r for r in records[:64])  # the exploration's
    # Fresh candidates and a scout from scratch each round (no --selection_reuse).
    assert [r["carried"] for r in saved["rounds"]] == [0, 0, 0]
    assert not any(r["scout"]["warm_start"] for r in saved["rounds"])
    assert not list((tmp_path / "chosen").glob("scout-*"))
    past = {
        name: np.array([r["label"] for r in fd.read_records(str(tmp_path / name))[64:]])
        for name in ("random", "chosen")
    }
    assert np.bincount(past["random"], minlength=3)[1] > 0.6 * len(past["random"])
    assert _label_entropy(past["chosen"], 3) > _label_entropy(past["random"], 3) + 0.2


def test_greedy_class_balanced_choice():
    from copycat_tf.attack import selection as sel

    rng = np.random.default_rng(0)
    predicted = np.where(rng.random(1000) < 0.8, 0, rng.integers(1, 4, 1000))  # 80% class 0
    probs = np.full((1000, 4), 0.02)
    probs[np.arange(1000), predicted] = 0.94
    rows = sel.choose_balanced(probs, np.array([500, 10, 10, 10]), 200)
    assert len(rows) == 200 and np.all(np.diff(rows) > 0)
    assert np.bincount(predicted[rows], minlength=4)[0] < 20  # the common class is avoided
    assert np.array_equal(rows, sel.choose_balanced(probs, np.array([500, 10, 10, 10]), 200))
    assert len(sel.choose_balanced(probs[:50], np.zeros(4), 200)) == 50
    selection = {
        "rounds": [
            {"after": 10, "chosen": [30, 12, 57], "pool_end": 60},
            {"after": 13, "chosen": [64, 61], "pool_end": 70},
        ]
    }
    assert [sel.position(selection, k) for k in range(10, 18)] == [30, 12, 57, 64, 61, 70, 71, 72]
    labels = np.repeat([0, 1, 2], [5000, 30, 200])
    subset = sel.scout_subset(labels, 1000, seed=0)
    assert np.bincount(labels[subset]).tolist() == [770, 30, 200]  # rare classes whole
    assert np.array_equal(subset, sel.scout_subset(labels, 1000, seed=0))
    assert len(sel.scout_subset(labels[:900], 1000, seed=0)) == 900
    assert sel.round_size(10_000, 2048, 0) == 2048 and sel.round_size(50_000, 2048, 0) == 6250
    assert sel.round_size(50_000, 2048, 500) == 500
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.99, 0.01]])
    assert list(sel.choose_uncertain(probs, 2, "entropy")) == [1, 2]
    assert list(sel.choose_uncertain(probs, 2, "margin")) == [1, 2]
    points = np.array([[0.0, 0], [0.1, 0], [5, 5], [5.1, 5], [-4, 3]], np.float32)
    assert list(sel.choose_kcenter(points, np.zeros((1, 2), np.float32), 2)) == [3, 4]
    # entropy_kcenter: core-set among the SHORTLIST x need most uncertain rows only.
    uncertain = np.array([[0.5, 0.5], [0.5, 0.5], [0.99, 0.01], [0.5, 0.5], [0.9, 0.1]])
    centre = np.zeros((1, 2), np.float32)
    assert list(sel.choose_diverse(uncertain, [points], centre, 1, uncertain=False)) == [3]
    assert sel.SHORTLIST == 4  # rows 0, 1, 3, 4 (not the confident row 2)
    assert list(sel.choose_diverse(uncertain, [points[:2], points[2:]], centre, 1, True)) == [3]
    assert list(sel.choose_diverse(uncertain, [points], centre, 2, True)) == [3, 4]
    assert len(sel.choose_diverse(uncertain, [], centre, 2, True)) == 0
    assert sel.pool_size(100, 100_000) == 1000 and sel.pool_size(100, 300) == 300
    assert sel.pool_size(100, 50) == 100
    assert sel.scout_steps(10_000) == 1500 and sel.scout_steps(1000) == 300
    assert sel.scout_steps(10_000, warm=True) == 471 and sel.scout_steps(100_000, True) == 500


def test_dfal_ranks_candidates_by_the_deepfool_step_to_the_runner_up_class():
    """On a linear scout the DeepFool step is exact: |z_1 - z_2| / ||w_1 - w_2|| for the
    two best logits; dfal takes the candidates nearest the boundary, whatever the batch."""
    import keras

    from copycat_tf.attack import selection as sel

    rng = np.random.default_rng(5)
    w = rng.normal(0, 0.01, (4, 3)).astype(np.float32)
    b = np.array([0.3, 0.0, -0.2], np.float32)
    scout = keras.Sequential(
        [keras.Input((2, 2, 1)), keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    scout.layers[-1].set_weights([w, b])
    images = rng.integers(0, 256, (700, 2, 2, 1)).astype(np.uint8)  # two batches of scoring
    scores = sel.boundary_scorer(scout)
    probs, distance = sel.boundary_distance(scores, images)
    z = images.reshape(700, 4).astype(np.float64) @ w + b
    top = np.argsort(-z, axis=1)
    rows = np.arange(700)
    gap = z[rows, top[:, 0]] - z[rows, top[:, 1]]
    expected = gap / np.linalg.norm(w[:, top[:, 0]] - w[:, top[:, 1]], axis=0)
    np.testing.assert_allclose(distance, expected, rtol=1e-3, atol=1e-4)
    assert np.array_equal(probs.argmax(axis=1), top[:, 0])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    alone = sel.boundary_distance(scores, images[:7])[1]  # the same numbers in a small batch
    np.testing.assert_allclose(alone, distance[:7], rtol=1e-5)
    nearest = sel.choose_nearest(distance, 50)
    assert len(nearest) == 50 and np.all(np.diff(nearest) > 0)
    assert distance[nearest].max() <= np.delete(distance, nearest).min()
    assert list(sel.choose_nearest(np.array([3.0, 1.0, 1.0, 0.5]), 2)) == [1, 3]


def _npd_workers() -> list[int]:
    """Living NPD worker processes (data.npd_processes) started by this process."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read()
        except OSError:  # ended meanwhile
            continue
        ours = fields[0] != "Z" and int(fields[1]) == os.getpid()
        if ours and b"copycat_tf.data.npd_processes" in command:
            found.append(int(pid))
    return found


@pytest.mark.parametrize(
    "strategy, mode, share",
    [
        ("entropy", "fresh", 0.0),
        ("margin", "reuse", 0.0),
        ("kcenter", "reuse", 0.5),
        ("entropy_kcenter", "fresh", 0.0),
        ("class_balance", "warm_start", 0.25),
        ("dfal", "fresh", 0.0),
    ],
)
def test_every_scout_strategy_end_to_end_with_a_partial_last_round(
    tmp_path, strategy, mode, share, monkeypatch
):
    """Over gRPC against a real server: rounds of 64 after an exploration of 64, the last
    round partial (budget 200): the budget is exact, each round is recorded and its
    records say so, and the dataset trains like any other. With --selection_reuse, rounds
    take the unchosen candidates of the round before over and warm-start their scout; with
    --selection_warm_start, they warm-start their scout and score fresh candidates.
    With --selection_random, that share of each round is drawn at random from its pool
    and its records say "random". dfal (input gradients of the scout) chooses the same
    queries when run again, with another count of worker processes. Candidates are made
    by worker processes, which end with the steal."""
    from copycat_tf.attack import selection as sel
    from copycat_tf.data.npd_processes import ItemProcesses

    monkeypatch.setattr(sel, "SCOUT_MIN_STEPS", 40)  # what is chosen is not judged here
    by_workers = []  # positions the worker processes made (observed, then made as ever)
    real_items = ItemProcesses.items
    monkeypatch.setattr(
        ItemProcesses, "items", lambda self, ps: by_workers.extend(ps) or real_items(self, ps)
    )

    rng = np.random.default_rng(3)
    pictures = [
        np.clip(rng.normal(40 * i + 20, 20, (24, 24, 3)), 0, 255).astype(np.uint8) for i in range(6)
    ]
    base, folder = _brightness_target(tmp_path, pictures)
    prep = Preparation.of(Recipe(npd_adapt_after=64, npd_background="black", npd_jitter=0.0))
    settings = dict(
        npd=f"folder:{folder}",
        preparation=prep,
        crops_per_image=4,
        selection=strategy,
        selection_round=64,
        selection_reuse=mode == "reuse",
        selection_warm_start=mode == "warm_start",
        selection_random=share,
    )
    with ServerProcess(f"--model_base_path={base}", "--model_name=m") as s:
        manifest = steal(tmp_path / "fake", f"grpc://{s.grpc_target}/m", 200, **settings)
        if strategy == "dfal":  # its input gradients choose the same again, from
            # candidates made by one worker process instead of two
            url = f"grpc://{s.grpc_target}/m"
            steal(tmp_path / "again", url, 200, **settings, npd_workers=1)
            assert layout(tmp_path / "again") == layout(tmp_path / "fake")
        if mode != "fresh":  # resumed without its flag: refused, naming the flags it needs
            made = f"--selection={strategy}{f' --selection_random={share:g}' if share else ''}"
            with pytest.raises(UserInputError, match=f"made with {made} --selection_{mode}: "):
                steal(
                    tmp_path / "fake",
                    f"grpc://{s.grpc_target}/m",
                    200,
                    **{**settings, "selection_reuse": False, "selection_warm_start": False},
                )
    assert manifest["queries_spent"] == 200 and manifest["status"] == "complete"
    assert len(set(by_workers)) >= 64 + 640  # the exploration's items and a pool at least
    deadline = time.monotonic() + 60  # a liveness bound: the producer closes them at its end
    while _npd_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _npd_workers()
    rounds = manifest["selection_record"]["rounds"]
    assert [(r["after"], sum(r["predicted_histogram"])) for r in rounds] == [
        (64, 64),
        (128, 64),
        (192, 8),
    ]
    records = fd.read_records(str(tmp_path / "fake"))
    assert [r["query_index"] for r in records] == list(range(200))
    drawn = [round(share * n) for n in (64, 64, 8)]
    assert [r.get("drawn_at_random", 0) for r in rounds] == drawn
    by = [r.get("chosen_by") for r in records[64:]]
    for i, (start, n) in enumerate(((0, 64), (64, 64), (128, 8))):
        mine = by[start : start + n]
        assert mine.count(("random", i)) == drawn[i] and mine.count((strategy, i)) == n - drawn[i]
    positions = [int(r["source_id"].rsplit("@", 1)[1]) for r in records[64:]]
    assert len(set(positions)) == len(positions)  # no candidate sent twice
    kept = [p.name for p in (tmp_path / "fake").glob("scout-*")]
    # pools of 640, 640 and 80 candidates; scouts after the first warm-started or not
    carried = [0, 576, 72] if mode == "reuse" else [0, 0, 0]
    assert [r["carried"] for r in rounds] == carried
    fresh = [r["pool_end"] - r["pool_start"] for r in rounds]
    assert fresh == ([640, 64, 8] if mode == "reuse" else [640, 640, 80]), fresh
    warm = mode != "fresh"
    assert [r["scout"]["warm_start"] for r in rounds] == [False, warm, warm]
    assert [r["scout"]["steps"] < rounds[0]["scout"]["steps"] for r in rounds[1:]] == [warm] * 2
    assert manifest.get("selection_warm_start", False) == (mode == "warm_start")
    assert kept == (["scout-2.weights.h5"] if warm else [])  # the last round's only
    data = fd.load_fake_data([str(tmp_path / "fake")])
    assert len(data.labels) == 200 and data.num_classes == 3


def test_adaptive_selection_favours_the_arm_with_rare_answers(tmp_path):
    """A mixture of a folder of dark pictures (answered "dark" almost always) and a rarer
    folder of bright ones (answered "bright"): the bandit sends more of the second, and says so
    per round; the same run twice chooses the same; records name strategy and round."""
    from PIL import Image

    from copycat_tf.attack import selection as sel

    base = tmp_path / "m"
    _save_model(str(base / "1"), lambda p: p)
    rng = np.random.default_rng(5)
    for name, levels in (("dark", [25, 35]), ("light", [230, 200])):
        (tmp_path / name).mkdir()
        for i in range(8):
            pixels = np.clip(rng.normal(levels[i % 2], 15, (24, 24, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(tmp_path / name / f"{i}.png")
    prep = Preparation.of(
        Recipe(npd_adapt_after=64, npd_background="black", npd_invert=0.0, npd_jitter=0.0)
    )
    settings = dict(
        npd=f"mix:0.85*folder:{tmp_path / 'dark'}|0.15*folder:{tmp_path / 'light'}",
        preparation=prep,
        crops_per_image=4,
        selection_round=64,
        selection_random=0.0,
    )
    with ServerProcess(f"--model_base_path={base}", "--model_name=m") as s:
        target = f"grpc://{s.grpc_target}/m"
        ordered = {**settings, "selection_round": 0, "selection": "random"}
        plain = steal(tmp_path / "random", target, 256, **ordered)
        chosen = steal(tmp_path / "adaptive", target, 256, selection="adaptive", **settings)
        steal(tmp_path / "again", target, 256, selection="adaptive", **settings)
    assert layout(tmp_path / "again")[1] == layout(tmp_path / "adaptive")[1]
    assert chosen["queries_spent"] == 256 == plain["queries_spent"]
    rounds = chosen["selection_record"]["rounds"]
    assert [r["after"] for r in rounds] == [64, 128, 192]
    assert all("scout" not in r for r in rounds)  # no scout: nothing but the bandit
    first = rounds[0]["arms"]
    assert set(first) == {"part 0 black", "part 1 black"}
    assert first["part 1 black"]["reward"] > first["part 0 black"]["reward"]
    assert sum(a["chosen"] for a in first.values()) == 64
    assert first["part 1 black"]["chosen"] > 32  # most of the round from the rarer arm
    records = fd.read_records(str(tmp_path / "adaptive"))
    assert {r["chosen_by"] for r in records[64:]} == {("adaptive", i) for i in range(3)}
    past = {
        name: np.array([r["label"] for r in fd.read_records(str(tmp_path / name))[64:]])
        for name in ("random", "adaptive")
    }
    assert _label_entropy(past["adaptive"], 3) > _label_entropy(past["random"], 3) + 0.2
    assert sel.load_selection(str(tmp_path / "adaptive"))["strategy"] == "adaptive"
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "adaptive" / "tensorboard" / "steal"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    rewards = acc.Tensors("selection/arm_reward/part_1_black")
    assert [e.step for e in rewards] == [64, 128, 192]


def test_selection_pool_carry_over_bandit_and_cache_units():
    from copycat_tf.attack import selection as sel
    from copycat_tf.data.npd import NpdItem

    rounds = [
        {"after": 10, "chosen": [12, 15], "pool_start": 10, "pool_end": 16},
        {"after": 12, "chosen": [14, 17], "carried": 3, "pool_start": 16, "pool_end": 18},
    ]
    # Round 0's pool 10..15 less its choice: 10, 11, 13, 14; round 1 took the newest 3 (11,
    # 13, 14) and 16, 17, chose 14 and 17: 11, 13, 16 are left, the newest 2 carried on.
    assert sel.carried_over(rounds, 4, 2) == [13, 16]
    assert sel.carried_over(rounds, 10, 2) == [11, 13, 16]
    assert sel.carried_over(rounds[:1], 5, 5) == []
    assert sel.carried_over([], 5, 2) == []
    # The bandit: arm "b" answers a rare class, "a" the common one; "c" is new (explored).
    labels = np.array([0] * 90 + [1] * 10)
    arms = ["a"] * 90 + ["b"] * 10
    candidates = ["a", "b", "c"] * 20
    rows, stats = sel.choose_adaptive(candidates, arms, labels, 2, 12)
    picked = [candidates[r] for r in rows]
    assert len(rows) == 12 and np.all(np.diff(rows) > 0)
    assert picked.count("b") > picked.count("a") and picked.count("c") >= 1
    assert stats["b"]["reward"] > stats["a"]["reward"] and stats["c"]["answers"] == 0
    assert sum(s["chosen"] for s in stats.values()) == 12
    assert np.array_equal(rows, sel.choose_adaptive(candidates, arms, labels, 2, 12)[0])
    assert len(sel.choose_adaptive(["a"] * 3, arms, labels, 2, 12)[0]) == 3  # pool too small
    # The cache keeps items up to its byte limit, and computes what it lacks.
    computed = []

    def compute(positions):
        computed.extend(positions)
        return [NpdItem(p, np.zeros((10, 10), np.uint8), str(p)) for p in positions]

    cache = sel.ImageCache(limit=3 * (64 + 100))
    assert [it.index for it in cache.get([1, 2, 3, 4], compute)] == [1, 2, 3, 4]
    assert [it.index for it in cache.get([2, 4, 1], compute)] == [2, 4, 1]
    assert computed == [1, 2, 3, 4, 4]  # 4 did not fit: computed again
    assert cache.nbytes <= cache.limit
    cache.drop([1, 2, 9])
    assert cache.nbytes == 64 + 100
    assert [it.index for it in cache.get([3, 1], compute)] == [3, 1]
    assert computed[-1:] == [1]  # dropped: computed again


def test_scout_training_runs_its_exact_steps_and_the_pool_is_made_ahead():
    import threading

    from copycat_tf.attack import selection as sel
    from copycat_tf.data.npd import NpdItem

    # Steps per call into TensorFlow divide the steps: Keras would round a partial call up.
    assert [sel.steps_per_execution(n) for n in (1500, 1300, 320, 471, 7, 53)] == [
        50,
        50,
        40,
        3,
        7,
        1,
    ]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    scout = sel._train_scout(images, rng.integers(0, 3, 40), 3, 0, None)
    assert int(scout.optimizer.iterations.numpy()) == sel.scout_steps(40) == 300
    # PoolAhead fetches the pool in order, chunk by chunk, until the stream's end...
    fetched, gate = [], threading.Event()

    def fetch(positions):
        gate.wait(10)
        fetched.append(positions)
        return [None if p >= 5000 else NpdItem(p, None, str(p)) for p in positions]

    ahead = sel.PoolAhead(fetch, list(range(1000, 9000)))
    ahead.start()
    gate.set()
    ahead._thread.join(10)
    assert [c[0] for c in fetched] == [1000, 1000 + sel.SCORE_CHUNK]  # 2,048 per chunk
    assert fetched[-1][0] < 5000 <= fetched[-1][-1]  # the chunk where the stream ends is last
    # ... and wait() stops it after the chunk in hand.
    fetched.clear()
    gate.clear()
    ahead = sel.PoolAhead(fetch, list(range(100_000)))
    ahead.start()
    gate.set()
    ahead.wait()
    assert 1 <= len(fetched) <= 2 and not ahead._thread.is_alive()
    sel.PoolAhead(fetch, [1]).wait()  # never started: nothing to wait for


def test_selection_without_any_readable_exploration_image_is_a_clear_error(tmp_path):
    from copycat_tf.attack import selection as sel
    from copycat_tf.data.npd import NpdItem

    def unreadable(positions):
        return [NpdItem(k, None, f"{k}.png", "cannot identify image file") for k in positions]

    with pytest.raises(UserInputError, match="none of the 3 answered queries before query 3"):
        labeled = {0: 1, 1: 0, 2: 1}
        sel.select(str(tmp_path), "entropy", 0, 3, 4, 100, labeled, unreadable, str, 2, 0)
    assert sel.load_selection(str(tmp_path)) is None  # nothing chosen, nothing written


def test_adaptive_selection_with_a_single_arm_is_a_clear_error(tmp_path):
    from copycat_tf.attack import selection as sel
    from copycat_tf.data.npd import NpdItem

    def readable(positions):
        return [NpdItem(k, np.zeros((4, 4, 1), np.uint8), f"{k}") for k in positions]

    with pytest.raises(UserInputError, match="--selection=adaptive needs NPD arms"):
        sel.select(
            str(tmp_path),
            "adaptive",
            0,
            3,
            4,
            100,
            {0: 1, 1: 0, 2: 1},
            readable,
            "all".format,
            2,
            0,
        )
    assert sel.load_selection(str(tmp_path)) is None


@pytest.mark.parametrize(
    "selection, shards, pool, share, fragment",
    [
        ("kcentre", 1, 400, 0.0, "--selection=kcentre; expected one of random, class_balance"),
        ("class_balance", 2, 400, 0.0, "run it with --num_shards=1"),
        (
            "entropy",
            1,
            400,
            0.0,
            "--selection_round=500 cannot be chosen from --selection_pool=400",
        ),
        ("entropy", 1, 4000, 1.5, "--selection_random=1.5; expected a share in [0, 1]"),
    ],
)
def test_selection_bad_input(selection, shards, pool, share, fragment):
    import re

    from copycat_tf.attack import selection as sel

    with pytest.raises(UserInputError, match=re.escape(fragment)):
        sel.check_selection(selection, shards, 500, pool, share)
    sel.check_selection("random", 1, 500, 400)  # random order has no rounds
    # ... so the recipe's default share (for its strategy) means nothing to it.
    sel.check_selection("random", 1, 500, 400, 0.5)
    assert (sel.random_share("random", 0.5), sel.random_share("class_balance", 0.5)) == (0, 0.5)
    ordered = StealConfig("grpc://h:1/m", "synthetic:noise", "out", 10, selection="random")
    assert ordered.selection_random == 0.0 and StealConfig("t", "n", "o", 10).selection_random


def test_invariance_probe_sends_mirrors_and_shifts_and_is_part_of_the_identity(server, tmp_path):
    """The probe's copies reach the target as mirrored and shifted pixels of the first
    queries, are stored like every answer, and the probe size is part of the dataset's
    identity (a resume with another size is refused with the flag that resumes it)."""
    from copycat_tf.attack.steal import fit_probe
    from copycat_tf.data import invariance

    target = f"grpc://{server.grpc_target}/m"
    probed = Preparation.of(Recipe(invariance_probe=10))
    manifest = steal(tmp_path / "p", target, 40, preparation=probed)
    assert manifest["npd"]["preparation"]["probe"] == 10
    records = {r["query_index"]: r for r in fd.read_records(str(tmp_path / "p"))}
    assert sorted(records) == list(range(40))
    for j in range(10):
        original = decode_png(records[j]["image_png"])
        mirror = decode_png(records[10 + j]["image_png"])
        shift = decode_png(records[20 + j]["image_png"])
        np.testing.assert_array_equal(mirror, original[:, ::-1])
        np.testing.assert_array_equal(shift[:, 1:], original[:, :-1])
        assert records[10 + j]["source_id"].endswith(f"#{invariance.MIRROR}")
        assert records[20 + j]["source_id"].endswith(f"#{invariance.SHIFT}")
    # Without the probe, positions 10..29 are other images (30.. are the same).
    plain = Preparation.of(Recipe(invariance_probe=0))
    steal(tmp_path / "plain", target, 40, preparation=plain)
    others = {r["query_index"]: r for r in fd.read_records(str(tmp_path / "plain"))}
    assert all(others[k]["image_png"] == records[k]["image_png"] for k in (*range(10), 35))
    assert others[15]["image_png"] != records[15]["image_png"]
    with pytest.raises(UserInputError, match="--invariance_probe=10"):
        steal(tmp_path / "p", target, 60, preparation=plain)
    # A query selection reorders what follows its exploration: the probe shrinks to fit.
    small = Preparation.of(Recipe(npd_adapt_after=30, invariance_probe=512))
    assert fit_probe(small, "entropy").probe == 10
    assert fit_probe(small, "random").probe == 512
    default = Preparation.of(Recipe(invariance_probe=512))  # 3 x 512 <= 2048
    assert fit_probe(default, "entropy").probe == 512


def test_pacing_widens_after_a_rate_limited_refusal_and_recovers():
    """A refusal slows the client-side pacing a little and skips a slot; answers bring it
    back towards --max_qps, never faster; refusals of requests sent before the last
    slow-down do not slow it again."""
    import time

    from copycat_tf.attack.dispatch import RateLimiter

    limiter = RateLimiter(10.0)
    assert limiter.interval == limiter.nominal == 0.1
    ticket = limiter.acquire()
    limiter.refused(ticket)
    assert limiter.interval == pytest.approx(0.1 * RateLimiter.WIDEN)
    limiter.refused(ticket)  # sent before the slow-down: says nothing about the new pace
    assert limiter.interval == pytest.approx(0.1 * RateLimiter.WIDEN)
    start = time.monotonic()
    limiter.acquire()  # the refused slot is skipped: the next one is an interval away
    assert time.monotonic() - start >= 0.1
    for _ in range(100):
        limiter.refused()
    assert limiter.interval == pytest.approx(0.1 * RateLimiter.MAX_WIDENING)
    for _ in range(5000):
        limiter.accepted()
    assert limiter.interval == limiter.nominal


def test_pacing_starts_when_a_target_without_a_given_limit_refuses():
    from copycat_tf.attack.dispatch import RateLimiter

    limiter = RateLimiter(0.0)
    ticket = limiter.acquire()
    assert limiter.interval == 0.0
    limiter.refused(ticket)  # no answer yet: a first guess
    assert limiter.interval == RateLimiter.FIRST_GUESS_S
    limiter.refused(limiter.acquire())
    assert limiter.interval == pytest.approx(RateLimiter.FIRST_GUESS_S * RateLimiter.PROBE_WIDEN)
    limiter.accepted()
    assert limiter.interval == pytest.approx(
        RateLimiter.FIRST_GUESS_S * RateLimiter.PROBE_WIDEN * RateLimiter.PROBE_NARROW
    )
    # After answers, the pace starts at the gap between them.
    answered = RateLimiter(0.0)
    for _ in range(3):
        answered.accepted()
    answered.refused(answered.acquire())
    assert 0 < answered.interval < RateLimiter.FIRST_GUESS_S
