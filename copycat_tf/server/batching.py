"""Server-side batching: concurrent requests to one signature run as one model call.

A bounded queue feeds worker threads. A worker takes a request, then merges requests
waiting behind it for the same servable, signature and per-example shape, up to
`max_batch_size` rows, optionally waiting `batch_timeout` for more. A full queue is
answered at once with UNAVAILABLE (TF Serving's behaviour) instead of growing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
from absl import logging

from copycat_tf.server.model_store import Servable
from copycat_tf.server.status import ServingError, invalid, unavailable


@dataclasses.dataclass
class _Job:
    servable: Servable
    signature: str
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple | None  # jobs with equal non-None keys can be merged
    future: concurrent.futures.Future


def _merge_key(servable: Servable, signature: str, inputs: dict[str, np.ndarray]):
    if not servable.signatures[signature].batchable:
        return None
    rows = {v.shape[0] for v in inputs.values() if v.ndim >= 1}
    if len(rows) != 1 or any(v.ndim == 0 for v in inputs.values()):
        return None
    parts = tuple(sorted((k, v.shape[1:], v.dtype.str) for k, v in inputs.items()))
    return (id(servable), signature, parts)


class BatchScheduler:
    """Runs model calls on worker threads, merging compatible concurrent requests."""

    def __init__(
        self,
        max_batch_size: int = 256,
        batch_timeout_s: float = 0.0,
        max_enqueued: int = 64,
        num_threads: int = 2,
    ):
        self.max_batch_size = max_batch_size
        self.batch_timeout_s = batch_timeout_s
        # Called with (model name, rows) of each model call (the server's metrics).
        self.on_model_call: Callable[[str, int], None] | None = None
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_enqueued)
        self._threads = [
            threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
            for i in range(num_threads)
        ]
        for t in self._threads:
            t.start()

    def run(
        self,
        servable: Servable,
        signature: str,
        inputs: dict[str, np.ndarray],
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Queues one request and waits for its outputs.

        Raises:
          ServingError: UNAVAILABLE when the queue is full, DEADLINE_EXCEEDED on timeout,
            INVALID_ARGUMENT when the model rejects the inputs.
        """
        rows = next(iter(inputs.values())).shape[0] if inputs else 0
        key = _merge_key(servable, signature, inputs)
        job = _Job(servable, signature, inputs, rows, key, concurrent.futures.Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise unavailable(
                "The batch scheduling queue to which this task was submitted is full"
            ) from None
        try:
            return job.future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            job.future.cancel()
            raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    def depth(self) -> int:
        """Requests waiting for a model call."""
        return self._queue.qsize()

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=10)

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        held: collections.deque[_Job] = collections.deque()
        while True:
            job = held.popleft() if held else self._queue.get()
            if job is None:
                return
            batch = [job]
            if job.key is not None:
                self._gather(job, batch, held)
            self._execute(batch)

    def _gather(self, first: _Job, batch: list[_Job], held) -> None:
        rows = first.rows
        deadline = time.monotonic() + self.batch_timeout_s
        while rows < self.max_batch_size:
            wait = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                return
            if nxt is None:  # shutting down: finish this batch, then stop
                held.append(nxt)
                return
            if nxt.key == first.key and rows + nxt.rows <= self.max_batch_size:
                batch.append(nxt)
                rows += nxt.rows
            else:
                held.append(nxt)
                return

    def _execute(self, batch: list[_Job]) -> None:
        batch = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not batch:
            return
        if len(batch) == 1:
            self._execute_one(batch[0])
            return
        first = batch[0]
        merged = {k: np.concatenate([j.inputs[k] for j in batch]) for k in first.inputs}
        try:
            outputs = first.servable.run(first.signature, merged)
        except Exception:
            # One bad request must not fail its neighbours: run each on its own.
            for job in batch:
                self._execute_one(job)
            return
        total = sum(j.rows for j in batch)
        if self.on_model_call is not None:
            self.on_model_call(first.servable.name, total)
        start = 0
        for job in batch:
            job.future.set_result(
                {
                    k: v[start : start + job.rows] if v.ndim and v.shape[0] == total else v
                    for k, v in outputs.items()
                }
            )
            start += job.rows

    def _execute_one(self, job: _Job) -> None:
        if self.on_model_call is not None:
            self.on_model_call(job.servable.name, job.rows)
        try:
            job.future.set_result(job.servable.run(job.signature, job.inputs))
        except ServingError as e:
            job.future.set_exception(e)
        except Exception as e:
            job.future.set_exception(model_error(e))


