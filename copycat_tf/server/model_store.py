"""Model repository of the embedded server: discovery, loading, version policies, labels.

As TensorFlow Serving does (reference §3.2): versions are numeric subdirectories of a
model's base path; a version policy (latest N, all, specific) picks which to serve; a
poller picks up new versions without restart; a new version is loaded before an old one
is unloaded, and a version that fails to load never replaces one being served.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import numpy as np
import tensorflow as tf
from absl import logging
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.config import model_server_config_pb2

from copycat_tf.contract import SERVING_DEFAULT as DEFAULT_SIGNATURE
from copycat_tf.server.status import invalid, not_found


@dataclasses.dataclass(frozen=True)
class TensorSpecInfo:
    """One signature input or output: dtype, shape (None = unknown dim) and graph name."""

    dtype: tf.DType
    shape: tuple | None
    tensor_name: str

    def shape_fits(self, shape: tuple) -> bool:
        if self.shape is None:
            return True
        return len(shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    def shape_text(self) -> str:
        if self.shape is None:
            return "<unknown>"
        return "[" + ",".join("?" if d is None else str(d) for d in self.shape) + "]"


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """A callable signature of a loaded SavedModel."""

    name: str
    method_name: str
    inputs: dict[str, TensorSpecInfo]
    outputs: dict[str, TensorSpecInfo]

    @property
    def batchable(self) -> bool:
        """Every input has a leading dimension of unknown size (requests can be merged)."""
        return all(
            s.shape is not None and len(s.shape) >= 1 and s.shape[0] is None
            for s in self.inputs.values()
        )


def _tensor_info(info: meta_graph_pb2.TensorInfo) -> TensorSpecInfo:
    shape = None
    if not info.tensor_shape.unknown_rank:
        shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
    return TensorSpecInfo(tf.as_dtype(info.dtype), shape, info.name)


class Servable:
    """One loaded version of one model."""

    def __init__(self, name: str, version: int, path: str):
        self.name = name
        self.version = version
        self.path = path
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved = saved_model_pb2.SavedModel.FromString(f.read())
        # The SignatureDefs exactly as stored, for GetModelMetadata.
        self.signature_defs = dict(saved.meta_graphs[0].signature_def)
        self._loaded = tf.saved_model.load(path)
        self._functions = dict(self._loaded.signatures)
        self.signatures = {
            key: SignatureInfo(
                name=key,
                method_name=sig.method_name,
                inputs={k: _tensor_info(v) for k, v in sig.inputs.items()},
                outputs={k: _tensor_info(v) for k, v in sig.outputs.items()},
            )
            for key, sig in self.signature_defs.items()
            if key in self._functions
        }

    def run(self, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs a signature on numpy inputs; returns numpy outputs."""
        fn = self._functions[signature]
        info = self.signatures[signature]
        feed = {k: tf.constant(v, dtype=info.inputs[k].dtype) for k, v in inputs.items()}
        return {k: v.numpy() for k, v in fn(**feed).items()}

    def warm_up(self) -> None:
        """Traces the default signature once so the first request is not slow."""
        info = self.signatures.get(DEFAULT_SIGNATURE)
        if info is None or not info.batchable:
            return
        specs = info.inputs.values()
        if any(s.dtype == tf.string or None in s.shape[1:] for s in specs):
            return
        self.run(
            DEFAULT_SIGNATURE,
            {
                k: np.zeros((1, *s.shape[1:]), s.dtype.as_numpy_dtype)
                for k, s in info.inputs.items()
            },
        )


@dataclasses.dataclass
class ModelConfig:
    """One entry of a ModelServerConfig: where a model lives and which versions to serve."""

    name: str
    base_path: str
    policy: str = "latest"  # "latest", "all" or "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()
    labels: dict[str, int] = dataclasses.field(default_factory=dict)

    def aspired(self, available: list[int]) -> set[int]:
        if self.policy == "all":
            return set(available)
        if self.policy == "specific":
            return set(available) & set(self.versions)
        return set(sorted(available)[-max(self.num_versions, 1) :])


