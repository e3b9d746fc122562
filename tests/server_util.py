"""Starting the embedded model server for tests: in-process (the subprocess runner is
copycat_tf.server.process.ServerProcess)."""

from __future__ import annotations

import contextlib

from copycat_tf.server.process import ServerProcess, free_port

__all__ = ["ServerProcess", "in_process_server"]


@contextlib.contextmanager
def in_process_server(base_path: str, model: str = "m", **overrides):
    """A ModelServer in this process on free localhost ports (real sockets)."""
    from copycat_tf.server import app
    from copycat_tf.server.model_store import ModelConfig

    config = app.ServerConfig(
        models=overrides.pop("models", None) or [ModelConfig(model, base_path)],
        port=free_port(),
        rest_api_port=free_port(),
        host="127.0.0.1",
        **overrides,
    )
    server = app.ModelServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()
