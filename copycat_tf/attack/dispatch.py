"""Sending batches to the target: a bounded number in flight, a client-side rate limit,
retries with backoff, and request counters safe to update from the worker threads."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
from absl import logging

from copycat_tf.targets.base import (
    Prediction,
    RateLimited,
    Target,
    TargetError,
    TransientError,
)
from copycat_tf.targets.retry import RetryPolicy, predict_with_retries


class RateLimiter:
    """At most `qps` acquisitions per second across threads (0: unlimited), and a little
    fewer after the target refuses one as rate-limited.

    Pacing exactly at a served limit is refused about half the time when the server allows
    no burst (a token bucket of one request: any request that arrives a millisecond earlier
    after its predecessor than the limit allows is turned away, and every refusal costs a
    slot). So each refusal widens the interval by `WIDEN` (at most `MAX_WIDENING` times the
    nominal one) and skips a slot; each accepted request narrows it back by `NARROW`,
    never below 1/qps: a few per cent of margin absorbs the jitter of request arrival.
    """

    WIDEN = 1.05
    NARROW = 0.999
    MAX_WIDENING = 2.0

    def __init__(self, qps: float):
        self.nominal = 1.0 / qps if qps > 0 else 0.0
        self.interval = self.nominal
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self.nominal:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)

    def refused(self) -> None:
        """The target refused a request as rate-limited: slow down and skip a slot."""
        if not self.nominal:
            return
        with self._lock:
            self.interval = min(self.interval * self.WIDEN, self.nominal * self.MAX_WIDENING)
            self._next = max(time.monotonic(), self._next) + self.interval

    def accepted(self) -> None:
        """The target answered: drift back towards the nominal rate."""
        if not self.nominal:
            return
        with self._lock:
            self.interval = max(self.nominal, self.interval * self.NARROW)


class RequestStats:
    """Request counters shared by the worker threads and the main loop (locked)."""

    FIELDS = ("requests", "retries", "transient_errors")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.FIELDS, 0)
        self._total = dict.fromkeys(self.FIELDS, 0)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n
                self._total[name] += n

    def take(self) -> dict[str, int]:
        """The counts since the last take (and resets them): added to the manifest once."""
        with self._lock:
            taken, self._counts = self._counts, dict.fromkeys(self.FIELDS, 0)
        return taken

    def total(self, name: str) -> int:
        """Everything counted by this run."""
        with self._lock:
            return self._total[name]


class Dispatcher:
    """Runs predictions on `max_in_flight` threads; hands back (batch, answer) pairs where
    the answer is a Prediction or the TargetError that ended its retries."""

    def __init__(
        self,
        client: Target,
        num_classes: int,
        max_in_flight: int,
        retry: RetryPolicy,
        max_qps: float = 0.0,
    ):
        self.client = client
        self.num_classes = num_classes
        self.max_in_flight = max_in_flight
        self.retry = retry
        self.stats = RequestStats()
        self._rate = RateLimiter(max_qps)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix="q")
        self._in_flight: dict[concurrent.futures.Future, object] = {}

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    @property
    def has_room(self) -> bool:
        return len(self._in_flight) < self.max_in_flight

    def submit(self, batch, images: np.ndarray, encoded: list[bytes]) -> None:
        """Starts one prediction; its result comes back from `completed`."""
        self._in_flight[self._pool.submit(self._predict, images, encoded)] = batch

    def completed(self, timeout_s: float) -> list[tuple[object, Prediction | TargetError]]:
        """The batches answered (or failed for good) within `timeout_s`."""
        if not self._in_flight:
            return []
        done, _ = concurrent.futures.wait(
            self._in_flight, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED
        )
        out = []
        for future in done:
            batch = self._in_flight.pop(future)
            try:
                out.append((batch, future.result()))
            except TargetError as e:
                out.append((batch, e))
        return out

    def shutdown(self) -> None:
        """Cancels what has not started and waits for what has."""
        for future in self._in_flight:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _predict(self, images: np.ndarray, encoded: list[bytes]) -> Prediction:
        def attempt():
            self._rate.acquire()
            self.stats.add(requests=1)

        def transient(error: TransientError):
            if isinstance(error, RateLimited):
                self._rate.refused()
            self.stats.add(transient_errors=1, retries=1)
            logging.log_every_n_seconds(logging.WARNING, "transient error, retrying: %s", 5, error)

        prediction = predict_with_retries(
            self.client,
            images,
            self.num_classes,
            self.retry,
            encoded=encoded,
            before_attempt=attempt,
            on_transient=transient,
        )
        self._rate.accepted()
        return prediction
