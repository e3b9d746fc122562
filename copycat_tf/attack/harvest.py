"""The query engine: NPD images in, a durable fake dataset of stolen labels out.

Flow: a producer thread walks the NPD stream (`data.npd`) from the committed watermark,
encodes each image as PNG once (stored, and sent by REST/JSON clients) and hands batches
to the main loop, which sends them with up to `max_in_flight` concurrent requests (client
rate limit `max_qps`, retries with exponential backoff and full jitter on transient
errors). Each answer is appended to the journal at once; records are committed in stream
order as fixed-size shards (temp file, fsync, rename, then manifest). So a killed run
resumes after the last committed record, re-sends nothing answered, and ends with the same
records and shard boundaries as an uninterrupted run. The query budget (images answered)
is never exceeded.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import json
import math
import os
import queue
import sys
import threading
import time

import numpy as np
from absl import logging

from copycat_tf.attack.journal import RECORD, SKIP, Journal, skip_payload
from copycat_tf.data import fake_dataset as fd
from copycat_tf.data.images import png_bytes
from copycat_tf.data.npd import NpdStream
from copycat_tf.errors import UserInputError
from copycat_tf.targets.base import (
    PermanentError,
    Prediction,
    TargetError,
    TransientError,
    open_target,
    predict_with_retries,
)

JOURNAL_DIR = "journal"
TENSORBOARD_DIR = "tensorboard"


@dataclasses.dataclass
class HarvestConfig:
    """Everything `harvest` needs (the steal flags, minus process state).

    Attributes:
      target: target URL (see targets.base.open_target).
      npd: NPD spec (see data.npd).
      output_dir: the fake dataset directory (created; resumed when it holds this run).
      query_budget: images the target may answer in total (never exceeded).
      query_batch_size: images per request.
      max_in_flight: concurrent requests.
      max_qps: requests per second sent at most (0: no client-side limit).
      label_mode: "hard" (top-1), "topk:K" (K best scores kept) or "scores".
      seed: NPD order, crops and synthetic images.
      shard_index, num_shards: this worker's part of the NPD stream.
      crops_per_image: NPD items per source image.
      records_per_shard: records in each committed shard.
      timeout_s: per-request timeout.
      max_retries: retries of a transiently failing request before the run stops.
      backoff_base_s, backoff_max_s: exponential backoff (full jitter) bounds.
      num_classes: the target's class count when its metadata does not tell (label-only).
      npd_data_dir: TFDS data dir for tfds: NPD sources.
      target_options: client options (api_key, request_template, ...).
      progress: draw a progress line on stderr.
    """

    target: str
    npd: str
    output_dir: str
    query_budget: int
    query_batch_size: int = 64
    max_in_flight: int = 4
    max_qps: float = 0.0
    label_mode: str = "hard"
    seed: int = 0
    shard_index: int = 0
    num_shards: int = 1
    crops_per_image: int = 1
    records_per_shard: int = 10_000
    timeout_s: float = 30.0
    max_retries: int = 8
    backoff_base_s: float = 0.25
    backoff_max_s: float = 30.0
    num_classes: int = 0
    npd_data_dir: str | None = None
    target_options: dict = dataclasses.field(default_factory=dict)
    progress: bool = True


def parse_label_mode(mode: str) -> tuple[str, int]:
    """("hard", 0), ("topk", K) or ("scores", 0).

    Raises:
      UserInputError: any other mode.
    """
    if mode in ("hard", "scores"):
        return mode, 0
    kind, _, k = mode.partition(":")
    if kind == "topk" and k.isdigit() and int(k) >= 1:
        return "topk", int(k)
    raise UserInputError(f"--label_mode={mode!r} is invalid; expected hard, topk:K or scores")


def _stored_scores(mode: tuple[str, int], scores: np.ndarray | None):
    """The score vector a record keeps under a label mode (None for hard labels)."""
    if mode[0] == "hard":
        return None
    if scores is None:
        raise PermanentError(
            "the target answered without scores; use --label_mode=hard (the paper's setting)"
        )
    if mode[0] == "scores":
        return scores
    keep = np.argsort(-scores)[: mode[1]]
    out = np.zeros_like(scores)
    out[keep] = scores[keep]
    total = out.sum()
    return out / total if total > 0 else out


class RateLimiter:
    """At most `qps` acquisitions per second across threads (0: unlimited)."""

    def __init__(self, qps: float):
        self.interval = 1.0 / qps if qps > 0 else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)


@dataclasses.dataclass
class _Batch:
    """What the producer hands over: stream entries in order, some to query."""

    order: list[int]  # every index covered, in stream order
    query: list[int]  # indices to send
    images: list[np.ndarray]
    pngs: list[bytes]
    sources: list[str]
    skips: list[tuple[int, str, str]]  # (index, source_id, error)
    end: bool = False  # the stream is exhausted after this batch


@dataclasses.dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    transient_errors: int = 0
    answered: int = 0


def _identity(cfg: HarvestConfig, spec, mode: str, num_classes: int) -> dict:
    # The model, not its address: a resumed run may reach the same model on another port
    # or over the other API (the URL used is kept in target_details).
    return {
        "target": {
            "model": spec.details.get("model", cfg.target),
            "input_shape": list(spec.input_shape),
            "num_classes": num_classes,
        },
        "npd": {
            "spec": cfg.npd,
            "seed": cfg.seed,
            "crops_per_image": cfg.crops_per_image,
            "shard_index": cfg.shard_index,
            "num_shards": cfg.num_shards,
        },
        "label_mode": mode,
        "records_per_shard": cfg.records_per_shard,
    }


def _check_output_dir(directory: str, identity: dict) -> dict | None:
    """The manifest to resume, None for a fresh directory; refuses anything else."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserInputError(f"--output_dir {directory} is a file; pass a directory")
    manifest = fd.read_manifest(directory) if os.path.isdir(directory) else None
    if manifest is None:
        if os.path.isdir(directory) and os.listdir(directory):
            raise UserInputError(
                f"--output_dir {directory} is not empty and holds no fake dataset "
                f"({fd.MANIFEST}); pass an empty or new directory"
            )
        return None
    differs = [k for k in identity if manifest.get(k) != identity[k]]
    if differs:
        detail = "; ".join(f"{k}: {manifest.get(k)} != {identity[k]}" for k in differs)
        raise UserInputError(
            f"--output_dir {directory} holds a fake dataset of another run ({detail}); use a "
            "new --output_dir, or the original --target/--npd/--seed/--label_mode to resume"
        )
    return manifest


