"""The embedded model server: model store + batching + gRPC and REST front ends."""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import signal
import sys
import threading

from absl import logging

from copycat_tf.errors import UserInputError
from copycat_tf.server.batching import BatchScheduler, parse_batching_parameters
from copycat_tf.server.core import (
    ACCESS_LOG,
    Gatekeeper,
    ServingCore,
    image_shape,
    parse_api_keys_file,
)
from copycat_tf.server.defenses import OutputDefense, parse_defense
from copycat_tf.server.detector import Detector, DetectorConfig, check_config, parse_signals
from copycat_tf.server.grpc_api import MAX_MESSAGE_BYTES, build_grpc_server
from copycat_tf.server.metrics import MonitoringConfig, ServerMetrics, parse_monitoring_config
from copycat_tf.server.model_store import ModelConfig, ModelStore, parse_model_config_file
from copycat_tf.server.rest_api import RestServer
from copycat_tf.server.tensors import MAX_TENSOR_BYTES


@dataclasses.dataclass
class ServerConfig:
    """Settings of one model server process (see model_server.py for the flags).

    Attributes:
      models: the models to serve.
      port: gRPC port (0 disables gRPC unless rest_api_port is also 0).
      rest_api_port: REST port (0 disables REST).
      host: address both APIs bind.
      poll_seconds: interval of the version poller (<= 0: look once).
      max_batch_size / batch_timeout_s / max_enqueued / num_batch_threads: batching.
      grpc_max_threads: gRPC worker threads.
      max_request_bytes: request size limit for both APIs (0: TF Serving's 2 GiB gRPC).
      request_timeout_s: REST call timeout (TF Serving's --rest_api_timeout_in_ms).
      api_keys: accepted API keys, or None for an open server.
      rate_limit_qps: requests per second per key or client (0: unlimited).
      defense: output defence applied to every answer.
      drain_seconds: how long a shutdown waits for requests in flight.
      cors: add TF Serving's CORS headers.
      inject_failure_rate: fraction of predictions answered UNAVAILABLE / 503 (chaos).
      inject_latency_s: latency added to every prediction (chaos).
      enable_batching: merge concurrent requests; then one request may not hold more
        rows than max_batch_size (TF Serving's rule).
      allow_reload_config: accept ModelService/HandleReloadConfigRequest at all.
      admin_keys: keys that may reload (None: loopback clients of a key-less server).
      model_roots: directories reloaded configs may point into (default: the startup
        models' base paths).
      max_auth_failures: failed authentications per address per minute before refusal.
      max_tensor_bytes: largest decoded input tensor one request may declare.
      split_large_batches: requests of more rows than max_batch_size run in chunks (TF
        Serving's enable_large_batch_splitting); off, they are refused.
      max_image_pixels: largest encoded image a *_bytes input may hold (pixels; 0: any).
      monitoring: Prometheus metrics on the REST port (--monitoring_config_file).
      detector: the extraction detector (server.detector; off without signals).
      data_dir: data directory of the detector's pd: calibration spec.
    """

    models: list[ModelConfig]
    port: int = 8500
    rest_api_port: int = 0
    host: str = "0.0.0.0"
    poll_seconds: float = 1.0
    max_batch_size: int = 256
    batch_timeout_s: float = 0.0
    max_enqueued: int = 128
    num_batch_threads: int = 2
    grpc_max_threads: int = 16
    max_request_bytes: int = 0
    request_timeout_s: float = 30.0
    api_keys: frozenset[str] | None = None
    rate_limit_qps: float = 0.0
    defense: OutputDefense = dataclasses.field(default_factory=OutputDefense)
    drain_seconds: float = 10.0
    cors: bool = False
    inject_failure_rate: float = 0.0
    inject_latency_s: float = 0.0
    enable_batching: bool = True
    allow_reload_config: bool = False
    admin_keys: frozenset[str] | None = None
    model_roots: list[str] = dataclasses.field(default_factory=list)
    max_auth_failures: int = 20
    max_tensor_bytes: int = MAX_TENSOR_BYTES
    split_large_batches: bool = True
    max_image_pixels: int = 64_000_000
    monitoring: MonitoringConfig = dataclasses.field(default_factory=MonitoringConfig)
    detector: DetectorConfig = dataclasses.field(default_factory=DetectorConfig)
    data_dir: str | None = None


