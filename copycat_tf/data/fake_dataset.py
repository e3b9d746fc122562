"""The fake dataset: what `steal` writes and `train_copycat` reads (DESIGN.md "Contracts").

A directory of `fake-NNNNN-of-MMMMM.tfrecord` shards of tf.train.Example plus
`manifest.json`. NNNNN is the shard's position, MMMMM the number of shards planned for the
query budget when it was written; the manifest is the list of record: a shard file that
the manifest does not list does not belong to the dataset.

A shard is committed atomically: written under a temporary name, fsynced, renamed, and
only then added to the manifest (itself replaced atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from copycat_tf.errors import UserInputError
from copycat_tf.workdir import atomic_write_json

# Example feature keys: defined once, used by writer and reader.
IMAGE_ENCODED = "image/encoded"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_CHANNELS = "image/channels"
IMAGE_SOURCE_ID = "image/source_id"
QUERY_INDEX = "query/index"
LABEL_STOLEN = "label/stolen"
LABEL_SCORES = "label/scores"
# Records chosen by a query selection round (steal --selection) also carry these.
QUERY_SELECTION = "query/selection"
QUERY_ROUND = "query/round"

MANIFEST = "manifest.json"
# 2: "harvest_seconds" became "steal_seconds" and the NPD record gained "preparation";
# version-1 manifests are read (upgraded in memory, written back as version 2 when a steal
# resumes them with --npd_legacy, which reproduces their pixels).
# A version-2 preparation record without "jitter_on" was made with the jitter on the whole
# canvas (read as jitter_on "canvas", which reproduces its pixels).
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


def shard_name(index: int, planned: int) -> str:
    return f"fake-{index:05d}-of-{max(planned, index + 1):05d}.tfrecord"


def make_example(
    image_png: bytes,
    shape: tuple[int, int, int],
    source_id: str,
    query_index: int,
    label: int,
    scores: np.ndarray | None = None,
    chosen_by: tuple[str, int] | None = None,
) -> bytes:
    """One serialized tf.train.Example of the fake dataset (`chosen_by`: the strategy and
    round of the query selection that chose it; readers that do not ask ignore it)."""

    def _int(v):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    def _bytes(v):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        IMAGE_ENCODED: _bytes(image_png),
        IMAGE_HEIGHT: _int(shape[0]),
        IMAGE_WIDTH: _int(shape[1]),
        IMAGE_CHANNELS: _int(shape[2]),
        IMAGE_SOURCE_ID: _bytes(source_id.encode()),
        QUERY_INDEX: _int(query_index),
        LABEL_STOLEN: _int(label),
    }
    if scores is not None:
        feature[LABEL_SCORES] = tf.train.Feature(
            float_list=tf.train.FloatList(value=np.asarray(scores, np.float32).tolist())
        )
    if chosen_by is not None:
        feature[QUERY_SELECTION] = _bytes(chosen_by[0].encode())
        feature[QUERY_ROUND] = _int(chosen_by[1])
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def parse_example(serialized: bytes) -> dict:
    """A fake-dataset Example as a plain dict (for tests and tools, not pipelines)."""
    example = tf.train.Example.FromString(serialized)
    f = example.features.feature
    record = {
        "image_png": f[IMAGE_ENCODED].bytes_list.value[0],
        "shape": (
            f[IMAGE_HEIGHT].int64_list.value[0],
            f[IMAGE_WIDTH].int64_list.value[0],
            f[IMAGE_CHANNELS].int64_list.value[0],
        ),
        "source_id": f[IMAGE_SOURCE_ID].bytes_list.value[0].decode(),
        "query_index": f[QUERY_INDEX].int64_list.value[0],
        "label": f[LABEL_STOLEN].int64_list.value[0],
    }
    if LABEL_SCORES in f:
        record["scores"] = np.array(f[LABEL_SCORES].float_list.value, np.float32)
    if QUERY_SELECTION in f:
        record["chosen_by"] = (
            f[QUERY_SELECTION].bytes_list.value[0].decode(),
            f[QUERY_ROUND].int64_list.value[0],
        )
    return record


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(directory: str, name: str, records: list[bytes]) -> str:
    """Writes a shard atomically (temp file, fsync, rename); returns its sha256."""
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}")
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in records:
            writer.write(record)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return digest


def read_manifest(directory: str) -> dict | None:
    """The manifest of a fake dataset, or None when the directory has none.

    Raises:
      UserInputError: the manifest is unreadable or of an unknown schema version.
    """
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserInputError(f"fake dataset manifest {path} is unreadable: {e}") from e
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise UserInputError(
            f"fake dataset manifest {path} has schema_version {version!r}; this copycat_tf "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}. Re-create it with this "
            "version's steal"
        )
    return _upgrade(manifest)


def _upgrade(manifest: dict) -> dict:
    """A manifest of any readable version as the current version."""
    if manifest["schema_version"] == 1:
        manifest["steal_seconds"] = manifest.pop("harvest_seconds", 0.0)
        manifest["npd"]["preparation"] = {"legacy": True}
        manifest["schema_version"] = 2
    manifest.setdefault("selection", "random")  # made before query selection existed
    preparation = (manifest.get("npd") or {}).get("preparation") or {}
    if preparation and not preparation.get("legacy"):
        preparation.setdefault("jitter_on", "canvas")  # made before jitter_on existed
        preparation.setdefault("probe", 0)  # made before the invariance probe existed
    return manifest


def write_manifest(directory: str, manifest: dict) -> None:
    atomic_write_json(os.path.join(directory, MANIFEST), manifest)


def shard_paths(directory: str, manifest: dict, verify: bool = True) -> list[str]:
    """Paths of the committed shards, checked against the manifest's sizes and sha256.

    Raises:
      UserInputError: a shard is missing, or its content differs from the manifest.
    """
    paths = []
    for shard in manifest["shards"]:
        path = os.path.join(directory, shard["file"])
        if not os.path.exists(path):
            raise UserInputError(
                f"fake dataset {directory}: shard {shard['file']} listed in the manifest is "
                "missing; restore it or re-run steal on this directory"
            )
        if verify and sha256_file(path) != shard["sha256"]:
            raise UserInputError(
                f"fake dataset {directory}: shard {shard['file']} is corrupt (sha256 differs "
                "from the manifest); delete it and its manifest entry, or re-run steal"
            )
        paths.append(path)
    return paths


def read_records(directory: str, verify: bool = True) -> list[dict]:
    """Every committed record of a fake dataset, in shard order, as dicts."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise UserInputError(f"{directory} holds no fake dataset ({MANIFEST} missing)")
    records = []
    for path in shard_paths(directory, manifest, verify):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            records.append(parse_example(raw))
    return records


