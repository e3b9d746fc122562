"""train_copycat and evaluate: learning, balancing, soft labels, NPD+PD, bad input, reports."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from cli_util import error_lines, run_verb
from conftest import export_tiny_model, write_fashion_idx
from tensorboard.backend.event_processing import event_accumulator

from copycat_tf.attack.steal import StealConfig, steal
from copycat_tf.data import balance
from copycat_tf.data import fake_dataset as fd
from copycat_tf.errors import UserInputError
from copycat_tf.evaluation.report import EvaluateConfig, run_evaluate
from copycat_tf.recipe import Recipe
from copycat_tf.training.copycat import TrainCopycatConfig, run_train_copycat
from copycat_tf.training.target import TrainTargetConfig, run_train_target


def _train(epochs, lr=3e-3, batch=64):
    recipe = Recipe(epochs=epochs, batch_size=batch, learning_rate=lr, min_steps=0)
    return recipe.train_config(verbose=0)


@pytest.fixture(scope="module")
def attack(tmp_path_factory):
    """A trained tiny target (pattern data) and what steal took from it."""
    root = tmp_path_factory.mktemp("attack")
    data_dir = write_fashion_idx(str(root / "fm"), n_train=300, n_test=100)
    target = run_train_target(
        TrainTargetConfig(
            pd_data="fashion_mnist",
            model="small_cnn",
            workdir=str(root / "target"),
            data_dir=data_dir,
            train=dataclasses.replace(_train(4, batch=32), augment="none"),
        )
    )
    url = f"savedmodel:{target['export_dir']}"
    for name, npd, budget, mode in (
        ("npd", "synthetic:dead_leaves", 2000, "scores"),
        ("pd", "pd:fashion_mnist:train", 270, "hard"),
    ):
        steal(
            StealConfig(
                target=url,
                npd=npd,
                output_dir=str(root / f"fake_{name}"),
                query_budget=budget,
                query_batch_size=128,
                label_mode=mode,
                crops_per_image=1,
                records_per_shard=500,
                progress=False,
                npd_data_dir=data_dir,
            )
        )
    return {
        "root": root,
        "data_dir": data_dir,
        "target": url,
        "target_accuracy": target["test"]["accuracy"],
        "npd": str(root / "fake_npd"),
        "pd": str(root / "fake_pd"),
    }


def _evaluate(attack, copycat_dir, out):
    return run_evaluate(
        EvaluateConfig(
            target=attack["target"],
            copycat=copycat_dir,
            test_data="fashion_mnist:test",
            out=str(out),
            data_dir=attack["data_dir"],
        )
    )


def test_copycat_learns_from_stolen_labels_and_npd_pd_improves_it(attack, tmp_path):
    assert attack["target_accuracy"] > 0.9
    npd = run_train_copycat(
        TrainCopycatConfig(
            fake_dataset=[attack["npd"]],
            model="small_cnn",
            workdir=str(tmp_path / "c"),
            train=_train(4),
        )
    )
    stage = npd["stages"]["npd"]
    assert stage["heldout_agreement"] > 0.5  # it copies the target on NPD images (chance 0.1)
    report = _evaluate(attack, npd["export_dir"], tmp_path / "e")
    assert report["copycat"]["accuracy"] >= 0.2  # chance: 0.1
    assert report["agreement"] >= 0.2

    both = run_train_copycat(
        TrainCopycatConfig(
            fake_dataset=[attack["npd"]],
            pd_fake_dataset=[attack["pd"]],
            model="small_cnn",
            workdir=str(tmp_path / "c2"),
            train=_train(4),
            finetune=_train(8, batch=32),
        )
    )
    assert set(both["stages"]) == {"npd", "finetune"}
    assert os.path.isdir(tmp_path / "c2" / "finetune" / "checkpoints")
    report2 = _evaluate(attack, both["export_dir"], tmp_path / "e2")
    assert report2["agreement"] > max(0.6, report["agreement"])
    assert report2["ratio"]["accuracy"] > 0.6


def test_soft_labels_path(attack, tmp_path):
    out = run_train_copycat(
        TrainCopycatConfig(
            fake_dataset=[attack["npd"]],
            model="small_cnn",
            workdir=str(tmp_path / "s"),
            soft_labels=True,
            balance="none",
            train=_train(3),
        )
    )
    history = json.loads((tmp_path / "s" / "npd" / "checkpoints" / "state.json").read_text())
    losses = [h["train/loss"] for h in history["history"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert out["stages"]["npd"]["heldout_agreement"] > 0.5
    with pytest.raises(UserInputError, match="--soft_labels needs score vectors"):
        run_train_copycat(
            TrainCopycatConfig(
                fake_dataset=[attack["pd"]],
                model="small_cnn",
                workdir=str(tmp_path / "x"),
                soft_labels=True,
                train=_train(1),
            )
        )


@pytest.mark.parametrize("mode", ["replicate", "resample", "none"])
def test_balancing_gives_the_specified_distribution(mode):
    labels = np.array([0] * 50 + [1] * 8 + [3] * 2, np.int64)  # class 2 absent
    ds = tf.data.Dataset.from_tensor_slices((np.arange(60), labels))
    epoch, targets = balance.balanced(ds.cache(), np.bincount(labels, minlength=4), mode, seed=1)
    expected = {"replicate": [50, 20, 0, 20], "resample": [20, 20, 0, 20], "none": [50, 8, 0, 2]}[
        mode
    ]
    assert targets.tolist() == expected
    for _ in range(2):  # every epoch, exactly
        got = np.bincount([int(y) for _, y in epoch], minlength=4)
        assert got.tolist() == expected
    if mode == "replicate":  # a replicated class shows each of its images ~equally often
        ids = [int(x) for x, y in epoch if int(y) == 3]
        assert sorted(set(ids)) == [58, 59] and ids.count(58) == 10


def test_replication_cap():
    counts = np.array([500, 40, 0, 3])
    assert balance.class_targets(counts, "replicate").tolist() == [500, 181, 0, 181]
    # At most 4x a class's own records: 3 records are not shown 60 times each.
    assert balance.class_targets(counts, "replicate", 4).tolist() == [500, 160, 0, 12]
    assert balance.class_targets(counts, "resample", 4).tolist() == [181, 160, 0, 12]


def test_bad_fake_datasets(attack, tmp_path):
    import shutil

    def train(fake, **kw):
        return run_train_copycat(
            TrainCopycatConfig(
                fake_dataset=[fake],
                model=kw.pop("model", "small_cnn"),
                workdir=str(tmp_path / "w"),
                train=_train(1),
                **kw,
            )
        )

    with pytest.raises(UserInputError, match="holds no fake dataset"):
        train(str(tmp_path))
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(attack["pd"], corrupt)
    shard = os.path.join(corrupt, fd.read_manifest(corrupt)["shards"][0]["file"])
    with open(shard, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(UserInputError, match="corrupt"):
        train(corrupt)
    old = str(tmp_path / "old")
    shutil.copytree(attack["pd"], old)
    manifest = fd.read_manifest(attack["pd"])
    manifest["schema_version"] = 99
    with open(os.path.join(old, fd.MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(UserInputError, match="schema_version 99"):
        train(old)
    empty = str(tmp_path / "empty")
    shutil.copytree(attack["pd"], empty)
    manifest = fd.read_manifest(attack["pd"])
    manifest["shards"][0]["records"] = 0
    with open(os.path.join(empty, fd.MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(UserInputError, match="empty"):
        train(empty)
    # Weights of a model for other images do not fit this fake dataset's 28x28x1 images.
    from copycat_tf.models import registry

    other = registry.build_model("small_cnn", (16, 16, 1), 10)
    weights = str(tmp_path / "other.weights.h5")
    other.save_weights(weights)
    with pytest.raises(UserInputError, match="does not fit --model=small_cnn"):
        train(attack["pd"], weights=weights)
    assert not os.path.exists(tmp_path / "w" / "npd")


def test_evaluate_report_files(attack, tmp_path):
    copycat = run_train_copycat(
        TrainCopycatConfig(
            fake_dataset=[attack["pd"]],
            model="small_cnn",
            workdir=str(tmp_path / "c"),
            train=_train(1),
        )
    )
    out = tmp_path / "report"
    report = _evaluate(attack, copycat["export_dir"], out)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["num_examples"] == 100 and on_disk["target_queries_for_evaluation"] == 100
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix"):
        assert key in on_disk["target"] and key in on_disk["copycat"]
    assert on_disk["ratio"]["accuracy"] == pytest.approx(
        report["copycat"]["accuracy"] / report["target"]["accuracy"]
    )
    assert len(on_disk["copycat"]["per_class"]["f1"]) == 10
    markdown = (out / "report.md").read_text()
    assert "| accuracy |" in markdown and "| ankle boot |" in markdown
    for png in ("confusion_target.png", "confusion_copycat.png", "per_class_f1.png"):
        assert tf.io.decode_png((out / png).read_bytes()).shape[-1] in (3, 4)
    acc = event_accumulator.EventAccumulator(
        str(out / "tensorboard" / "eval"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    assert {
        "eval/agreement",
        "eval/ratio_accuracy",
        "eval/copycat_macro_f1",
        "eval/confusion_copycat",
    } <= set(acc.Tags()["tensors"])


def test_evaluate_class_count_mismatch(attack, tmp_path):
    three = export_tiny_model(str(tmp_path / "m3"))  # 16x16x1, 3 classes
    with pytest.raises(UserInputError, match="takes"):
        _evaluate(attack, three, tmp_path / "e")
    four = tmp_path / "f"
    write_fashion_idx(str(four))
    from copycat_tf.models import registry
    from copycat_tf.training import export

    eleven = export.export_classifier(
        registry.build_model("small_cnn", (28, 28, 1), 11),
        [str(i) for i in range(11)],
        (28, 28, 1),
        str(tmp_path / "m11"),
        "m",
    )
    with pytest.raises(UserInputError, match="11 classes but --test_data"):
        _evaluate(attack, eleven, tmp_path / "e")


def test_train_copycat_and_evaluate_cli(attack, tmp_path):
    proc = run_verb(
        "train_copycat",
        f"--fake_dataset={attack['pd']}",
        f"--workdir={tmp_path / 'c'}",
        "--epochs=1",
        "--min_steps=0",
        "--batch_size=32",
        "--verbose=0",
        "--balance=resample",
    )
    assert proc.returncode == 0, proc.stderr
    assert "held-out agreement with stolen labels" in proc.stdout
    export_dir = json.loads((tmp_path / "c" / "metrics.json").read_text())["export_dir"]
    proc = run_verb(
        "evaluate",
        f"--target={attack['target']}",
        f"--copycat={export_dir}",
        "--test_data=fashion_mnist:test",
        f"--data_dir={attack['data_dir']}",
        f"--out={tmp_path / 'e'}",
    )
    assert proc.returncode == 0, proc.stderr
    assert "copycat/target" in proc.stdout and "agreement with target" in proc.stdout
    for noise in ("oneDNN", "Sharding callback", "Assets written"):
        assert noise not in proc.stdout + proc.stderr
    bad = run_verb("train_copycat", f"--fake_dataset={tmp_path}", f"--workdir={tmp_path / 'd'}")
    assert bad.returncode != 0 and len(error_lines(bad)) == 1
    assert "holds no fake dataset" in bad.stderr


def test_first_n_queries_of_a_fake_dataset(attack):
    data = fd.load_fake_data([attack["npd"]])
    small = data.first(500)
    assert len(small.labels) == 500 and small.query_indices.max() == 499
    indices = sorted(int(r[3]) for r in small.records().as_numpy_iterator())
    assert indices == list(range(500))
    assert data.first(10**6) is data


def test_augment_auto_is_decided_by_the_fake_datasets_invariance_probe(attack, tmp_path):
    """A steal with the invariance probe (mirrors and shifts of its first queries):
    --augment=auto trains with what the probe's answers say, and records why; a dataset
    without a probe trains without flips; an explicit augment is kept as it is."""
    from copycat_tf.data import invariance
    from copycat_tf.data.preparation import Preparation
    from copycat_tf.training.copycat import format_summary

    probed = str(tmp_path / "probed")
    steal(
        StealConfig(
            target=attack["target"],
            npd="synthetic:dead_leaves",
            output_dir=probed,
            query_budget=3 * 64 + 40,
            query_batch_size=64,
            crops_per_image=1,
            progress=False,
            preparation=Preparation.of(Recipe(invariance_probe=64)),
        )
    )
    data = fd.load_fake_data([probed])
    assert data.probe == 64
    expected = invariance.analyse(data.query_indices, data.labels, data.probe)
    assert expected["pairs"] == 64  # every copy was answered
    auto = dataclasses.replace(_train(1), augment="auto")

    def train(fake, name, config):
        return run_train_copycat(
            TrainCopycatConfig(
                fake_dataset=[fake], model="small_cnn", workdir=str(tmp_path / name), train=config
            )
        )

    out = train(probed, "auto", auto)
    stage = out["stages"]["npd"]
    assert stage["invariance_probe"] == expected
    assert stage["augment"] == ("flip" if expected["flip"] else "none")
    assert f"--augment=auto -> {stage['augment']}" in format_summary(out)
    # The fixture's steals have no probe (the recipe's default): no evidence, no flips.
    plain = train(attack["pd"], "plain", auto)["stages"]["npd"]
    assert plain["augment"] == "none" and plain["invariance_probe"]["probe"] == 0
    assert "no invariance probe" in plain["invariance_probe"]["reason"]
    kept = train(probed, "kept", _train(1))["stages"]["npd"]
    assert kept["augment"] == Recipe.augment and "invariance_probe" not in kept


def test_workdir_resumes_through_another_link_to_the_same_fake_dataset(attack, tmp_path):
    """The recorded fake dataset is compared as a directory, not as the spelling of a path."""
    link = tmp_path / "linked_npd"
    os.symlink(attack["pd"], link)

    def train(fake, epochs):
        return run_train_copycat(
            TrainCopycatConfig(
                fake_dataset=[fake],
                model="small_cnn",
                workdir=str(tmp_path / "w"),
                train=_train(epochs),
            )
        )

    train(str(link), 1)
    out = train(attack["pd"], 2)  # the same directory by its real path: resumes
    state = json.loads((tmp_path / "w" / "npd" / "checkpoints" / "state.json").read_text())
    assert len(state["history"]) == 2 and out["stages"]["npd"]["heldout_agreement"] >= 0
    with pytest.raises(UserInputError, match="holds a different run .*fake_dataset"):
        train(attack["npd"], 2)


def test_soft_targets_are_the_answers_scores_as_a_distribution(attack, tmp_path):
    """A target rounding its probabilities (round:1) answers score vectors that do not sum
    to 1; the copycat trains on them normalised (as they were, training diverged)."""
    from server_util import ServerProcess

    from copycat_tf.training.copycat import soft_target, training_split

    model_dir = os.path.dirname(attack["target"].removeprefix("savedmodel:"))
    name = os.path.basename(model_dir)
    flags = (f"--model_base_path={model_dir}", f"--model_name={name}", "--output_defense=round:1")
    with ServerProcess(*flags, model=name) as s:
        steal(
            StealConfig(
                target=f"grpc://{s.grpc_target}/{name}",
                npd="synthetic:dead_leaves",
                output_dir=str(tmp_path / "fake"),
                query_budget=300,
                query_batch_size=100,
                label_mode="scores",
                crops_per_image=1,
                progress=False,
            )
        )
    records = fd.read_records(str(tmp_path / "fake"))
    sums = np.array([r["scores"].sum() for r in records])
    assert np.abs(sums - 1).max() > 0.05  # the rounded answers, as stored
    data = fd.load_fake_data([str(tmp_path / "fake")])
    train, *_ = training_split(data, 5, "replicate", True, 0, 0.0)
    targets = np.stack([y for _, y in train.as_numpy_iterator()])
    assert np.allclose(targets.sum(axis=1), 1.0, atol=1e-6) and (targets >= 0).all()
    by_answer = {tuple(np.round(r["scores"] / r["scores"].sum(), 5)) for r in records}
    assert {tuple(np.round(t, 5)) for t in targets} <= by_answer
    # An answer of zeros (nothing to distil) gives its label.
    _, target = soft_target(tf.zeros([2, 2, 1], tf.uint8), tf.constant(2, tf.int64), tf.zeros([3]))
    assert target.numpy().tolist() == [0.0, 0.0, 1.0]