def parse_model_config_file(path: str) -> list[ModelConfig]:
    """Reads a TF Serving models.config (ModelServerConfig text proto).

    Raises:
      ValueError: unreadable file, bad text proto, or an unsupported config.
    """
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"--model_config_file {path} cannot be read: {e}") from e
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ValueError(
            f"--model_config_file {path} is not a ModelServerConfig text proto: {e}"
        ) from e
    return configs_from_proto(config, os.path.dirname(os.path.abspath(path)))


def configs_from_proto(config, relative_to: str = "") -> list[ModelConfig]:
    """ModelConfigs of a ModelServerConfig proto (only model_config_list is supported)."""
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError("only model_config_list configs are supported")
    models = []
    for entry in config.model_config_list.config:
        if not entry.name or not entry.base_path:
            raise ValueError(f"model config entry needs a name and a base_path: {entry}")
        if entry.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model {entry.name}: platform {entry.model_platform!r} unsupported")
        policy = entry.model_version_policy.WhichOneof("policy_choice") or "latest"
        base = entry.base_path
        if relative_to and not os.path.isabs(base):
            base = os.path.join(relative_to, base)
        models.append(
            ModelConfig(
                name=entry.name,
                base_path=base,
                policy=policy,
                num_versions=entry.model_version_policy.latest.num_versions or 1,
                versions=tuple(entry.model_version_policy.specific.versions),
                labels=dict(entry.version_labels),
            )
        )
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return models


@dataclasses.dataclass
class VersionState:
    """What GetModelStatus reports for one version."""

    state: str  # "LOADING", "AVAILABLE", "END"
    error: str = ""
    servable: Servable | None = None
    mtime: float = 0.0
    path: str = ""  # the version directory it was (or is being) loaded from


def _version_dirs(base_path: str) -> dict[int, str]:
    try:
        names = os.listdir(base_path)
    except OSError:
        return {}
    found = {}
    for name in names:
        path = os.path.join(base_path, name)
        if name.isdigit() and os.path.isdir(path):
            found.setdefault(int(name), path)
    return found


