"""Prometheus metrics of the model server, as TF Serving exports them (reference §3).

`--monitoring_config_file` holds a TF Serving MonitoringConfig text proto:

  prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }

When enabled, the REST port answers GET <path> with the Prometheus text format (written by
the `prometheus_client` library). The path needs the same API key as the model routes
when keys are configured (a scraper sends `authorization: Bearer K`); TF Serving has no
keys at all. Metrics (names after TF Serving's where it has one):

  :tensorflow:serving:request_count            requests per model, API, method, status
                                               (model "-": a name no model has, so a
                                               client cannot add series)
  :tensorflow:serving:request_latency_seconds  their latency (histogram)
  :tensorflow:serving:batching_session:batch_size   rows of each model call (histogram)
  :tensorflow:serving:batching_session:queue_depth  requests waiting for a model call
  :copycat:serving:defended_rows               rows answered through an --output_defense
  :copycat:serving:detector_flagged_clients    clients the --detector flagged, per signal
  :copycat:serving:detector_action_rows        flagged clients' rows refused / degraded
  :copycat:serving:detector_tracked_clients    clients the detector keeps state for

Each server keeps its own registry: two servers in one process do not share counts.
"""

from __future__ import annotations

import dataclasses

DEFAULT_PATH = "/monitoring/prometheus/metrics"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_MESSAGE = None


@dataclasses.dataclass(frozen=True)
class MonitoringConfig:
    enabled: bool = False
    path: str = DEFAULT_PATH


def _message_class():
    """tensorflow.serving.MonitoringConfig, built from its documented fields (the pip
    tensorflow-serving-api package does not ship monitoring_config_pb2)."""
    global _MESSAGE
    if _MESSAGE is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        fd = descriptor_pb2.FieldDescriptorProto
        file = descriptor_pb2.FileDescriptorProto(
            name="copycat_tf/monitoring_config.proto", package="tensorflow.serving", syntax="proto3"
        )
        prometheus = file.message_type.add(name="PrometheusConfig")
        prometheus.field.add(name="enable", number=1, label=fd.LABEL_OPTIONAL, type=fd.TYPE_BOOL)
        prometheus.field.add(name="path", number=2, label=fd.LABEL_OPTIONAL, type=fd.TYPE_STRING)
        config = file.message_type.add(name="MonitoringConfig")
        config.field.add(
            name="prometheus_config",
            number=1,
            label=fd.LABEL_OPTIONAL,
            type=fd.TYPE_MESSAGE,
            type_name=".tensorflow.serving.PrometheusConfig",
        )
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file)
        _MESSAGE = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
        )
    return _MESSAGE


def parse_monitoring_config(text: str, source: str) -> MonitoringConfig:
    """A MonitoringConfig text proto (TF Serving's format).

    Raises:
      ValueError: not a MonitoringConfig, or a path that does not start with "/".
    """
    from google.protobuf import text_format

    message = _message_class()()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ValueError(
            f"--monitoring_config_file {source} is not a MonitoringConfig text proto ({e}); "
            "expected e.g. "
            f'prometheus_config {{ enable: true, path: "{DEFAULT_PATH}" }}'
        ) from None
    prometheus = message.prometheus_config
    path = prometheus.path or DEFAULT_PATH
    if not path.startswith("/") or "?" in path:
        raise ValueError(
            f"--monitoring_config_file {source}: prometheus_config path {path!r} must be a URL "
            "path from /"
        )
    return MonitoringConfig(enabled=prometheus.enable, path=path)


class ServerMetrics:
    """The counters, histograms and gauges of one server (see the module docstring)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        labels = ("model_name", "entrypoint", "method", "status")
        self._requests = Counter(
            ":tensorflow:serving:request_count",
            "Requests answered, per model, API (entrypoint), method and status.",
            labels,
            registry=self.registry,
        )
        self._latency = Histogram(
            ":tensorflow:serving:request_latency_seconds",
            "Request latency from arrival to answer, in seconds.",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._batch = Histogram(
            ":tensorflow:serving:batching_session:batch_size",
            "Rows of each model call (requests merged by the batch scheduler).",
            ("model_name",),
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            ":tensorflow:serving:batching_session:queue_depth",
            "Requests waiting in the batch scheduler's queue.",
            registry=self.registry,
        )
        self._defended = Counter(
            ":copycat:serving:defended_rows",
            "Rows answered through an output defence, per model and defence.",
            ("model_name", "defense"),
            registry=self.registry,
        )

        self._flagged = Counter(
            ":copycat:serving:detector_flagged_clients",
            "Clients the extraction detector flagged, per signal.",
            ("signal",),
            registry=self.registry,
        )
        self._actions = Counter(
            ":copycat:serving:detector_action_rows",
            "Rows of flagged clients refused (block) or answered degraded (degrade).",
            ("action",),
            registry=self.registry,
        )
        self.detector_clients = Gauge(
            ":copycat:serving:detector_tracked_clients",
            "Clients the extraction detector keeps state for.",
            registry=self.registry,
        )

    def request(self, api: str, method: str, model: str, status: str, seconds: float) -> None:
        values = (model or "-", api.upper(), method, status)
        self._requests.labels(*values).inc()
        self._latency.labels(*values).observe(seconds)

    def model_call(self, model: str, rows: int) -> None:
        self._batch.labels(model).observe(rows)

    def defended(self, model: str, defense: str, rows: int) -> None:
        self._defended.labels(model, defense).inc(rows)

    def detector_flagged(self, signal: str) -> None:
        self._flagged.labels(signal).inc()

    def detector_action(self, action: str, rows: int) -> None:
        self._actions.labels(action).inc(rows)

    def render(self) -> tuple[bytes, str]:
        """(the Prometheus text exposition, its content type)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