class ModelServer:
    """Start, serve, drain. Usable in-process (tests, demo) and from model_server.py."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.store = ModelStore(config.models, config.poll_seconds, config.model_roots)
        self.scheduler = BatchScheduler(
            config.max_batch_size,
            config.batch_timeout_s,
            config.max_enqueued,
            config.num_batch_threads,
        )
        self.core = ServingCore(
            self.store,
            self.scheduler,
            Gatekeeper(
                config.api_keys,
                config.rate_limit_qps,
                config.admin_keys,
                config.max_auth_failures,
            ),
            config.defense,
            config.request_timeout_s,
            inject_failure_rate=config.inject_failure_rate,
            inject_latency_s=config.inject_latency_s,
            allow_reload=config.allow_reload_config,
            max_request_batch=config.max_batch_size if config.enable_batching else 0,
            max_tensor_bytes=config.max_tensor_bytes,
            split_large_batches=config.split_large_batches,
            max_image_pixels=config.max_image_pixels,
            metrics=ServerMetrics() if config.monitoring.enabled else None,
        )
        if config.detector.enabled:
            self.core.detector = Detector(config.detector, config.data_dir)
            self.core.degrade = parse_defense(config.detector.degrade)
        metrics, detector = self.core.metrics, self.core.detector
        if metrics is not None:
            self.scheduler.on_model_call = metrics.model_call
            metrics.queue_depth.set_function(self.scheduler.depth)
            if detector is not None:
                detector.on_flag = metrics.detector_flagged
                metrics.detector_clients.set_function(detector.tracked)
        self._grpc = None
        self._rest: RestServer | None = None
        self.grpc_port = 0
        self.rest_port = 0
        self._stopped = threading.Event()

    def _fit_detector(self) -> None:
        """Fits the ood detector's model for each served model's image shape before the
        ports open: no request waits for it, and a calibration that gives too few images
        fails at start.

        Raises:
          UserInputError: the calibration gives too few images (the models are unloaded).
        """
        detector = self.core.detector
        if detector is None:
            return
        for name in self.store.model_names():
            shape = image_shape(self.store.resolve(name))
            if shape is not None:
                try:
                    detector.prepare(shape)
                except ValueError as e:
                    self.store.stop()
                    raise UserInputError(str(e)) from e

    def start(self) -> None:
        """Loads the models, then opens the ports (so a reachable server can answer).

        Raises:
          OSError: a port cannot be bound.
        """
        cfg = self.config
        self.store.start()
        self._fit_detector()
        if cfg.port or not cfg.rest_api_port:
            self._grpc, self.grpc_port = build_grpc_server(
                self.core,
                cfg.host,
                cfg.port,
                cfg.grpc_max_threads,
                cfg.max_request_bytes or MAX_MESSAGE_BYTES,
            )
            self._grpc.start()
            logging.info("Running gRPC ModelServer at %s:%d ...", cfg.host, self.grpc_port)
        if cfg.rest_api_port:
            try:
                self._rest = RestServer(
                    (cfg.host, cfg.rest_api_port),
                    self.core,
                    cfg.max_request_bytes,
                    cfg.request_timeout_s,
                    cfg.cors,
                    threads=cfg.grpc_max_threads,
                    metrics_path=cfg.monitoring.path,
                )
            except OSError as e:
                self.stop()
                raise OSError(f"cannot bind REST port {cfg.host}:{cfg.rest_api_port}: {e}") from e
            self.rest_port = self._rest.server_address[1]
            logging.info("Exporting HTTP/REST API at:%s:%d ...", cfg.host, self.rest_port)

    def stop(self) -> None:
        """Stops accepting, drains requests in flight (up to drain_seconds), unloads."""
        if self._stopped.is_set():
            return
        grace = self.config.drain_seconds
        done = self._grpc.stop(grace) if self._grpc is not None else None
        if self._rest is not None:
            if not self._rest.drain(grace):
                logging.warning("REST requests still running after %.0fs drain", grace)
            self._rest.server_close()
        if done is not None:
            done.wait(grace)
        self.scheduler.stop()
        self.store.stop()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def serve(config: ServerConfig) -> None:
    """Runs a server until SIGTERM or SIGINT, then drains and returns."""
    handler = pylogging.StreamHandler(sys.stderr)
    handler.setFormatter(pylogging.Formatter("%(asctime)s access %(message)s"))
    ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(pylogging.INFO)
    ACCESS_LOG.propagate = False
    server = ModelServer(config)
    server.start()
    stop_requested = threading.Event()

    def on_signal(signum, frame):
        logging.info("signal %d: draining and shutting down", signum)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop_requested.wait(0.5):
        pass
    server.stop()
    logging.info("model server stopped")


def _config_file(flag: str, path: str, parse):
    """parse(text, path) of the file a flag names, errors as one-line UserInputErrors."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise UserInputError(f"--{flag} {path} cannot be read: {e}") from e
    try:
        return parse(text, path)
    except ValueError as e:
        raise UserInputError(str(e)) from e


def _batching_parameters(path: str) -> dict[str, int | bool]:
    """The settings of a --batching_parameters_file this server applies."""
    return _config_file("batching_parameters_file", path, parse_batching_parameters)


def _monitoring(path: str, rest_api_port: int) -> MonitoringConfig:
    """The settings of a --monitoring_config_file."""
    if not path:
        return MonitoringConfig()
    config = _config_file("monitoring_config_file", path, parse_monitoring_config)
    if config.enabled and not rest_api_port:
        raise UserInputError(
            f"--monitoring_config_file {path} enables Prometheus metrics, which are served on "
            "the REST port: pass --rest_api_port too"
        )
    return config


