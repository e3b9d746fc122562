"""The fake dataset: what `steal` writes and `train_copycat` reads (DESIGN.md "Contracts").

A directory of `fake-NNNNN-of-MMMMM.tfrecord` shards of tf.train.Example plus
`manifest.json`. NNNNN is the shard's position, MMMMM the number of shards planned for the
query budget when it was written; the manifest is the list of record: a shard file that
the manifest does not list does not belong to the dataset.

A shard is committed atomically: written under a temporary name, fsynced, renamed, and
only then added to the manifest (itself replaced atomically).
"""

from __future__ import annotations

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

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def shard_name(index: int, planned: int) -> str:
    return f"fake-{index:05d}-of-{max(planned, index + 1):05d}.tfrecord"


def make_example(
    image_png: bytes,
    shape: tuple[int, int, int],
    source_id: str,
    query_index: int,
    label: int,
    scores: np.ndarray | None = None,
) -> bytes:
    """One serialized tf.train.Example of the fake dataset."""

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
    if version != SCHEMA_VERSION:
        raise UserInputError(
            f"fake dataset manifest {path} has schema_version {version!r}; this copycat_tf "
            f"reads version {SCHEMA_VERSION}. Re-create it with this version's steal"
        )
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
