"""The steal as independent ranges of stream positions (the engine of `steal --runner`).

A range [start, end) of NPD stream positions is a unit of work any worker can do alone:
its items are pure functions of (spec, seed, position, adapted arm weights), so a range
sends the same images wherever it runs. Each answered request is written at once to the
range's staging folder as its own file; when every request of the range is answered, its
records are committed as one TFRecord shard and a summary JSON (the commit mark) beside
the dataset. A range whose summary exists is never queried again, and a range retried
after a crash re-sends only the requests it has no staging file for.

`plan_wave` decides which positions come next so that the budget is met exactly and the
records are those of the in-process engine: the first positions of the stream, in order,
until `query_budget` items were answered (unreadable items skipped). All I/O goes through
`tf.io.gfile`, so the output directory may be any location TensorFlow can write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
import uuid

import numpy as np

from copycat_tf.attack.dispatch import Dispatcher
from copycat_tf.attack.label_modes import parse_label_mode
from copycat_tf.attack.producer import NpdBatch
from copycat_tf.attack.steal import StealConfig, answer_records
from copycat_tf.data.images import png_bytes
from copycat_tf.data.npd import NpdStream
from copycat_tf.data.preparation import Preparation
from copycat_tf.recipe import Recipe
from copycat_tf.targets.base import TargetError
from copycat_tf.targets.registry import open_target

RANGES_DIR = ".ranges"  # summaries, identity and staging, beside the shards
IDENTITY = "identity.json"


def gfile():
    """tf.io.gfile (TensorFlow imported on first use)."""
    import tensorflow as tf

    return tf.io.gfile


@dataclasses.dataclass(frozen=True)
class Range:
    """Stream positions [start, end) and the arm weights positions past the exploration
    are prepared with (None before it, or when the preparation does not adapt)."""

    start: int
    end: int
    arm_weights: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        return f"{self.start:012d}-{self.end:012d}"

    @property
    def shard(self) -> str:
        return f"fake-{self.name}.tfrecord"


def summary_path(output_dir: str, name: str) -> str:
    return os.path.join(output_dir, RANGES_DIR, f"{name}.json")


def write_bytes(path: str, data: bytes) -> None:
    """Writes a file whole or not at all (temp name, then rename over)."""
    fs = gfile()
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.GFile(tmp, "wb") as f:
        f.write(data)
    fs.rename(tmp, path, overwrite=True)


def read_json(path: str) -> dict:
    with gfile().GFile(path, "rb") as f:
        return json.loads(f.read())


def write_json(path: str, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _write_records(path: str, records: list[bytes]) -> None:
    """A TFRecord file written whole or not at all."""
    import tensorflow as tf

    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.TFRecordWriter(tmp) as writer:
        for record in records:
            writer.write(record)
    gfile().rename(tmp, path, overwrite=True)


def _sha256(path: str) -> str:
    with gfile().GFile(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_records(path: str) -> list[bytes]:
    import tensorflow as tf

    return [bytes(r) for r in tf.data.TFRecordDataset(path).as_numpy_iterator()]


def committed_summaries(output_dir: str) -> dict[tuple[int, int], dict]:
    """{(start, end): summary} of every committed range."""
    fs = gfile()
    pattern = os.path.join(output_dir, RANGES_DIR, "*-*.json")
    out = {}
    for path in fs.glob(pattern):
        summary = read_json(path)
        out[(summary["start"], summary["end"])] = summary
    return out


@dataclasses.dataclass
class Wave:
    """The next positions to cover: committed ranges reused, new ones to query."""

    end: int  # the wave covers [its start, end)
    reused: list[dict]
    new: list[tuple[int, int]]


def plan_wave(
    start: int,
    deficit: int,
    committed: dict[tuple[int, int], dict],
    range_size: int,
    stop_at: int | None = None,
) -> Wave:
    """The positions after `start` that can give at most `deficit` answers.

    Walks on from `start`: a committed range is reused whole (its answers are known), a
    gap becomes new ranges cut at multiples of `range_size`, each counted as if every
    position answered (skips are made up by the next wave). Stops once `deficit` answers
    may be reached, or at `stop_at` (the exploration's end).

    Raises:
      ValueError: a committed range starting here holds more answers than the budget
        leaves (the directory was filled with a larger budget than this run's).
    """
    limit = stop_at
    starts = sorted(k for k in committed if k[0] >= start)
    position, room = start, deficit
    reused: list[dict] = []
    new: list[tuple[int, int]] = []
    i = 0
    while room > 0 and (limit is None or position < limit):
        if i < len(starts) and starts[i][0] == position:
            summary = committed[starts[i]]
            if summary["records"] > room:
                raise ValueError(
                    f"positions {summary['start']}-{summary['end']} were answered "
                    f"{summary['records']} times but only {room} answers remain in the budget"
                )
            reused.append(summary)
            room -= summary["records"]
            position = summary["end"]
            i += 1
            continue
        gap_end = position + room
        if i < len(starts):
            gap_end = min(gap_end, starts[i][0])
        if limit is not None:
            gap_end = min(gap_end, limit)
        cell_end = (position // range_size + 1) * range_size
        end = min(gap_end, cell_end)
        new.append((position, end))
        room -= end - position
        position = end
    return Wave(position, reused, new)


class RangeWorker:
    """Queries ranges of the stream for one steal (one per worker process).

    Args:
      cfg: the steal's configuration (target, NPD, label mode, batching, retries).
      input_shape: what the target takes (H, W, C).
      num_classes: the target's label space.
      max_qps: this worker's share of the client-side request rate (0: no limit).
    """

    def __init__(self, cfg: StealConfig, input_shape, num_classes: int, max_qps: float):
        self.cfg = cfg
        self.shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.max_qps = max_qps
        self.mode = parse_label_mode(cfg.label_mode)
        self.client = None
        self.stream = None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def open(self) -> None:
        cfg = self.cfg
        self.client = open_target(cfg.target, **cfg.target_options)
        self.stream = NpdStream(
            cfg.npd,
            self.shape,
            cfg.seed,
            cfg.crops_per_image,
            0,
            1,
            cfg.npd_data_dir,
            cfg.preparation or Preparation.of(Recipe()),
        )

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def process(self, r: Range) -> dict:
        """Answers a range (or finds it committed); returns its summary.

        Raises:
          TargetError: a request failed for good (answers so far stay staged).
        """
        fs = gfile()
        out = self.cfg.output_dir
        done = summary_path(out, r.name)
        if fs.exists(done):
            return read_json(done)
        started = time.monotonic()
        staging = os.path.join(out, RANGES_DIR, r.name)
        fs.makedirs(staging)
        self.stream.arm_weights = None if r.arm_weights is None else np.array(r.arm_weights)
        batches = _Batches(self.stream, r, self.cfg.query_batch_size)  # made as they are sent
        answered: dict[int, list[tuple[int, bytes, int]]] = {}
        counts = self._query(batches, answered, staging)
        skips, ended_at = batches.skips, batches.ended_at
        records = [rec for j in range(batches.count) for rec in answered[j]]
        summary = {
            "start": r.start,
            "end": r.end,
            "records": len(records),
            "labels": [[k, label] for k, _, label in records],
            "skips": [{"index": k, "source_id": s, "error": e} for k, s, e in skips],
            "ended_at": ended_at,
            "worker": self.worker,
            "seconds": round(time.monotonic() - started, 3),
            **counts,
        }
        if records:
            path = os.path.join(out, r.shard)
            _write_records(path, [payload for _, payload, _ in records])
            summary["shard"] = {
                "file": r.shard,
                "records": len(records),
                "sha256": _sha256(path),
                "first_index": records[0][0],
                "last_index": records[-1][0],
            }
        write_json(done, summary)  # the commit: from here on the range is never re-sent
        fs.rmtree(staging)
        return summary

    def _staged(self, path: str) -> list[tuple[int, bytes, int]]:
        from copycat_tf.data import fake_dataset as fd

        out = []
        for payload in _read_records(path):
            example = fd.parse_example(payload)
            out.append((int(example["query_index"]), payload, int(example["label"])))
        return out

    def _query(self, batches: _Batches, answered: dict, staging: str) -> dict:
        """Sends the range's requests not answered yet (a request staged by an earlier
        attempt is read back instead), each answer staged the moment it arrives. The next
        request's images are computed while the earlier ones are in flight."""
        counts = {"requests": 0, "retries": 0, "transient_errors": 0}
        cfg = self.cfg
        dispatcher = Dispatcher(
            self.client, self.num_classes, cfg.max_in_flight, cfg.retry, self.max_qps
        )
        error: TargetError | None = None
        pending = iter(batches)
        more = True
        try:
            while (more and error is None) or dispatcher.busy:
                while more and error is None and dispatcher.has_room:
                    try:
                        j, batch = next(pending)
                    except StopIteration:
                        more = False
                        break
                    path = os.path.join(staging, f"{j:05d}.tfrecord")
                    if gfile().exists(path):
                        answered[j] = self._staged(path)
                        continue
                    dispatcher.submit((j, batch), np.stack(batch.images), batch.pngs)
                for (j, batch), answer in dispatcher.completed(timeout_s=0.05):
                    if isinstance(answer, TargetError):
                        error = error or answer
                        continue
                    records = answer_records(batch, answer, self.mode, self.shape)
                    _write_records(
                        os.path.join(staging, f"{j:05d}.tfrecord"),
                        [payload for _, payload, _ in records],
                    )
                    answered[j] = records
        finally:
            dispatcher.shutdown()
            for name, n in dispatcher.stats.take().items():
                counts[name] += n
        if error is not None:
            raise error
        return counts


class _Batches:
    """The requests of a range in order, (j, NpdBatch of batch-size queries), computed as
    they are taken; afterwards `count`, the skipped items and where the stream ended in
    the range (None: it did not)."""

    def __init__(self, stream: NpdStream, r: Range, size: int):
        self.stream, self.range, self.size = stream, r, size
        self.count = 0
        self.skips: list[tuple[int, str, str]] = []
        self.ended_at: int | None = None

    def __iter__(self):
        batch = NpdBatch()
        for k in range(self.range.start, self.range.end):
            item = self.stream.item(k)
            if item is None:
                self.ended_at = k
                break
            if item.image is None:
                self.skips.append((k, item.source_id, item.error))
                continue
            batch.query.append(k)
            batch.images.append(item.image)
            batch.pngs.append(png_bytes(item.image))
            batch.sources.append(item.source_id)
            if len(batch.query) == self.size:
                yield self._take(batch)
                batch = NpdBatch()
        if batch.query:
            yield self._take(batch)

    def _take(self, batch: NpdBatch) -> tuple[int, NpdBatch]:
        self.count += 1
        return self.count - 1, batch