# ----------------------------------------------------------------------------- reading

_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash: spreads query indices evenly


def holdout_mask(query_index, percent: int):
    """True for records held out for model selection (numpy or TF, same answer)."""
    h = (query_index * _HASH_MULTIPLIER) % (2**32)
    return h % 100 < percent


@dataclasses.dataclass
class FakeData:
    """One or more fake dataset directories (e.g. one per steal worker), checked.

    Attributes:
      directories: the steal output directories.
      paths: committed, verified shard files.
      input_shape: (H, W, C) of the stored images (the target's input).
      num_classes: the target's class count.
      labels, query_indices: every record's stolen label and NPD index (numpy).
      has_scores: whether records carry score vectors.
      target: the target identity recorded by steal.
      probe: the steal's invariance probe size (data.invariance; 0: none).
    """

    directories: list[str]
    paths: list[str]
    input_shape: tuple[int, int, int]
    num_classes: int
    labels: np.ndarray
    query_indices: np.ndarray
    has_scores: bool
    target: dict
    index_limit: int | None = None
    probe: int = 0

    def first(self, n: int) -> FakeData:
        """The records of the first n queries (by NPD index): a smaller attack's dataset."""
        if n >= len(self.labels):
            return self
        order = np.argsort(self.query_indices, kind="stable")
        keep = np.zeros(len(order), bool)
        keep[order[:n]] = True
        limit = int(self.query_indices[order[n - 1]]) + 1
        return dataclasses.replace(
            self,
            labels=self.labels[keep],
            query_indices=self.query_indices[keep],
            index_limit=limit,
        )

    def records(self) -> tf.data.Dataset:
        """(uint8 image [H, W, C], int64 label, float32 scores [K], int64 query index).

        Shards are read in parallel (interleave); scores are zeros for hard-label data.
        """
        h, w, c = self.input_shape
        k = self.num_classes
        spec = {
            IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string),
            QUERY_INDEX: tf.io.FixedLenFeature([], tf.int64),
            LABEL_STOLEN: tf.io.FixedLenFeature([], tf.int64),
            LABEL_SCORES: tf.io.FixedLenFeature([k], tf.float32, default_value=[0.0] * k),
        }

        def parse(raw):
            ex = tf.io.parse_single_example(raw, spec)
            image = tf.io.decode_png(ex[IMAGE_ENCODED], channels=c)
            image = tf.ensure_shape(image, [h, w, c])
            return image, ex[LABEL_STOLEN], ex[LABEL_SCORES], ex[QUERY_INDEX]

        files = tf.data.Dataset.from_tensor_slices(self.paths)
        # Deterministic interleave: the same records in the same order on every run.
        records = files.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(4, len(self.paths)),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        records = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        if self.index_limit is not None:
            limit = self.index_limit
            records = records.filter(lambda image, label, scores, index: index < limit)
        return records


