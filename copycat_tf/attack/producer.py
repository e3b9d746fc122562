"""The producer: a thread walking the NPD stream into batches ready to send.

It starts at the committed watermark, passes over positions already answered (recovered
from the journal), encodes each new image as PNG once (stored in the dataset and sent by
REST/JSON clients), and stops once `remaining` queries are produced and no recovered
answer lies further on, or when the stream ends. Items are pure functions of their
index, so a window of them is computed by several threads (decoding pictures releases
the GIL) and then taken in order: the result is the same as one thread's. For a query
selection, whose rounds make tens of thousands of candidates while a scout trains, the
items of a folder: or synthetic: stream are made by worker processes instead
(data.npd_processes): the same items, without taking turns for the interpreter's lock.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from copycat_tf.attack import selection as sel
from copycat_tf.attack.adaptation import Exploration
from copycat_tf.data.images import png_bytes
from copycat_tf.data.npd import NpdStream
from copycat_tf.data.npd_processes import ItemProcesses, contiguous_blocks


@dataclasses.dataclass
class NpdBatch:
    """Stream positions in order; the ones to send with their images.

    Attributes:
      order: every index covered, in stream order (answered, skipped or to send).
      query: indices to send.
      images, pngs, sources: pixels, their PNG and source id, one per query index.
      skips: (index, source_id, error) of unreadable NPD items.
      chosen_by: per query, (strategy, round) of the query selection that chose it, or
        None (random order, the exploration).
      end: the stream is exhausted after this batch.
    """

    order: list[int] = dataclasses.field(default_factory=list)
    query: list[int] = dataclasses.field(default_factory=list)
    images: list[np.ndarray] = dataclasses.field(default_factory=list)
    pngs: list[bytes] = dataclasses.field(default_factory=list)
    sources: list[str] = dataclasses.field(default_factory=list)
    skips: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    chosen_by: list[tuple[str, int] | None] = dataclasses.field(default_factory=list)
    end: bool = False


def in_blocks(item: Callable[[int], object], indices: list[int], pool, workers: int) -> list:
    """[item(k) for k in indices], computed by `workers` threads of `pool` in contiguous
    blocks (consecutive crops of a picture share its decoding)."""
    if workers == 1 or len(indices) < 2:
        return [item(k) for k in indices]
    blocks = contiguous_blocks(indices, workers)
    done = pool.map(lambda block: [item(k) for k in block], blocks)
    return [x for block in done for x in block]


class Producer:
    """Runs `NpdStream` on its own thread, `capacity` batches ahead of the sender.

    Args:
      stream: the worker's NPD stream.
      start: the first stream index to cover (the committed watermark).
      answered: indices >= start already answered or skipped (recovered).
      remaining: new queries to produce.
      batch_size: queries per batch.
      capacity: batches produced ahead.
      workers: threads computing NPD items (1 when the stream is not thread-safe); for a
        query selection on a thread-safe stream, worker processes instead (their pictures
        kept in each, not in this process).
      exploration: for an adaptive preparation or a query selection, the exploration
        whose answers set the arm weights and choose the queries before the first
        position past it is produced.
      select: for a query selection, (round, its first query index, labels so far, items
        of stream positions, arm name of a stream position, queries still needed) -> the
        selection (attack.selection.select). Items of sent queries and scored candidates
        are kept between rounds (attack.selection.ImageCache).
      reuse: the selection takes unchosen candidates over to the next round (else they are
        dropped from the cache once a round is chosen).
    """

    def __init__(
        self,
        stream: NpdStream,
        start: int,
        answered: set[int],
        remaining: int,
        batch_size: int,
        capacity: int,
        workers: int = 2,
        exploration: Exploration | None = None,
        select: Callable[..., dict] | None = None,
        reuse: bool = False,
    ):
        self.stream = stream
        self.start_index = start
        self.answered = answered
        self.remaining = remaining
        self.batch_size = batch_size
        self.workers = workers if stream.thread_safe else 1
        self.done = False  # every batch has been taken
        self.produced = 0  # queries produced so far
        self.exploration = exploration
        self.adaptation: dict | None = None  # set once the arm weights are adapted
        self.select = select
        self.selection: dict | None = None  # set once the queries are chosen
        self._chosen: dict | None = None  # the whole selection, with its choices
        self.rounds_begun = 0  # rounds whose queries are being produced
        self._drawn: list[set[int]] = []  # per round, the positions drawn at random
        self.cache = sel.ImageCache() if select is not None else None
        self.processes: ItemProcesses | None = None
        if select is not None and stream.thread_safe:
            self.processes = ItemProcesses(stream, self.workers, sel.PICTURE_BYTES)
        elif select is not None:  # its rounds' pools pass over the same pictures again
            stream.keep_pictures(sel.PICTURE_BYTES)
        self.reuse = reuse
        self._explored = False
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="npd", daemon=True)

    def __enter__(self) -> Producer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Asks the thread to stop producing (it ends at its next position)."""
        self._stop.set()

    def next(self, timeout_s: float) -> NpdBatch | None:
        """The next batch, or None when none is ready within the timeout or all are taken.

        Raises:
          Exception: whatever the stream raised on the producer thread.
        """
        if self.done:
            return None
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if item is None:
            self.done = True
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def _run(self) -> None:
        try:
            self._produce()
        except BaseException as e:  # handed to the main loop by next()
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _items(self, pool) -> Iterator:
        """(index, item) of every stream position from the start, item None for positions
        already answered. Items are computed a window at a time: as many new positions as
        the budget still needs (at most a batch), so little is computed in vain. A window
        never crosses the end of an adaptive preparation's exploration: there the
        generator yields (None, None) and resumes once the arm weights are set."""
        indices = self.stream.indices(self.start_index)
        held = None
        while True:
            window, fresh = [], []
            want = min(self.batch_size, self._need)
            while len(fresh) < want and len(window) < 4 * self.batch_size:
                k = held if held is not None else next(indices)
                held = None
                if self._at_bound(k):
                    if window:  # finish the exploration's last window first
                        held = k
                        break
                    yield None, None
                window.append(k)
                if k not in self.answered:
                    fresh.append(k)
            if not window:  # nothing more is needed: pass over answered positions only
                k = held if held is not None else next(indices)
                held = None
                window, fresh = [k], []
            items = dict(zip(fresh, self._compute(pool, fresh), strict=True))
            for k in window:
                yield k, items.get(k)

    def _at_bound(self, k: int) -> bool:
        """Whether k waits for the exploration (or the current selection round) to end."""
        return self.exploration is not None and not self._explored and k >= self.exploration.bound

    def _explore_done(self, pool) -> None:
        """At the exploration's end: adapts the preparation. Then, for a query selection,
        at the start of each round: chooses the round's queries and moves the bound on
        to the round's end."""
        if self.stream.adapts and self.adaptation is None:
            self.adaptation = self.exploration.adapt()
        if self.select is None or self._need == 0:
            self._explored = True
            return
        after = self.exploration.bound
        selection = self.select(
            self.rounds_begun,
            after,
            self.exploration.labels(),
            functools.partial(self._fetch, pool),
            self.stream.arm_name,
            self._need,
        )
        current = selection["rounds"][self.rounds_begun]
        self.rounds_begun += 1
        if not self.reuse:  # its unchosen fresh candidates will never be scored again
            chosen = set(current["chosen"])
            self.cache.drop(
                p for p in range(current["pool_start"], current["pool_end"]) if p not in chosen
            )
        # before _chosen, which _chosen_by reads first: every round it sees has its set
        self._drawn = [set(r.get("random", ())) for r in selection["rounds"]]
        self._chosen = selection  # a new record each round: the remap follows it
        self.stream.remap_from = selection["rounds"][0]["after"]
        self.stream.remap = functools.partial(sel.position, selection)
        self.selection = {
            "strategy": selection["strategy"],
            "rounds": [
                {k: v for k, v in r.items() if k not in ("chosen", "guesses", "random")}
                for r in selection["rounds"]
            ],
        }
        if current["chosen"]:
            # The next round starts at this one's end, if the budget gets there.
            self.exploration.extend(current["after"] + len(current["chosen"]))
        else:
            self._explored = True  # the stream ended: nothing more to choose from

    def _fetch(self, pool, positions: list[int]) -> list:
        """The items of stream positions, from the cache or computed."""
        return self.cache.get(positions, functools.partial(self._compute, pool, raw=True))

    def _chosen_by(self, k: int) -> tuple[str, int] | None:
        """(strategy, round) of the selection round query k belongs to, if any."""
        rounds = self._chosen["rounds"] if self._chosen else []
        for i, r in enumerate(rounds):
            if r["after"] <= k < r["after"] + len(r["chosen"]):
                if r["chosen"][k - r["after"]] in self._drawn[i]:
                    return "random", i  # drawn at random from the round's pool
                return self._chosen["strategy"], i
        return None

    def _compute(self, pool, indices: list[int], raw: bool = False) -> list:
        """stream.item of each index (stream.item_at_position of each position when
        `raw`; through the cache for a query selection), contiguous blocks per thread
        (consecutive crops of a picture share its decoding)."""
        if self.cache is not None and not raw:  # a selection: items are kept between rounds
            positions = [self.stream.position(k) for k in indices]
            found = self._fetch(pool, positions)
            return [self.stream.as_query(k, it) for k, it in zip(indices, found, strict=True)]
        if raw and self.processes is not None:
            return self.processes.items(indices)
        item = self.stream.item_at_position if raw else self.stream.item
        return in_blocks(item, indices, pool, self.workers)

    def _produce(self) -> None:
        with (
            concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="npd") as pool,
            self.processes or contextlib.nullcontext(),
        ):
            self._produce_with(pool)

    def _produce_with(self, pool) -> None:
        remaining = self._need = self.remaining
        last_answered = max(self.answered, default=-1)
        batch = NpdBatch()
        # A batch also closes after many positions without queries (a long run of
        # recovered answers), so commits keep moving.
        max_positions = 4 * max(self.batch_size, 64)
        for k, item in self._items(pool):
            if self._stop.is_set():
                return
            if k is None:  # the exploration is over: send what is ready, then adapt
                self._put(batch)
                batch = NpdBatch()
                if not self.exploration.wait(self._stop):
                    return
                self._explore_done(pool)
                continue
            if remaining == 0 and k > last_answered:
                break
            if k in self.answered:
                batch.order.append(k)
            elif remaining > 0:
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
                    batch.chosen_by.append(self._chosen_by(k))
                    remaining -= 1
                    self._need = remaining
                    self.produced += 1
            if len(batch.query) >= self.batch_size or len(batch.order) >= max_positions:
                self._put(batch)
                batch = NpdBatch()
        self._put(batch)
        self._put(None)
