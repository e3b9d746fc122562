"""Export round trip: both signatures reproduce the in-memory model."""

import json
import os
import stat

import numpy as np
import pytest
import tensorflow as tf

from copycat_tf.errors import UserInputError
from copycat_tf.models import registry
from copycat_tf.training import export

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def model():
    return registry.build_model("small_cnn", (16, 16, 1), 3)


def _images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)


def test_round_trip_both_signatures(model, tmp_path):
    path = export.export_classifier(model, CLASSES, (16, 16, 1), str(tmp_path), "target")
    assert path == os.path.join(str(tmp_path), "target", "1")
    images = _images()
    expected = tf.nn.softmax(model(images.astype("float32"), training=False)).numpy()

    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "serving_bytes"}
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    assert out["scores"].dtype == tf.float32 and out["classes"].dtype == tf.int64
    np.testing.assert_allclose(out["scores"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["classes"].numpy(), expected.argmax(1))

    pngs = tf.constant([tf.io.encode_png(im).numpy() for im in images])
    out_b = loaded.signatures["serving_bytes"](image_bytes=pngs)
    np.testing.assert_allclose(out_b["scores"].numpy(), expected, rtol=1e-5, atol=1e-6)

    # Signature names as DESIGN.md fixes them.
    sig = loaded.signatures["serving_default"]
    assert list(sig.structured_input_signature[1]) == ["images"]
    assert set(sig.structured_outputs) == {"scores", "classes"}
    assert list(loaded.signatures["serving_bytes"].structured_input_signature[1]) == ["image_bytes"]
    assert export.read_class_names(path) == CLASSES
    with open(os.path.join(path, "assets.extra", "copycat_tf.json")) as f:
        info = json.load(f)
    assert info["input_shape"] == [16, 16, 1] and info["num_classes"] == 3


def test_serving_bytes_resizes_and_converts_channels(model, tmp_path):
    path = export.export_classifier(model, CLASSES, (16, 16, 1), str(tmp_path), "m")
    loaded = tf.saved_model.load(path)
    rgb = np.random.default_rng(3).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    jpeg = tf.io.encode_jpeg(rgb).numpy()
    out = loaded.signatures["serving_bytes"](image_bytes=tf.constant([jpeg]))
    assert out["scores"].shape == (1, 3)
    with pytest.raises(tf.errors.InvalidArgumentError):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant([b"not an image"]))


def test_versions_increment_and_existing_version_refused(model, tmp_path):
    base = str(tmp_path)
    export.export_classifier(model, CLASSES, (16, 16, 1), base, "m")
    second = export.export_classifier(model, CLASSES, (16, 16, 1), base, "m")
    assert second.endswith(os.path.join("m", "2"))
    with pytest.raises(UserInputError, match="already exists"):
        export.export_classifier(model, CLASSES, (16, 16, 1), base, "m", version=2)
    assert sorted(os.listdir(os.path.join(base, "m"))) == ["1", "2"]


def test_unwritable_directory(model, tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("a file where a directory should be")
        base = str(target)
    else:
        os.chmod(tmp_path, stat.S_IRUSR | stat.S_IXUSR)
        base = str(tmp_path)
    with pytest.raises(UserInputError, match="cannot be created|not writable"):
        export.export_classifier(model, CLASSES, (16, 16, 1), base, "m")


def test_failed_export_leaves_nothing_that_looks_valid(model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_classifier(model, CLASSES, (16, 16, 1), str(tmp_path), "m")
    assert os.listdir(tmp_path / "m") == []