def index_labels(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(query indices, stolen labels) of every record in the shard files, in file order
    (only those two features are parsed)."""
    spec = {
        QUERY_INDEX: tf.io.FixedLenFeature([], tf.int64),
        LABEL_STOLEN: tf.io.FixedLenFeature([], tf.int64),
    }
    indices, labels = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    raw = tf.data.TFRecordDataset(paths).batch(4096)
    for batch in raw.map(lambda r: tf.io.parse_example(r, spec)):
        indices.append(batch[QUERY_INDEX].numpy())
        labels.append(batch[LABEL_STOLEN].numpy())
    return np.concatenate(indices), np.concatenate(labels)


def _probe_of(manifests: list[dict]) -> int:
    """The invariance probe size the manifests agree on (0 when they do not, or have none)."""
    probes = {((m.get("npd") or {}).get("preparation") or {}).get("probe", 0) for m in manifests}
    return int(probes.pop()) if len(probes) == 1 else 0


def load_fake_data(directories: list[str], verify: bool = True) -> FakeData:
    """Opens fake dataset directories, verifying shards against their manifests.

    Raises:
      UserInputError: a missing/unknown-schema manifest, a missing or corrupt shard, an
        empty dataset, or directories from different targets or label spaces.
    """
    if not directories:
        raise UserInputError("no fake dataset given; pass --fake_dataset=<steal output dir>")
    manifests, paths = [], []
    for directory in directories:
        manifest = read_manifest(directory)
        if manifest is None:
            raise UserInputError(
                f"--fake_dataset {directory} holds no fake dataset ({MANIFEST} missing); "
                "pass a steal --output_dir"
            )
        paths.extend(shard_paths(directory, manifest, verify))
        manifests.append(manifest)
    first = manifests[0]
    for directory, m in zip(directories[1:], manifests[1:], strict=True):
        if m["target"] != first["target"] or m["label_mode"] != first["label_mode"]:
            raise UserInputError(
                f"fake datasets {directories[0]} and {directory} come from different targets "
                "or label modes; train on one attack's data at a time"
            )
    total = sum(m["records"] for m in manifests)
    if total == 0 or not paths:
        raise UserInputError(
            f"fake dataset {', '.join(directories)} has no committed records yet; run steal"
        )
    for m, directory in zip(manifests, directories, strict=True):
        for shard in m["shards"]:
            if shard["records"] <= 0:
                raise UserInputError(
                    f"fake dataset {directory}: shard {shard['file']} is empty in the manifest"
                )
    shape = tuple(first["target"]["input_shape"])
    num_classes = int(first["target"]["num_classes"])
    data = FakeData(
        directories=list(directories),
        paths=paths,
        input_shape=shape,
        num_classes=num_classes,
        labels=np.zeros(0, np.int64),
        query_indices=np.zeros(0, np.int64),
        has_scores=first["label_mode"] != "hard",
        target=first["target"],
        probe=_probe_of(manifests),
    )
    data.query_indices, data.labels = index_labels(paths)
    if len(data.labels) != total:
        raise UserInputError(
            f"fake dataset {', '.join(directories)}: shards hold {len(data.labels)} records, "
            f"manifests say {total}; re-run steal to repair"
        )
    return data