class _Harvester:
    def __init__(self, cfg: HarvestConfig):
        self.cfg = cfg
        self.mode = parse_label_mode(cfg.label_mode)
        if cfg.query_budget < 1:
            raise UserInputError(f"--query_budget={cfg.query_budget}; expected at least 1")
        self.client = open_target(cfg.target, **cfg.target_options)
        try:
            self.spec = self.client.describe()
        except TransientError as e:
            raise UserInputError(
                f"target {cfg.target} is unreachable or unavailable ({e}); start the model "
                "server or check the URL"
            ) from e
        except PermanentError as e:
            raise UserInputError(f"target {cfg.target} refused the metadata request: {e}") from e
        if self.mode[0] != "hard" and self.spec.has_scores is False:
            raise UserInputError(
                f"target {cfg.target} answers labels only (no scores); --label_mode="
                f"{cfg.label_mode} needs scores. Use --label_mode=hard"
            )
        self.num_classes = cfg.num_classes or self.spec.num_classes
        if self.num_classes < 2:
            raise UserInputError(
                f"target {cfg.target} does not say how many classes it has (label-only "
                "answers); pass --num_classes"
            )
        self.stream = NpdStream(
            cfg.npd,
            self.spec.input_shape,
            cfg.seed,
            cfg.crops_per_image,
            cfg.shard_index,
            cfg.num_shards,
            cfg.npd_data_dir,
        )
        self.identity = _identity(cfg, self.spec, cfg.label_mode, self.num_classes)
        self.manifest = _check_output_dir(cfg.output_dir, self.identity)
        self.journal = Journal(os.path.join(cfg.output_dir, JOURNAL_DIR))
        self.stats = _Stats()
        self.rate = RateLimiter(cfg.max_qps)
        self._writer = None

    # ------------------------------------------------------------------ state

    def _new_manifest(self) -> dict:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return {
            "schema_version": fd.SCHEMA_VERSION,
            **self.identity,
            "target_details": {"url": self.cfg.target, **self.spec.details},
            "query_budget": self.cfg.query_budget,
            "queries_spent": 0,
            "records": 0,
            "next_index": self.cfg.shard_index,
            "shards": [],
            "label_histogram": [0] * self.num_classes,
            "skipped": {"count": 0, "examples": []},
            "requests": 0,
            "retries": 0,
            "transient_errors": 0,
            "harvest_seconds": 0.0,
            "status": "in_progress",
            "created": now,
            "updated": now,
        }

    def _recover(self) -> None:
        """Loads the manifest and journal; `settled` gets answers not yet in shards."""
        if self.manifest is None:
            self.manifest = self._new_manifest()
        self.manifest["query_budget"] = self.cfg.query_budget
        self.manifest["target_details"] = {"url": self.cfg.target, **self.spec.details}
        watermark = self.manifest["next_index"]
        self.settled: dict[int, tuple[int, bytes]] = {}
        for entry in self.journal.recover():
            if entry.index >= watermark:
                self.settled[entry.index] = (entry.kind, entry.payload)
        answered = sum(1 for kind, _ in self.settled.values() if kind == RECORD)
        self.spent = self.manifest["records"] + answered
        if self.settled:
            logging.info(
                "resuming %s: %d records committed, %d answers recovered from the journal",
                self.cfg.output_dir,
                self.manifest["records"],
                answered,
            )

    # ------------------------------------------------------------------ producer

    def _produce(self, out: queue.Queue, stop: threading.Event, remaining: int) -> None:
        """Walks the stream; emits batches until `remaining` queries are produced and no
        recovered answers lie further on, or the stream ends."""
        try:
            self._produce_inner(out, stop, remaining)
        except BaseException as e:  # surfaced by the main loop
            out.put(e)

    def _produce_inner(self, out, stop, remaining) -> None:
        cfg = self.cfg
        last_settled = max(self.settled, default=-1)
        batch = _Batch([], [], [], [], [], [])
        for k in self.stream.indices(self.manifest["next_index"]):
            if stop.is_set():
                return
            if remaining == 0 and k > last_settled:
                break
            if k in self.settled:
                batch.order.append(k)
            elif remaining > 0:
                item = self.stream.item(k)
                if item is None:
                    batch.end = True
                    break
                batch.order.append(k)
                if item.image is None:
                    batch.skips.append((k, item.source_id, item.error))
                else:
                    batch.query.append(k)
                    batch.images.append(item.image)
                    batch.pngs.append(png_bytes(item.image))
                    batch.sources.append(item.source_id)
                    remaining -= 1
            if len(batch.query) >= cfg.query_batch_size or len(batch.order) >= 4 * max(
                cfg.query_batch_size, 64
            ):
                out.put(batch)
                batch = _Batch([], [], [], [], [], [])
        out.put(batch)
        out.put(None)

    # ------------------------------------------------------------------ queries

    def _query(self, batch: _Batch) -> Prediction:
        cfg = self.cfg

        def attempt():
            self.rate.acquire()
            self.stats.requests += 1

        def transient(error):
            self.stats.transient_errors += 1
            self.stats.retries += 1
            logging.log_every_n_seconds(logging.WARNING, "transient error, retrying: %s", 5, error)

        return predict_with_retries(
            self.client,
            np.stack(batch.images),
            self.num_classes,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_base_s=cfg.backoff_base_s,
            backoff_max_s=cfg.backoff_max_s,
            encoded=batch.pngs,
            before_attempt=attempt,
            on_transient=transient,
        )

    def _records(self, batch: _Batch, prediction: Prediction) -> list[tuple[int, int, bytes]]:
        shape = self.spec.input_shape
        entries = []
        for i, k in enumerate(batch.query):
            scores = None if prediction.scores is None else prediction.scores[i]
            example = fd.make_example(
                batch.pngs[i],
                shape,
                batch.sources[i],
                k,
                int(prediction.labels[i]),
                _stored_scores(self.mode, scores),
            )
            entries.append((k, RECORD, example))
        return entries

    def _journal(self, entries) -> None:
        """Appends to the journal; the first time, writes the manifest that identifies the
        run, so a directory holding a journal can always be checked before resuming."""
        if not os.path.exists(os.path.join(self.cfg.output_dir, fd.MANIFEST)):
            self._write_manifest()
        self.journal.append(entries)

    # ------------------------------------------------------------------ commits

    def _advance(self, final: bool) -> None:
        """Moves settled entries at the front of the order into shards."""
        size = self.cfg.records_per_shard
        while self.order and self.order[0] in self.settled:
            k = self.order.popleft()
            kind, payload = self.settled.pop(k)
            if kind == RECORD:
                self.ready.append((k, payload))
            else:
                self.pending_skips.append((k, json.loads(payload)))
            self.frontier = k + 1
            if len(self.ready) == size:
                self._commit(self.ready, self.ready[-1][0] + 1)
                self.ready = []
        if final and not self.order:
            self._commit(self.ready, self.frontier)
            self.ready = []

    def _commit(self, records: list[tuple[int, bytes]], watermark: int) -> None:
        m = self.manifest
        if records:
            index = len(m["shards"])
            planned = len(m["shards"]) + math.ceil(
                (self.cfg.query_budget - m["records"]) / self.cfg.records_per_shard
            )
            name = fd.shard_name(index, planned)
            os.makedirs(self.cfg.output_dir, exist_ok=True)
            digest = fd.write_shard(self.cfg.output_dir, name, [r for _, r in records])
            labels = [fd.parse_example(r)["label"] for _, r in records]
            hist = m["label_histogram"]
            for label in labels:
                if label >= len(hist):
                    hist.extend([0] * (label + 1 - len(hist)))
                hist[label] += 1
            m["shards"].append(
                {
                    "file": name,
                    "records": len(records),
                    "sha256": digest,
                    "first_index": records[0][0],
                    "last_index": records[-1][0],
                }
            )
            m["records"] += len(records)
            self._summaries(records, labels)
        skips = [s for s in self.pending_skips if s[0] < watermark]
        self.pending_skips = [s for s in self.pending_skips if s[0] >= watermark]
        m["skipped"]["count"] += len(skips)
        room = 100 - len(m["skipped"]["examples"])
        m["skipped"]["examples"].extend({"index": k, **info} for k, info in skips[: max(room, 0)])
        m["next_index"] = watermark
        self._write_manifest()
        self.journal.retire(watermark)

    def _write_manifest(self, status: str | None = None) -> None:
        m = self.manifest
        m["queries_spent"] = self.spent
        m["requests"] += self.stats.requests
        m["retries"] += self.stats.retries
        m["transient_errors"] += self.stats.transient_errors
        self.stats.requests = self.stats.retries = self.stats.transient_errors = 0
        now = time.monotonic()
        m["harvest_seconds"] = round(m["harvest_seconds"] + now - self._clock, 3)
        self._clock = now
        if status:
            m["status"] = status
        m["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        fd.write_manifest(self.cfg.output_dir, m)

    def _summaries(self, records, labels) -> None:
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.cfg.output_dir, TENSORBOARD_DIR, "harvest")
            )
        step = self.spent
        elapsed = max(time.monotonic() - self._start, 1e-6)
        with self._writer.as_default():
            tf.summary.scalar("harvest/queries_spent", self.spent, step=step)
            tf.summary.scalar("harvest/images_per_second", self._sent / elapsed, step=step)
            tf.summary.scalar(
                "harvest/retries", self.manifest["retries"] + self.stats.retries, step=step
            )
            hist = np.asarray(self.manifest["label_histogram"])
            tf.summary.histogram(
                "harvest/stolen_labels",
                np.repeat(np.arange(len(hist)), hist),
                step=step,
                buckets=max(len(hist), 1),
            )
            if len(self.manifest["shards"]) == 1:
                from copycat_tf import viz
                from copycat_tf.data.images import decode_png

                sample = [fd.parse_example(r) for _, r in records[:32]]
                grid = viz.image_grid(
                    np.stack([decode_png(s["image_png"]) for s in sample]),
                    [f"label {s['label']}" for s in sample],
                )
                tf.summary.image("harvest/npd_samples", grid[None], step=step)
        self._writer.flush()

    # ------------------------------------------------------------------ main loop

    def run(self) -> dict:
        cfg = self.cfg
        self._recover()
        self._clock = self._start = time.monotonic()
        self._sent = 0
        self.order: collections.deque[int] = collections.deque()
        self.ready: list[tuple[int, bytes]] = []
        self.pending_skips: list = []
        self.frontier = self.manifest["next_index"]
        remaining = max(cfg.query_budget - self.spent, 0)
        batches: queue.Queue = queue.Queue(maxsize=cfg.max_in_flight + 2)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce, args=(batches, stop, remaining), name="npd", daemon=True
        )
        producer.start()
        pool = concurrent.futures.ThreadPoolExecutor(cfg.max_in_flight, thread_name_prefix="q")
        in_flight: dict[concurrent.futures.Future, _Batch] = {}
        error: BaseException | None = None
        exhausted = produced_all = False
        progress = _Progress(cfg.progress, remaining, self.spent, cfg.query_budget)
        try:
            while True:
                while not produced_all and error is None and len(in_flight) < cfg.max_in_flight:
                    try:
                        batch = batches.get(timeout=0.02 if in_flight else 0.5)
                    except queue.Empty:
                        break
                    if batch is None:
                        produced_all = True
                        break
                    if isinstance(batch, BaseException):
                        raise batch
                    exhausted |= batch.end
                    self.order.extend(batch.order)
                    if batch.skips:
                        skips = [(k, SKIP, skip_payload(s, e)) for k, s, e in batch.skips]
                        self._journal(skips)
                        for k, kind, payload in skips:
                            self.settled[k] = (kind, payload)
                    if batch.query:
                        in_flight[pool.submit(self._query, batch)] = batch
                    self._advance(final=False)
                if not in_flight and (produced_all or error is not None):
                    break
                if not in_flight:
                    continue
                done, _ = concurrent.futures.wait(
                    in_flight, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in done:
                    batch = in_flight.pop(future)
                    try:
                        prediction = future.result()
                        entries = self._records(batch, prediction)
                    except TargetError as e:
                        if error is None:
                            error = e
                            stop.set()
                        continue
                    self._journal(entries)
                    for k, kind, payload in entries:
                        self.settled[k] = (kind, payload)
                    self.spent += len(entries)
                    self._sent += len(entries)
                    progress.update(self._sent, self.stats.retries + self.manifest["retries"])
                self._advance(final=False)
        except KeyboardInterrupt:
            error = KeyboardInterrupt()
            stop.set()
            for future in in_flight:
                future.cancel()
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()
        complete = error is None and produced_all
        self._advance(final=complete)
        status = "in_progress"
        if complete:
            status = "exhausted" if exhausted and self.spent < cfg.query_budget else "complete"
        elif error is not None:
            status = "stopped"
        self._write_manifest(status)
        self.journal.close(remove_if_empty=complete)
        if self._writer is not None:
            self._writer.close()
        self.client.close()
        if isinstance(error, KeyboardInterrupt):
            raise error
        if error is not None:
            raise UserInputError(
                f"steal stopped: {error}. Everything answered is kept in {cfg.output_dir} "
                "(re-run the same command to continue)"
            )
        return self.manifest


class _Progress:
    """One status line on stderr: images/s, queries spent of budget, ETA."""

    def __init__(self, enabled: bool, todo: int, spent: int, budget: int):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.todo, self.spent0, self.budget = todo, spent, budget
        self.start = self._last = time.monotonic()

    def update(self, sent: int, retries: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self._last < (0.25 if self.tty else 10.0):
            return
        self._last = now
        rate = sent / max(now - self.start, 1e-6)
        eta = (self.todo - sent) / rate if rate > 0 else float("inf")
        eta_text = str(datetime.timedelta(seconds=int(eta))) if math.isfinite(eta) else "?"
        line = (
            f"steal {self.spent0 + sent}/{self.budget} queries "
            f"({100 * (self.spent0 + sent) / self.budget:.0f}%) {rate:.0f} img/s "
            f"ETA {eta_text} retries {retries}"
        )
        sys.stderr.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def harvest(cfg: HarvestConfig) -> dict:
    """Runs (or resumes) a harvest; returns the final manifest.

    Raises:
      UserInputError: bad target, NPD spec, output directory or flags; or a permanent
        query error (everything answered before it is kept, and a re-run continues).
    """
    return _Harvester(cfg).run()


def format_summary(manifest: dict, output_dir: str) -> str:
    """The lines a user wants after steal."""
    hist = manifest["label_histogram"]
    seconds = manifest["harvest_seconds"]
    rate = manifest["queries_spent"] / seconds if seconds else 0.0
    return "\n".join(
        [
            f"steal {manifest['status']}: {manifest['records']} records in "
            f"{len(manifest['shards'])} shard(s), {manifest['queries_spent']}/"
            f"{manifest['query_budget']} queries spent",
            f"  requests {manifest['requests']}, retries {manifest['retries']}, "
            f"skipped NPD items {manifest['skipped']['count']}, {rate:.0f} images/s",
            f"  stolen labels per class {hist}",
            f"  fake dataset  {output_dir}  ({fd.MANIFEST})",
            f"  TensorBoard   tensorboard --logdir {os.path.join(output_dir, TENSORBOARD_DIR)}",
        ]
    )