def _detector(values) -> DetectorConfig:
    """The --detector* flags, checked."""
    try:
        cfg = DetectorConfig(
            signals=parse_signals(values.detector),
            action=values.detector_action,
            delta=values.detector_delta,
            min_queries=values.detector_min_queries,
            window=values.detector_window,
            max_set=values.detector_max_set,
            calibration=values.detector_calibration,
            calibration_size=values.detector_calibration_size,
            ood_quantile=values.detector_ood_quantile,
            ood_share=values.detector_ood_share,
            max_clients=values.detector_max_clients,
            degrade=values.detector_degrade,
        )
        if cfg.enabled:
            check_config(cfg)
            parse_defense(cfg.degrade)
    except ValueError as e:
        raise UserInputError(str(e).replace("--output_defense", "--detector_degrade")) from e
    if "ood" in cfg.signals:  # a bad calibration spec fails now, not at the first request
        from copycat_tf.data.npd import parse_npd_spec

        try:
            parse_npd_spec(cfg.calibration, 0, values.detector_data_dir)
        except UserInputError as e:
            raise UserInputError(f"--detector_calibration={cfg.calibration!r}: {e}") from e
    return cfg


def server_config_from_flags(values) -> ServerConfig:
    """Builds a ServerConfig from model_server's flags, with one-line errors."""
    if values.model_config_file:
        try:
            models = parse_model_config_file(values.model_config_file)
        except ValueError as e:
            raise UserInputError(str(e)) from e
    elif values.model_base_path:
        models = [ModelConfig(values.model_name, values.model_base_path)]
    else:
        raise UserInputError(
            "nothing to serve: pass --model_base_path=<dir with numeric version "
            "subdirectories> (and --model_name), or --model_config_file=<models.config>"
        )
    if values.port == values.rest_api_port and values.port:
        raise UserInputError(f"--port and --rest_api_port are both {values.port}; they must differ")
    try:
        defense = parse_defense(values.output_defense)
        api_keys = parse_api_keys_file(values.api_keys_file) if values.api_keys_file else None
    except ValueError as e:
        raise UserInputError(str(e)) from e
    batching = {
        "max_batch_size": values.max_batch_size,
        "batch_timeout_micros": values.batch_timeout_micros,
        "max_enqueued_batches": values.max_enqueued_batches,
        "num_batch_threads": values.num_batch_threads,
        "enable_large_batch_splitting": values.enable_large_batch_splitting,
    }
    monitoring = _monitoring(values.monitoring_config_file, values.rest_api_port)
    detector = _detector(values)
    if values.batching_parameters_file:
        batching.update(_batching_parameters(values.batching_parameters_file))
    if not values.enable_batching:
        batching["max_batch_size"] = 1
    try:
        admin_keys = parse_api_keys_file(values.admin_keys_file) if values.admin_keys_file else None
    except ValueError as e:
        raise UserInputError(str(e).replace("--api_keys_file", "--admin_keys_file")) from e
    if admin_keys and api_keys and admin_keys & api_keys:
        raise UserInputError(
            "--admin_keys_file and --api_keys_file share keys; admin keys must differ from "
            "prediction keys"
        )
    roots = [os.path.abspath(r) for r in values.model_root]
    for root in roots:
        if not os.path.isdir(root):
            raise UserInputError(f"--model_root {root} is not a directory")
    for model in models:
        if not os.path.isdir(model.base_path):
            logging.warning(
                "base path %s of model %s does not exist yet; it is polled until it does",
                model.base_path,
                model.name,
            )
    return ServerConfig(
        models=models,
        port=values.port,
        rest_api_port=values.rest_api_port,
        host=values.host,
        poll_seconds=values.file_system_poll_wait_seconds,
        max_batch_size=batching["max_batch_size"],
        batch_timeout_s=batching["batch_timeout_micros"] / 1e6,
        max_enqueued=batching["max_enqueued_batches"],
        num_batch_threads=batching["num_batch_threads"],
        grpc_max_threads=values.grpc_max_threads,
        max_request_bytes=values.max_request_bytes,
        request_timeout_s=values.rest_api_timeout_in_ms / 1000.0,
        api_keys=api_keys,
        rate_limit_qps=values.rate_limit_qps,
        defense=defense,
        drain_seconds=values.drain_seconds,
        cors=values.rest_api_enable_cors_support,
        inject_failure_rate=values.inject_failure_rate,
        inject_latency_s=values.inject_latency_ms / 1000.0,
        enable_batching=values.enable_batching,
        allow_reload_config=values.allow_reload_config,
        admin_keys=admin_keys,
        model_roots=roots,
        max_auth_failures=values.max_auth_failures_per_minute,
        max_tensor_bytes=values.max_tensor_bytes,
        split_large_batches=batching["enable_large_batch_splitting"],
        max_image_pixels=values.max_image_pixels,
        monitoring=monitoring,
        detector=detector,
        data_dir=values.detector_data_dir,
    )
