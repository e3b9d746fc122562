"""NPD items made in worker processes: a query selection's candidate pools.

Making an NPD item from a decoded picture (crop, resize, background, polarity, jitter,
blur) is ~0.4 ms of Python and numpy that mostly holds the interpreter's lock: threads
beside a training scout take turns instead of sharing the cores, and a 50,000-candidate
pool was the floor of a selection round (benchmarks/README.md, "Where a round's time
goes"). `ItemProcesses` makes them in processes of their own instead, each holding its
own copy of the stream (built from the same arguments, so item k is the same pixels:
items are pure functions of their position, the arm weights and the stream's arguments)
and keeping its decoded pictures for the steal's life.

Each worker is a Python process running `main` below, talking pickles over its stdin
and stdout: it imports neither TensorFlow nor the parent's entry module, and it ends as
soon as its stdin closes, which is also what happens when the parent is killed (no
worker outlives a killed steal by more than the block in hand). Workers run at the
lowest priority, so they take what the steal's own work leaves of the cores. Memory: each
worker keeps up to `keep_bytes` of decoded pictures (openclipart at 28x28: ~0.9 GB each).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import threading

import numpy as np

from copycat_tf.data.npd import NpdItem, NpdStream

# Added to the workers' niceness (19: the lowest priority).
WORKER_NICENESS = 19


def contiguous_blocks(indices: list, parts: int) -> list[list]:
    """`indices` cut into at most `parts` contiguous blocks of (nearly) equal size, in order
    (consecutive crops of a picture stay together and share its decoding)."""
    size = -(-len(indices) // parts)
    return [indices[i : i + size] for i in range(0, len(indices), size)]


class WorkerError(RuntimeError):
    """A worker process failed or ended while making NPD items."""


class ItemProcesses:
    """`count` worker processes making `stream.item_at_position` of blocks of positions.

    Args:
      stream: the stream whose items to make (folder: and synthetic: sources only:
        stream.thread_safe; its arguments are sent to every worker).
      count: worker processes (>= 1), started at the first call.
      keep_bytes: decoded pictures each worker keeps (NpdStream.keep_pictures).
    """

    def __init__(self, stream: NpdStream, count: int, keep_bytes: int):
        if not stream.thread_safe:
            raise ValueError(f"NPD {stream.spec!r} reads its sources in order: no workers")
        self.stream = stream
        self.count = max(1, int(count))
        self.keep_bytes = int(keep_bytes)
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._closed = False
        # The first failure: a failed exchange leaves replies unread, so none follows it.
        self._failed: WorkerError | None = None

    def __enter__(self) -> ItemProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        # This very package, whether installed or run from a source tree (first on the
        # path only when it is not there already: an installed one's site-packages must
        # not come before the standard library).
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (
            f"import sys\nif {root!r} not in sys.path: sys.path.insert(0, {root!r})\n"
            "from copycat_tf.data.npd_processes import main\nmain()\n"
        )
        hello = (self.stream.arguments(), self.keep_bytes)
        for _ in range(self.count):
            proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            self._procs.append(proc)
            self._send(proc, hello)

    def items(self, positions: list[int]) -> list[NpdItem | None]:
        """[stream.item_at_position(p) for p in positions] with the stream's current arm
        weights, made in contiguous blocks, one per worker (consecutive crops of a picture
        share its decoding).

        Raises:
          WorkerError: a worker ended or raised (its message and exit code are named).
        """
        if not positions:
            return []
        with self._lock:
            if self._closed:
                raise WorkerError("the NPD worker processes were closed")
            if self._failed is not None:
                raise self._failed
            try:
                return self._exchange(positions)
            except WorkerError as e:
                self._failed = e
                for proc in self._procs:  # what they were asked is never read now
                    proc.kill()
                raise

    def _exchange(self, positions: list[int]) -> list:
        if not self._procs:
            self._start()
        blocks = contiguous_blocks(positions, self.count)
        weights = self.stream.arm_weights
        for proc, block in zip(self._procs, blocks, strict=False):
            self._send(proc, (block, weights))
        out: list = []
        for proc, _ in zip(self._procs, blocks, strict=False):
            out.extend(self._receive(proc))
        return out

    def _send(self, proc: subprocess.Popen, message) -> None:
        try:
            pickle.dump(message, proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise self._ended(proc) from e

    def _receive(self, proc: subprocess.Popen) -> list:
        try:
            status, payload = pickle.load(proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as e:
            raise self._ended(proc) from e
        if status != "ok":
            raise WorkerError(f"NPD worker process {proc.pid} failed: {payload}")
        return payload

    def _ended(self, proc: subprocess.Popen) -> WorkerError:
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return WorkerError(
            f"NPD worker process {proc.pid} ended (exit code {code}) while making items; "
            "its error, if any, is on stderr above. Everything answered is kept: run the "
            "same command again to resume"
        )

    def close(self) -> None:
        """Ends the workers (their stdin closes; killed if they do not end soon)."""
        with self._lock:
            self._closed = True
            procs, self._procs = self._procs, []
        for proc in procs:
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):
                    pipe.close()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _serve(stdin, stdout) -> None:
    """The worker's loop: a (stream arguments, keep bytes) greeting, then (positions, arm
    weights) requests answered by ("ok", items) or ("error", message), until stdin ends."""
    try:
        arguments, keep_bytes = pickle.load(stdin)
    except EOFError:
        return
    stream = NpdStream(**arguments)
    stream.keep_pictures(keep_bytes)
    while True:
        try:
            positions, weights = pickle.load(stdin)
        except EOFError:
            return
        try:
            stream.arm_weights = None if weights is None else np.asarray(weights)
            reply = ("ok", [stream.item_at_position(p) for p in positions])
        except Exception as e:  # the parent raises it, naming this worker
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            pickle.dump(reply, stdout, protocol=pickle.HIGHEST_PROTOCOL)
            stdout.flush()
        except (BrokenPipeError, OSError):  # the parent is gone
            return


def main() -> None:
    """A worker: serves the parent on stdin/stdout until its stdin closes."""
    # The lowest priority: the steal's own work (a scout training, queries sent) takes the
    # cores first and the pool what is left (benchmarks/README.md, "Where a round's time
    # goes": without it, some cold scouts took twice their time beside the workers).
    os.nice(WORKER_NICENESS)
    # The protocol owns the real stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # Ctrl-C reaches the whole process group: the parent reports it
    with contextlib.suppress(KeyboardInterrupt):
        _serve(sys.stdin.buffer, out)
