"""Problem-domain (PD) datasets: the labelled data a target is trained and judged on.

One spec string selects a dataset (see `parse_pd_spec`):

  fashion_mnist[:split]       IDX files (Debian `dataset-fashion-mnist`, --data_dir) or TFDS
  tfds:<name>[:split]         a TFDS image-classification dataset already in the data dir
  folder:<path>[:split]       one subfolder per class (optionally under train/ validation/ test/)

Every split is an unbatched `tf.data.Dataset` of `(uint8 image [H, W, C], int64 label)`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from copycat_tf.data.image_files import IMAGE_EXTENSIONS, list_images, looks_like_image
from copycat_tf.errors import UserInputError

SPLITS = ("train", "validation", "test")
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Fraction of a dataset without its own validation/test split that is held out for each.
HOLDOUT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class PDSpec:
    """A parsed problem-domain spec.

    Attributes:
      kind: "fashion_mnist", "tfds" or "folder".
      name: the TFDS name or folder path ("" for fashion_mnist).
      split: "train", "validation", "test" or None (all splits).
    """

    kind: str
    name: str
    split: str | None


@dataclasses.dataclass
class ProblemDomain:
    """The splits of one PD dataset and what a model needs to know about it."""

    name: str
    splits: dict[str, tf.data.Dataset]
    sizes: dict[str, int]
    class_names: list[str]
    input_shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> tf.data.Dataset:
        """Returns one split, with a clear error when the dataset lacks it."""
        if name not in self.splits:
            raise UserInputError(
                f"problem-domain data {self.name!r} has no {name!r} split; "
                f"it has {sorted(self.splits)}"
            )
        return self.splits[name]


def parse_pd_spec(spec: str) -> PDSpec:
    """Parses `fashion_mnist`, `tfds:<name>` or `folder:<path>`, each with optional `:<split>`.

    Raises:
      UserInputError: the spec names no known kind of dataset.
    """
    text = spec.strip()
    split = None
    head, sep, tail = text.rpartition(":")
    if sep and tail in SPLITS:
        text, split = head, tail
    if text == "fashion_mnist":
        return PDSpec("fashion_mnist", "", split)
    kind, sep, name = text.partition(":")
    if sep and kind in ("tfds", "folder") and name:
        return PDSpec(kind, name, split)
    raise UserInputError(
        f"problem-domain spec {spec!r} is not understood; expected 'fashion_mnist', "
        "'tfds:<name>' or 'folder:<path>', optionally followed by ':train', ':validation' "
        "or ':test' (e.g. 'fashion_mnist:test')"
    )


def load_problem_domain(
    spec: str | PDSpec,
    data_dir: str | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> ProblemDomain:
    """Loads every split of a PD dataset.

    Args:
      spec: a PD spec string or parsed `PDSpec` (its split is ignored here; use
        `ProblemDomain.split`).
      data_dir: fashion_mnist: the folder with the IDX files; tfds: the TFDS data dir.
        Ignored for folder specs.
      image_size: (height, width) to resize every image to; None keeps the dataset's size
        (for folders: the size of the first image).
      seed: fixes which training examples are held out when the dataset has no
        validation split of its own.

    Returns:
      The dataset's splits, sizes, class names and input shape.

    Raises:
      UserInputError: unknown spec, missing or corrupt data.
    """
    if isinstance(spec, str):
        spec = parse_pd_spec(spec)
    if spec.kind == "fashion_mnist":
        domain = _load_fashion_mnist(data_dir, seed)
    elif spec.kind == "tfds":
        domain = _load_tfds(spec.name, data_dir, image_size)
    else:
        domain = _load_folder(spec.name, image_size)
    if image_size is not None and tuple(domain.input_shape[:2]) != tuple(image_size):
        domain = _resized(domain, image_size)
    return domain


def load_split(
    spec: str, data_dir: str | None = None, image_size: tuple[int, int] | None = None
) -> tuple[ProblemDomain, tf.data.Dataset]:
    """Loads the split a spec names (default "test") and the dataset it belongs to."""
    parsed = parse_pd_spec(spec)
    domain = load_problem_domain(parsed, data_dir=data_dir, image_size=image_size)
    return domain, domain.split(parsed.split or "test")


def resize_images(images: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """Resizes uint8 image(s) to `size` = (height, width) and returns uint8 again."""
    resized = tf.image.resize(images, size, method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def _resized(domain: ProblemDomain, size: tuple[int, int]) -> ProblemDomain:
    splits = {
        name: ds.map(lambda x, y: (resize_images(x, size), y), num_parallel_calls=tf.data.AUTOTUNE)
        for name, ds in domain.splits.items()
    }
    shape = (int(size[0]), int(size[1]), domain.input_shape[2])
    return dataclasses.replace(domain, splits=splits, input_shape=shape)


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes.

    Raises:
      UserInputError: the file is truncated, not IDX, or not of unsigned bytes.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserInputError(
            f"IDX file {path} cannot be read ({e}); re-install or re-download it"
        ) from e
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise UserInputError(
            f"IDX file {path} is corrupt: expected an IDX header of unsigned bytes "
            f"(00 00 08 0N), got {data[:4].hex()}; re-install or re-download it"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserInputError(f"IDX file {path} is corrupt: header truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise UserInputError(
            f"IDX file {path} is corrupt: dimensions {dims} need {expected} bytes of data, "
            f"found {len(data) - header}; re-install or re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise UserInputError(
        f"Fashion-MNIST file {stem}(.gz) missing from {directory}; expected the four IDX "
        "files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (optionally .gz)"
    )


def _read_fashion_mnist_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    image_path = _find_idx(directory, _FASHION_MNIST_FILES[split][0])
    label_path = _find_idx(directory, _FASHION_MNIST_FILES[split][1])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise UserInputError(
            f"{image_path}: expected images of shape [N, 28, 28], got {list(images.shape)}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserInputError(
            f"{label_path}: expected {len(images)} labels to match {image_path}, "
            f"got shape {list(labels.shape)}"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserInputError(f"{label_path}: label {labels.max()} is outside 0..9")
    return images[..., None], labels.astype(np.int64)


def _fashion_mnist_from_tfds() -> ProblemDomain:
    import tensorflow_datasets as tfds

    builder = tfds.builder("fashion_mnist")
    builder.download_and_prepare()
    return _domain_from_tfds_builder(builder, None)


def _load_fashion_mnist(data_dir: str | None, seed: int) -> ProblemDomain:
    directory = data_dir or FASHION_MNIST_DEFAULT_DIR
    if not os.path.isdir(directory):
        if data_dir:
            raise UserInputError(
                f"Fashion-MNIST data directory {data_dir} does not exist; pass the folder "
                "holding the IDX files (train-images-idx3-ubyte.gz, ...)"
            )
        try:
            return _fashion_mnist_from_tfds()
        except Exception as e:
            raise UserInputError(
                f"Fashion-MNIST not found: {FASHION_MNIST_DEFAULT_DIR} does not exist and the "
                f"TFDS download failed ({type(e).__name__}). Install the Debian package "
                "(apt-get install dataset-fashion-mnist), or pass --data_dir=<folder with "
                "the IDX files>, or prepare TFDS 'fashion_mnist' on a machine with network"
            ) from e
    train_x, train_y = _read_fashion_mnist_split(directory, "train")
    test_x, test_y = _read_fashion_mnist_split(directory, "test")
    order = np.random.default_rng(seed).permutation(len(train_x))
    n_val = round(len(train_x) * HOLDOUT_FRACTION)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    arrays = {
        "train": (train_x[train_idx], train_y[train_idx]),
        "validation": (train_x[val_idx], train_y[val_idx]),
        "test": (test_x, test_y),
    }
    return ProblemDomain(
        name="fashion_mnist",
        splits={k: tf.data.Dataset.from_tensor_slices(v) for k, v in arrays.items()},
        sizes={k: len(v[1]) for k, v in arrays.items()},
        class_names=list(FASHION_MNIST_CLASSES),
        input_shape=(28, 28, 1),
    )


# ----------------------------------------------------------------------------- TFDS


def tfds_builder(name: str, data_dir: str | None):
    """The TFDS builder of a prepared dataset (registered or found on disk)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        builder = None
    if builder is not None and builder.is_prepared():
        return builder
    # A dataset prepared elsewhere may be on disk without its builder class registered here.
    root = os.path.join(data_dir or tfds.core.constants.DATA_DIR, name)
    infos = []
    for dirpath, _, files in os.walk(root):
        if "dataset_info.json" in files:
            infos.append(dirpath)
    if infos:
        return tfds.builder_from_directory(sorted(infos)[-1])
    raise UserInputError(
        f"TFDS dataset {name!r} is not prepared in {data_dir or tfds.core.constants.DATA_DIR}; "
        f"prepare it there first (e.g. `tfds build {name} --data_dir=<dir>` on a machine "
        "with network, then copy the folder) and pass --data_dir"
    )