def model_error(e: Exception) -> ServingError:
    """Maps an exception raised by a model call to a ServingError."""
    import tensorflow as tf

    if isinstance(e, tf.errors.OpError):
        code = grpc.StatusCode.INVALID_ARGUMENT
        if isinstance(e, tf.errors.ResourceExhaustedError):
            code = grpc.StatusCode.RESOURCE_EXHAUSTED
        elif not isinstance(e, tf.errors.InvalidArgumentError):
            code = grpc.StatusCode.INTERNAL
        message = e.message.split("\n")[0]
        return ServingError(code, message)
    logging.exception("model call failed")
    return invalid(f"{type(e).__name__}: {e}".split("\n")[0])


# ----------------------------------------------------------------------------- config file

# TF Serving's BatchingParameters (session_bundle_config.proto): field -> (type, used here).
# The pip package tensorflow-serving-api does not ship that message, so its descriptor is
# built here from the documented fields; text_format then rejects any other field name.
_BATCHING_FIELDS = {
    "max_batch_size": ("Int64Value", True),
    "batch_timeout_micros": ("Int64Value", True),
    "max_enqueued_batches": ("Int64Value", True),
    "num_batch_threads": ("Int64Value", True),
    "thread_pool_name": ("StringValue", False),
    "allowed_batch_sizes": ("repeated int64", False),
    "pad_variable_length_inputs": ("bool", False),
    "enable_large_batch_splitting": ("BoolValue", True),
    "max_execution_batch_size": ("Int64Value", False),
}
_BATCHING_MESSAGE = None


def _batching_message_class():
    global _BATCHING_MESSAGE
    if _BATCHING_MESSAGE is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
        file = descriptor_pb2.FileDescriptorProto(
            name="copycat_tf/batching_parameters.proto",
            package="tensorflow.serving",
            syntax="proto3",
            dependency=["google/protobuf/wrappers.proto"],
        )
        message = file.message_type.add(name="BatchingParameters")
        fd = descriptor_pb2.FieldDescriptorProto
        for number, (name, (kind, _)) in enumerate(_BATCHING_FIELDS.items(), start=1):
            field = message.field.add(name=name, number=number, label=fd.LABEL_OPTIONAL)
            if kind == "repeated int64":
                field.label, field.type = fd.LABEL_REPEATED, fd.TYPE_INT64
            elif kind == "bool":
                field.type = fd.TYPE_BOOL
            else:
                field.type, field.type_name = fd.TYPE_MESSAGE, f".google.protobuf.{kind}"
        pool.Add(file)
        _BATCHING_MESSAGE = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
        )
    return _BATCHING_MESSAGE


def parse_batching_parameters(text: str, source: str) -> dict[str, int | bool]:
    """The settings of a BatchingParameters text proto that this server applies.

    Fields TF Serving knows but this server does not use are accepted with a warning;
    any other field (a misspelling) is an error, as in TF Serving.

    Raises:
      ValueError: not a BatchingParameters text proto, or a value out of range.
    """
    from google.protobuf import text_format

    message = _batching_message_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(
            f"--batching_parameters_file {source} is not a BatchingParameters text proto: {e}. "
            f"Known fields: {', '.join(_BATCHING_FIELDS)}"
        ) from e
    settings = {}
    for name, (kind, used) in _BATCHING_FIELDS.items():
        if kind in ("repeated int64", "bool"):
            present = bool(getattr(message, name))
        else:
            present = message.HasField(name)
        if present and not used:
            logging.warning("--batching_parameters_file %s: %s is ignored here", source, name)
        elif present and kind == "BoolValue":
            settings[name] = bool(getattr(message, name).value)
        elif present:
            value = int(getattr(message, name).value)
            if value < (0 if name == "batch_timeout_micros" else 1):
                raise ValueError(
                    f"--batching_parameters_file {source}: {name} {{ value: {value} }} is out "
                    "of range"
                )
            settings[name] = value
    return settings
