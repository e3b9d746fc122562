import keras
import numpy as np
import pytest

from copycat_tf.models import registry


@pytest.mark.parametrize(
    "name,shape",
    [
        ("small_cnn", (28, 28, 1)),
        ("deep_cnn", (28, 28, 1)),
        ("deep_cnn", (8, 8, 1)),
        ("plain_cnn", (28, 28, 1)),
        ("vgg16", (28, 28, 1)),
        ("alexnet", (32, 32, 3)),
        ("resnet18_v2", (32, 32, 3)),
    ],
)
def test_model_builds_and_fits_two_steps(name, shape):
    model = registry.build_model(name, shape, num_classes=4)
    assert model.output_shape == (None, 4)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(10, *shape)).astype("float32")
    y = rng.integers(0, 4, size=10)
    history = model.fit(x, y, batch_size=5, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert int(model.optimizer.iterations.numpy()) == 2
    logits = model.predict(x[:2], verbose=0)
    assert logits.dtype == np.float32 and logits.shape == (2, 4)


def test_logits_stay_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = registry.build_model("small_cnn", (16, 16, 1), 3)
        out = model(np.zeros((2, 16, 16, 1), "float32"))
        assert out.dtype == "float32"
        assert any(layer.compute_dtype == "bfloat16" for layer in model.layers)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'lenet'.*small_cnn"):
        registry.build_model("lenet", (28, 28, 1), 10)


@pytest.mark.parametrize("shape", [(28, 28), (28, 28, 2), (4, 4, 1)])
def test_bad_input_shape(shape):
    with pytest.raises(ValueError, match="unsupported"):
        registry.build_model("small_cnn", shape, 10)


def test_missing_weights_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        registry.build_model("vgg16", (32, 32, 3), 10, weights=str(tmp_path / "w.h5"))


def test_weights_file_round_trip(tmp_path):
    a = registry.build_model("small_cnn", (16, 16, 1), 3)
    path = str(tmp_path / "a.weights.h5")
    a.save_weights(path)
    b = registry.build_model("small_cnn", (16, 16, 1), 3, weights=path)
    x = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 1)).astype("float32")
    np.testing.assert_allclose(a.predict(x, verbose=0), b.predict(x, verbose=0), rtol=1e-6)