class ModelStore:
    """Loaded models and versions; thread-safe lookups for request handlers."""

    def __init__(
        self,
        configs: list[ModelConfig],
        poll_seconds: float = 1.0,
        roots: list[str] | None = None,
    ):
        # Where reloaded configs may point: the roots named at startup, else the startup
        # models' own base paths.
        self.roots = list(roots) if roots else [c.base_path for c in configs]
        self._lock = threading.RLock()
        self._configs = {c.name: c for c in configs}
        self._versions: dict[str, dict[int, VersionState]] = {c.name: {} for c in configs}
        self._poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Loads what is there now, then keeps polling (if poll_seconds > 0)."""
        self.poll_once()
        if self._poll_seconds > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="model-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            try:
                self.poll_once()
            except Exception:  # the poller must survive anything a file system does
                logging.exception("model poll failed")

    def check_under_roots(self, configs: list[ModelConfig]) -> None:
        """Refuses base paths outside the model roots (resolved: no `..`, no symlink out).

        Raises:
          ServingError: INVALID_ARGUMENT naming the model, not the path.
        """
        roots = [os.path.realpath(r) for r in self.roots]
        for config in configs:
            raw = config.base_path
            resolved = os.path.realpath(raw)
            inside = any(
                resolved == root or resolved.startswith(root.rstrip(os.sep) + os.sep)
                for root in roots
            )
            if ".." in raw.split(os.sep) or not os.path.isabs(raw) or not inside:
                raise invalid(
                    f"base_path of model {config.name!r} is not under one of the server's "
                    "model roots (--model_root)"
                )

    def reload_config(self, configs: list[ModelConfig]) -> None:
        """Replaces the served model list (HandleReloadConfigRequest); base paths must lie
        under the model roots.

        Raises:
          ServingError: a base path outside the roots.
        """
        self.check_under_roots(configs)
        with self._lock:
            self._configs = {c.name: c for c in configs}
            self._versions = {c.name: self._versions.get(c.name, {}) for c in configs}
        self.poll_once()

    def poll_once(self) -> None:
        """Brings each model's loaded versions in line with its directory and policy."""
        with self._lock:
            configs = list(self._configs.values())
        for config in configs:
            self._sync_model(config)

    def _sync_model(self, config: ModelConfig) -> None:
        dirs = _version_dirs(config.base_path)
        if not dirs:
            logging.log_every_n_seconds(
                logging.WARNING,
                "No versions of servable %s found under base path %s. Did you forget to "
                "name your leaf directory as a number (eg. '/1/')?",
                60,
                config.name,
                config.base_path,
            )
        aspired = config.aspired(list(dirs))
        with self._lock:
            states = self._versions.setdefault(config.name, {})
            todo = []
            for version in sorted(aspired):
                path = dirs[version]
                mtime = _mtime(path)
                current = states.get(version)
                moved = current is not None and current.path != path
                # Reload a version unloaded cleanly (by policy or a config reload) when it
                # is wanted again, or that now lives elsewhere (a config reload); retry a
                # broken one only once its directory changed.
                if current is None or (
                    current.state == "END"
                    and (not current.error or current.mtime != mtime or moved)
                ):
                    states[version] = VersionState("LOADING", mtime=mtime, path=path)
                    todo.append(version)
                elif moved and current.state == "AVAILABLE":
                    todo.append(version)  # the old one serves until the new one is loaded
        for version in todo:
            self._load(config.name, version, dirs[version])
        with self._lock:
            states = self._versions.get(config.name, {})
            serving_aspired = any(states[v].state == "AVAILABLE" for v in aspired if v in states)
            for version, st in states.items():
                gone = version not in dirs
                # Availability preserving: unload an old version only once an aspired
                # one serves, or when its directory disappeared.
                if st.state == "AVAILABLE" and version not in aspired and (serving_aspired or gone):
                    logging.info("unloading %s version %d", config.name, version)
                    states[version] = VersionState("END", mtime=st.mtime, path=st.path)

    def _load(self, name: str, version: int, path: str) -> None:
        start = time.monotonic()
        try:
            servable = Servable(name, version, path)
            servable.warm_up()
        except Exception as e:  # a broken export must not take the server down
            logging.error("failed to load %s version %d from %s: %s", name, version, path, e)
            with self._lock:
                st = self._versions.get(name, {}).get(version)
                if st is not None and st.state != "AVAILABLE":  # else the old one serves on
                    # Clients see the kind of failure; paths and details stay in the log.
                    st.state, st.path = "END", path
                    st.error = f"{type(e).__name__}: the version failed to load (see server log)"
            return
        with self._lock:
            versions = self._versions.get(name)
            if versions is not None and version in versions:
                versions[version] = VersionState(
                    "AVAILABLE", servable=servable, mtime=_mtime(path), path=path
                )
        logging.info(
            "loaded %s version %d from %s in %.1fs", name, version, path, time.monotonic() - start
        )

    # ------------------------------------------------------------------ lookups

    def model_names(self) -> list[str]:
        with self._lock:
            return sorted(self._configs)

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a request names, with TF Serving's errors.

        Raises:
          ServingError: NOT_FOUND for unknown models/versions, INVALID_ARGUMENT for
            unknown labels.
        """
        with self._lock:
            config = self._configs.get(name)
            if label is not None:
                if config is None or label not in config.labels:
                    raise invalid(f"Unrecognized servable version label: {label}")
                version = config.labels[label]
            states = self._versions.get(name, {})
            if version is None:
                available = [v for v, s in states.items() if s.state == "AVAILABLE"]
                if not available:
                    raise not_found(f"Servable not found for request: Latest({name})")
                return states[max(available)].servable
            st = states.get(version)
            if st is None or st.state != "AVAILABLE":
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return st.servable

    def status(self, name: str, version: int | None = None) -> list[tuple[int, VersionState]]:
        """(version, state) pairs for GetModelStatus, newest first."""
        with self._lock:
            states = self._versions.get(name)
            if name not in self._configs or not states:
                raise not_found(f"Could not find any versions of model {name}")
            if version is not None:
                if version not in states:
                    raise not_found(f"Could not find version {version} of model {name}")
                return [(version, states[version])]
            return sorted(states.items(), reverse=True)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0