def _domain_from_tfds_builder(builder, image_size: tuple[int, int] | None) -> ProblemDomain:
    info = builder.info
    keys = info.supervised_keys
    if not keys or len(keys) != 2:
        raise UserInputError(
            f"TFDS dataset {info.name!r} has no (image, label) supervised keys; "
            "expected an image-classification dataset"
        )
    image_key, label_key = keys
    label_feature = info.features[label_key]
    if not hasattr(label_feature, "names"):
        raise UserInputError(f"TFDS dataset {info.name!r}: {label_key!r} is not a ClassLabel")
    shape = tuple(info.features[image_key].shape)
    if len(shape) != 3 or shape[2] not in (1, 3):
        raise UserInputError(
            f"TFDS dataset {info.name!r}: image feature has shape {shape}; expected "
            "[H, W, 1] or [H, W, 3]"
        )
    if None in shape[:2] and image_size is None:
        raise UserInputError(
            f"TFDS dataset {info.name!r} has images of varying size {shape}; "
            "pass --image_size=<H>[x<W>] to resize them"
        )
    available = set(info.splits.keys())
    if "train" not in available:
        raise UserInputError(f"TFDS dataset {info.name!r} has no 'train' split: {available}")
    # Splits the dataset lacks are carved, in order, from the end of its train split.
    pct = int(HOLDOUT_FRACTION * 100)
    holdouts = [s for s in ("validation", "test") if s not in available]
    plan = {s: s for s in SPLITS}
    start = 100 - pct * len(holdouts)
    if holdouts:
        plan["train"] = f"train[:{start}%]"
    for i, s in enumerate(holdouts):
        plan[s] = f"train[{start + i * pct}%:{start + (i + 1) * pct}%]"
    splits, sizes = {}, {}
    for split, tfds_split in plan.items():
        ds = builder.as_dataset(split=tfds_split, as_supervised=True, shuffle_files=False)
        ds = ds.map(
            lambda x, y: (tf.cast(x, tf.uint8), tf.cast(y, tf.int64)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        if image_size is not None:
            ds = ds.map(
                lambda x, y: (resize_images(x, image_size), y),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        splits[split] = ds
        sizes[split] = int(info.splits[tfds_split].num_examples)
    height, width = image_size if image_size is not None else shape[:2]
    return ProblemDomain(
        name=f"tfds:{info.name}",
        splits=splits,
        sizes=sizes,
        class_names=list(label_feature.names),
        input_shape=(int(height), int(width), int(shape[2])),
    )


def _load_tfds(
    name: str, data_dir: str | None, image_size: tuple[int, int] | None
) -> ProblemDomain:
    return _domain_from_tfds_builder(tfds_builder(name, data_dir), image_size)


# ----------------------------------------------------------------------------- folders


def _class_files(root: str) -> dict[str, list[str]]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return {c: list_images(os.path.join(root, c)) for c in classes}


def _hash_split(path: str) -> str:
    """Deterministic 80/10/10 assignment of a file to a split, stable as files are added."""
    bucket = int(hashlib.sha1(os.path.basename(path).encode()).hexdigest(), 16) % 100
    pct = int(HOLDOUT_FRACTION * 100)
    if bucket < pct:
        return "test"
    if bucket < 2 * pct:
        return "validation"
    return "train"


def _load_folder(root: str, image_size: tuple[int, int] | None) -> ProblemDomain:
    if not os.path.isdir(root):
        raise UserInputError(
            f"problem-domain folder {root} does not exist; expected one subfolder of images "
            "per class (or train/, validation/, test/ each holding such subfolders)"
        )
    if os.path.isdir(os.path.join(root, "train")):
        per_split = {
            s: _class_files(os.path.join(root, s))
            for s in SPLITS
            if os.path.isdir(os.path.join(root, s))
        }
        class_names = sorted(per_split["train"])
        for split, classes in per_split.items():
            if sorted(classes) != class_names:
                raise UserInputError(
                    f"{root}/{split} has classes {sorted(classes)}, but train/ has "
                    f"{class_names}; every split needs the same class subfolders"
                )
    else:
        by_class = _class_files(root)
        class_names = sorted(by_class)
        per_split = {s: {c: [] for c in class_names} for s in SPLITS}
        for c, files in by_class.items():
            for f in files:
                per_split[_hash_split(f)][c].append(f)
    if len(class_names) < 2:
        raise UserInputError(
            f"problem-domain folder {root} has {len(class_names)} class subfolder(s); "
            "expected at least 2 (one subfolder of images per class)"
        )
    samples = {
        split: [(f, i) for i, c in enumerate(class_names) for f in classes[c]]
        for split, classes in per_split.items()
    }
    all_files = [f for items in samples.values() for f, _ in items]
    if not all_files:
        raise UserInputError(f"problem-domain folder {root} holds no images {IMAGE_EXTENSIONS}")
    bad = [f for f in all_files if not looks_like_image(f)]
    if bad:
        raise UserInputError(
            f"{len(bad)} file(s) under {root} are not readable images, e.g. {bad[:3]}; "
            "remove or replace them"
        )
    first = tf.io.decode_image(tf.io.read_file(all_files[0]), expand_animations=False)
    channels = int(first.shape[-1]) if first.shape[-1] in (1, 3) else 3
    size = tuple(image_size) if image_size is not None else tuple(first.shape[:2])

    def decode(path, label):
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=channels, expand_animations=False
        )
        image.set_shape([None, None, channels])
        return resize_images(image, size), label

    splits = {}
    for split, items in samples.items():
        if not items:
            continue
        paths = tf.constant([f for f, _ in items])
        labels = tf.constant([y for _, y in items], dtype=tf.int64)
        ds = tf.data.Dataset.from_tensor_slices((paths, labels))
        splits[split] = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return ProblemDomain(
        name=f"folder:{root}",
        splits=splits,
        sizes={s: len(items) for s, items in samples.items() if items},
        class_names=class_names,
        input_shape=(int(size[0]), int(size[1]), channels),
    )
