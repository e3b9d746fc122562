"""Serve SavedModels with TensorFlow Serving's REST and gRPC APIs (wire-compatible).

  python -m copycat_tf.model_server --port=8500 --rest_api_port=8501 \
      --model_name=target --model_base_path=runs/fashion_mnist/models/target

Serves <model_base_path>/<version>/ (latest version; new versions are picked up without a
restart) or the models of --model_config_file (TF Serving's models.config). Flags are named
as tensorflow_model_server's; the last group emulates a hardened cloud API (API keys, rate
limit, output defences). SIGTERM or Ctrl-C drains requests in flight and exits.
"""

import os

# numpy's OpenBLAS (used by the detector and the defences) keeps its threads spinning after
# each call, taking cores from TensorFlow's model calls: one thread is the server's share.
# Set before numpy loads; an explicit OPENBLAS_NUM_THREADS wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import flags

from copycat_tf import cli

# tensorflow_model_server's flags (defaults as there).
flags.DEFINE_integer(
    "port",
    8500,
    "gRPC port (0: no gRPC unless --rest_api_port is 0 too).",
    lower_bound=0,
    upper_bound=65535,
)
flags.DEFINE_integer(
    "rest_api_port", 0, "HTTP/REST port; 0 disables REST.", lower_bound=0, upper_bound=65535
)
flags.DEFINE_string("model_name", "default", "Model name (ignored with --model_config_file).")
flags.DEFINE_string(
    "model_base_path",
    "",
    "Directory of numeric version subdirectories (ignored with --model_config_file).",
)
flags.DEFINE_string(
    "model_config_file",
    "",
    "ModelServerConfig text proto (models.config): several models, version policies, labels.",
)
flags.DEFINE_float(
    "file_system_poll_wait_seconds",
    1.0,
    "Interval between scans for new versions; <= 0 scans once at start.",
)
flags.DEFINE_integer("rest_api_timeout_in_ms", 30000, "Timeout of a REST call.", lower_bound=1)
flags.DEFINE_boolean("rest_api_enable_cors_support", False, "Add CORS headers to REST answers.")
flags.DEFINE_boolean("enable_batching", True, "Merge concurrent requests into one model call.")
flags.DEFINE_string(
    "batching_parameters_file",
    "",
    "BatchingParameters text proto "
    "(max_batch_size, batch_timeout_micros, max_enqueued_batches, "
    "num_batch_threads); overrides the batching flags below.",
)
flags.DEFINE_integer("grpc_max_threads", 16, "gRPC worker threads.", lower_bound=1)
# Batching, spelled as BatchingParameters' fields.
flags.DEFINE_integer("max_batch_size", 256, "Most rows merged into one model call.", lower_bound=1)
flags.DEFINE_integer(
    "batch_timeout_micros", 0, "How long a batch waits for more requests.", lower_bound=0
)
flags.DEFINE_integer(
    "max_enqueued_batches",
    128,
    "Queued requests before answering UNAVAILABLE / 503.",
    lower_bound=1,
)
flags.DEFINE_integer("num_batch_threads", 2, "Threads running model calls.", lower_bound=1)
# copycat_tf additions.
flags.DEFINE_string("host", "0.0.0.0", "Address both APIs bind (TF Serving binds all).")
flags.DEFINE_integer(
    "max_request_bytes",
    0,
    "Largest request accepted (REST: 413; gRPC: RESOURCE_EXHAUSTED); 0 = TF Serving's limits.",
    lower_bound=0,
)
flags.DEFINE_float(
    "drain_seconds", 10.0, "How long shutdown waits for requests in flight.", lower_bound=0.0
)
flags.DEFINE_string(
    "api_keys_file",
    "",
    "Require an API key (one per line in this file) as "
    "'x-api-key' or 'Authorization: Bearer'; 401 / UNAUTHENTICATED otherwise.",
)
flags.DEFINE_float(
    "rate_limit_qps",
    0.0,
    "Requests per second per API key (or client); 429 / RESOURCE_EXHAUSTED beyond. 0 = unlimited.",
    lower_bound=0.0,
)
flags.DEFINE_integer(
    "max_auth_failures_per_minute",
    20,
    "Failed authentications from one address per minute before it is refused (429 / "
    "RESOURCE_EXHAUSTED) for the rest of the minute; 0 = no limit.",
    lower_bound=0,
)
flags.DEFINE_boolean(
    "allow_reload_config",
    False,
    "Accept ModelService/HandleReloadConfigRequest (off: PERMISSION_DENIED). Then only "
    "with an admin key (--admin_keys_file), or from loopback when no keys are set, and "
    "only for base paths under --model_root.",
)
flags.DEFINE_string("admin_keys_file", "", "Keys (one per line) that may reload the configuration.")
flags.DEFINE_list(
    "model_root",
    [],
    "Directories a reloaded configuration may point into (default: the startup models' "
    "base paths).",
)
flags.DEFINE_boolean(
    "enable_large_batch_splitting",
    True,
    "A request of more rows than --max_batch_size runs in chunks of that size (TF Serving's "
    "BatchingParameters field); off, it is refused (INVALID_ARGUMENT, 'Task size ...').",
)
flags.DEFINE_integer(
    "max_tensor_bytes",
    256 << 20,
    "Largest decoded input tensor a request may declare (INVALID_ARGUMENT beyond).",
    lower_bound=1,
)
flags.DEFINE_integer(
    "max_image_pixels",
    64_000_000,
    "Largest image (width x height) an encoded *_bytes input may hold; 0 = any.",
    lower_bound=0,
)
flags.DEFINE_string(
    "monitoring_config_file",
    "",
    "TF Serving MonitoringConfig text proto; with prometheus_config { enable: true } the REST "
    "port serves Prometheus metrics at its path (default /monitoring/prometheus/metrics).",
)
flags.DEFINE_string(
    "output_defense",
    "none",
    "none | top1 | topk:K | round:D | "
    "reverse_sigmoid:BETA,GAMMA | gaussian:SIGMA, applied to the scores.",
)
# The extraction detector (copycat_tf/server/detector.py), off by default.
flags.DEFINE_string(
    "detector",
    "",
    "Extraction detector signals, comma-separated: prada (Juuti et al. 2019: Shapiro-Wilk "
    "test of each client's query distances), ood (share of a client's queries outside the "
    "target's input distribution; needs --detector_calibration). Empty: off.",
)
flags.DEFINE_enum(
    "detector_action",
    "log",
    ["log", "block", "degrade"],
    "What a flagged client (API key, else address) gets: log (answers as before), block "
    "(403 / PERMISSION_DENIED), degrade (answers through --detector_degrade).",
)
flags.DEFINE_float("detector_delta", 0.9, "prada flags a client when W falls below this.")
flags.DEFINE_integer(
    "detector_min_queries", 100, "Queries of a client before a signal may flag it.", lower_bound=3
)
flags.DEFINE_integer(
    "detector_window",
    5000,
    "Last distances (prada) / out-of-distribution marks (ood) judged per client.",
    lower_bound=3,
)
flags.DEFINE_integer(
    "detector_max_set", 2048, "prada's stored queries per client (memory bound).", lower_bound=1
)
flags.DEFINE_string(
    "detector_calibration",
    "",
    "ood: NPD spec of images the target expects, e.g. pd:fashion_mnist:train or "
    "folder:<dir> (each picture once, whole, as it is; at least 20 distinct); the model is "
    "fitted at start, for each served model's image shape.",
)
flags.DEFINE_integer(
    "detector_calibration_size", 2000, "ood: calibration images used.", lower_bound=20
)
flags.DEFINE_float(
    "detector_ood_quantile",
    0.99,
    "ood: a query is out when its distance exceeds this quantile of held-out calibration images.",
)
flags.DEFINE_float(
    "detector_ood_share", 0.5, "ood flags a client when more of its window than this is out."
)
flags.DEFINE_integer(
    "detector_max_clients", 256, "Clients tracked at once (least recent forgotten).", lower_bound=1
)
flags.DEFINE_string(
    "detector_degrade",
    "gaussian:0.5",
    "The output defence (as --output_defense) a flagged client's answers go through with "
    "--detector_action=degrade.",
)
flags.DEFINE_string("detector_data_dir", None, "Data directory of a pd: --detector_calibration.")
# Chaos: a flaky, slow API to test an attack's retries and durability against.
flags.DEFINE_float(
    "inject_failure_rate",
    0.0,
    "Fraction of predictions answered UNAVAILABLE / 503 at random.",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_integer("inject_latency_ms", 0, "Latency added to every prediction.", lower_bound=0)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from copycat_tf.server import app
    from copycat_tf.server.process import die_with_parent

    die_with_parent()

    app.serve(app.server_config_from_flags(FLAGS))


def entry() -> None:
    """The console script (copycat-...) and `python -m copycat_tf.model_server`."""
    cli.run(main)


if __name__ == "__main__":
    entry()
