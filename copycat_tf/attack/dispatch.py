"""Sending batches to the target: a bounded number in flight, a client-side rate limit,
retries with backoff, and request counters safe to update from the worker threads."""

from __future__ import annotations

import collections
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
    """Paces acquisitions across threads: at most `qps` per second (0: no limit given), and
    fewer while the target refuses requests as rate-limited.

    With a limit given, pacing exactly at a served limit is refused for a third of the
    requests or more when the server allows no burst (a token bucket of one request: a
    request that arrives a millisecond early is turned away, and every refusal costs a
    slot). So a refusal
    widens the interval by `WIDEN` (at most `MAX_WIDENING` times 1/qps) and skips a slot;
    each answer narrows it back by `NARROW`, never below 1/qps: a few per cent of margin
    absorbs the jitter of request arrival.

    Without a limit given, requests are not paced until the target first refuses one; from
    then on the interval starts at the gap between recent answers (or `FIRST_GUESS_S`),
    widens by `PROBE_WIDEN` with each refusal and narrows by `PROBE_NARROW` with each
    answer, probing the limit as TCP probes a link: a few refusals in a hundred requests
    instead of a retry storm of every request in flight.

    Only a request sent after the last widening widens again (`refused(ticket)`): the
    requests already in flight when the pace changed say nothing about the new pace.
    """

    WIDEN = 1.05
    NARROW = 0.999
    MAX_WIDENING = 2.0
    PROBE_WIDEN = 1.5
    PROBE_NARROW = 0.99
    FIRST_GUESS_S = 0.5
    MAX_INTERVAL_S = 60.0

    def __init__(self, qps: float):
        self.nominal = 1.0 / qps if qps > 0 else 0.0
        self.interval = self.nominal
        self._next = time.monotonic()
        self._widened_at = float("-inf")
        self._answers: collections.deque[float] = collections.deque(maxlen=16)
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Waits for the next slot; returns the ticket to pass to `refused`."""
        with self._lock:
            now = time.monotonic()
            if not self.interval:
                return now
            wait = self._next - now
            self._next = max(now, self._next) + self.interval
        if wait > 0:
            time.sleep(wait)
        return now + max(wait, 0.0)

    def refused(self, ticket: float = float("inf")) -> None:
        """The target refused the request sent at `ticket` as rate-limited: slow down and
        skip a slot (once for all the requests sent before the last slow-down)."""
        with self._lock:
            now = time.monotonic()
            if ticket < self._widened_at:
                return
            if self.nominal:
                widest = self.nominal * self.MAX_WIDENING
                self.interval = min(self.interval * self.WIDEN, widest)
            elif self.interval:
                self.interval = min(self.interval * self.PROBE_WIDEN, self.MAX_INTERVAL_S)
            else:
                recent = [t for t in self._answers if now - t < 10.0]
                gap = (recent[-1] - recent[0]) / (len(recent) - 1) if len(recent) > 1 else 0
                self.interval = max(gap, 0.001) if gap else self.FIRST_GUESS_S
                logging.warning(
                    "the target refuses requests as rate-limited: pacing them from now on "
                    "(%.2f requests/s to start with, adapting); --max_qps=<its limit> avoids "
                    "most refusals",
                    1 / self.interval,
                )
            self._widened_at = now
            self._next = max(now, self._next) + self.interval

    def accepted(self) -> None:
        """The target answered: drift back towards the limit given (or probe a faster pace)."""
        with self._lock:
            self._answers.append(time.monotonic())
            if self.nominal:
                self.interval = max(self.nominal, self.interval * self.NARROW)
            elif self.interval:
                self.interval *= self.PROBE_NARROW


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
        ticket = [0.0]

        def attempt():
            ticket[0] = self._rate.acquire()
            self.stats.add(requests=1)

        def transient(error: TransientError):
            if isinstance(error, RateLimited):
                self._rate.refused(ticket[0])
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
