import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import write_fashion_idx, write_idx

from copycat_tf.data import problem_domain as pd
from copycat_tf.errors import UserInputError


def _arrays(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return np.stack(xs), np.array(ys)


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("fashion_mnist", pd.PDSpec("fashion_mnist", "", None)),
        ("fashion_mnist:test", pd.PDSpec("fashion_mnist", "", "test")),
        ("tfds:cifar10:validation", pd.PDSpec("tfds", "cifar10", "validation")),
        ("folder:/data/x:y", pd.PDSpec("folder", "/data/x:y", None)),
        ("folder:/data/pets:train", pd.PDSpec("folder", "/data/pets", "train")),
    ],
)
def test_parse_spec(spec, expected):
    assert pd.parse_pd_spec(spec) == expected


@pytest.mark.parametrize("spec", ["mnist", "tfds:", "folder", "imagenet:test", ""])
def test_parse_spec_rejects_unknown(spec):
    with pytest.raises(UserInputError, match="not understood"):
        pd.parse_pd_spec(spec)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx(tmp_path, gz):
    directory = write_fashion_idx(str(tmp_path / "f"), n_train=100, n_test=30, gz=gz)
    domain = pd.load_problem_domain("fashion_mnist", data_dir=directory)
    assert domain.input_shape == (28, 28, 1)
    assert domain.num_classes == 10 and domain.class_names[0] == "t-shirt/top"
    assert domain.sizes == {"train": 90, "validation": 10, "test": 30}
    x, y = _arrays(domain.split("train"))
    assert x.shape == (90, 28, 28, 1) and x.dtype == np.uint8 and y.dtype == np.int64
    # Train and validation partition the IDX train file: nothing lost, nothing shared.
    xv, _ = _arrays(domain.split("validation"))
    seen = {a.tobytes() for a in x} | {a.tobytes() for a in xv}
    assert len(seen) == 100


def test_fashion_mnist_split_is_seeded(fashion_dir):
    a = _arrays(pd.load_problem_domain("fashion_mnist", fashion_dir, seed=1).split("validation"))
    b = _arrays(pd.load_problem_domain("fashion_mnist", fashion_dir, seed=1).split("validation"))
    c = _arrays(pd.load_problem_domain("fashion_mnist", fashion_dir, seed=2).split("validation"))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0])


def test_fashion_mnist_resize(fashion_dir):
    domain = pd.load_problem_domain("fashion_mnist", fashion_dir, image_size=(32, 32))
    x, _ = next(iter(domain.split("test").batch(4)))
    assert domain.input_shape == (32, 32, 1) and x.shape == (4, 32, 32, 1)
    assert x.dtype == tf.uint8


def test_load_split_picks_the_named_split(fashion_dir):
    domain, ds = pd.load_split("fashion_mnist:test", data_dir=fashion_dir)
    assert sum(1 for _ in ds) == domain.sizes["test"] == 40


def test_missing_data_dir(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        pd.load_problem_domain("fashion_mnist", data_dir=str(tmp_path / "nope"))


def test_missing_idx_file(fashion_dir):
    os.remove(os.path.join(fashion_dir, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(UserInputError, match="t10k-labels-idx1-ubyte"):
        pd.load_problem_domain("fashion_mnist", data_dir=fashion_dir)


def test_corrupt_idx_magic(fashion_dir):
    path = os.path.join(fashion_dir, "train-images-idx3-ubyte.gz")
    with open(path, "wb") as f:
        f.write(b"this is not an IDX file")
    with pytest.raises(UserInputError, match=r"train-images-idx3-ubyte\.gz.*(corrupt|read)"):
        pd.load_problem_domain("fashion_mnist", data_dir=fashion_dir)


def test_truncated_idx(tmp_path):
    directory = write_fashion_idx(str(tmp_path / "f"), gz=False)
    path = os.path.join(directory, "train-images-idx3-ubyte")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(UserInputError, match="corrupt: dimensions"):
        pd.load_problem_domain("fashion_mnist", data_dir=directory)


def test_idx_wrong_image_shape(tmp_path):
    directory = write_fashion_idx(str(tmp_path / "f"))
    write_idx(os.path.join(directory, "t10k-images-idx3-ubyte"), np.zeros((40, 32, 32)))
    with pytest.raises(UserInputError, match=r"expected images of shape \[N, 28, 28\]"):
        pd.load_problem_domain("fashion_mnist", data_dir=directory)


def test_idx_label_count_mismatch(tmp_path):
    directory = write_fashion_idx(str(tmp_path / "f"))
    write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte"), np.zeros(39))
    with pytest.raises(UserInputError, match="expected 40 labels"):
        pd.load_problem_domain("fashion_mnist", data_dir=directory)


def test_folder_hash_split(image_folder):
    domain = pd.load_problem_domain(f"folder:{image_folder}")
    assert domain.class_names == ["cat", "dog", "fox"]
    assert domain.input_shape == (16, 16, 3)
    assert sum(domain.sizes.values()) == 36
    x, y = _arrays(domain.split("train"))
    assert x.shape[1:] == (16, 16, 3) and set(y) <= {0, 1, 2}


def test_folder_with_split_subfolders(tmp_path, image_folder):
    root = tmp_path / "splits"
    for split in ("train", "test"):
        os.makedirs(root / split)
        for name in ("cat", "dog", "fox"):
            os.symlink(os.path.join(image_folder, name), root / split / name)
    domain = pd.load_problem_domain(f"folder:{root}", image_size=(8, 8))
    assert set(domain.splits) == {"train", "test"}
    assert domain.sizes == {"train": 36, "test": 36}
    assert domain.input_shape == (8, 8, 3)
    with pytest.raises(UserInputError, match="no 'validation' split"):
        domain.split("validation")


def test_folder_rejects_non_images(image_folder):
    with open(os.path.join(image_folder, "dog", "broken.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(UserInputError, match="not readable images"):
        pd.load_problem_domain(f"folder:{image_folder}")


def test_folder_missing_or_single_class(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        pd.load_problem_domain(f"folder:{tmp_path / 'none'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(UserInputError, match="at least 2"):
        pd.load_problem_domain(f"folder:{tmp_path / 'one'}")


def test_tfds_not_prepared(tmp_path):
    with pytest.raises(UserInputError, match="not prepared"):
        pd.load_problem_domain("tfds:mnist", data_dir=str(tmp_path))


def test_tfds_prepared_dataset(tmp_path):
    from tfds_fixtures import TinyShapes

    data_dir = str(tmp_path / "tfds")
    TinyShapes(data_dir=data_dir).download_and_prepare()
    domain = pd.load_problem_domain("tfds:tiny_shapes", data_dir=data_dir)
    assert domain.class_names == ["a", "b"] and domain.input_shape == (12, 12, 1)
    # No validation/test splits of its own: 10% each carved from the end of train.
    assert domain.sizes == {"train": 40, "validation": 5, "test": 5}
    x, y = _arrays(domain.split("test"))
    assert x.dtype == np.uint8 and y.dtype == np.int64 and len(x) == 5
