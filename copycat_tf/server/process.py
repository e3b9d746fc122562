"""Running `python -m copycat_tf.model_server` as a child process on free local ports.

Used by the tests, the benchmarks and the demo: a real server process with real sockets,
ready (a version AVAILABLE) when `start()` returns, drained with SIGTERM on `stop()`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import requests

# The directory holding the copycat_tf package (a checkout or site-packages): the child
# imports the same copycat_tf as its parent, from any working directory.
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Times a server is started, on new ports each time, when its ports were taken first.
BIND_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_available(
    rest_port: int,
    model: str,
    timeout_s: float = 120.0,
    proc=None,
    host: str = "127.0.0.1",
    log_path: str | None = None,
    api_key: str | None = None,
) -> None:
    """Polls GET /v1/models/<model> until a version is AVAILABLE (TF Serving readiness).

    Raises:
      RuntimeError: the server process exited.
      TimeoutError: no version became AVAILABLE in time.
    """
    deadline = time.monotonic() + timeout_s
    url = f"http://{host}:{rest_port}/v1/models/{model}"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            err = ""
            if log_path:
                with open(log_path, errors="replace") as f:
                    err = f.read()[-2000:]
            raise RuntimeError(f"model server exited with {proc.returncode}: {err}")
        try:
            r = requests.get(url, timeout=2, headers={"x-api-key": api_key} if api_key else {})
            if r.ok and any(v["state"] == "AVAILABLE" for v in r.json()["model_version_status"]):
                return
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"model {model} not AVAILABLE at {url} after {timeout_s:.0f}s")


# The environment variable through which spawn() asks a child to die with its parent.
PARENT_PID_ENV = "COPYCAT_TF_PARENT_PID"


def spawn(args: list[str], env: dict, log) -> subprocess.Popen:
    """Starts a child process tied to this one, stdout discarded, stderr to the file `log`.

    The child ties itself (die_with_parent(), called first by model_server), so Popen runs
    no Python between fork and exec: with gRPC live in this process, code there races gRPC's
    fork handlers, which restart its poller in the child (grpcio >= 1.81, grpc/grpc#43055):
    children died by SIGABRT ("epoll_wait error: Bad file descriptor") when Popen closed
    descriptors before exec, and by SIGSEGV with a preexec_fn. close_fds=False for the same
    reason; Python's descriptors are non-inheritable (PEP 446), exec closes them anyway.
    """
    return subprocess.Popen(
        args,
        env={**env, PARENT_PID_ENV: str(os.getpid())},
        stdout=subprocess.DEVNULL,
        stderr=log,
        close_fds=False,
    )


def die_with_parent() -> None:
    """Linux: when started by spawn(), this process gets SIGTERM when the process that
    started it dies (even by SIGKILL), so a killed demo or test leaves no orphan server."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if not parent.isdigit() or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl: nobody would signal
        os.kill(os.getpid(), signal.SIGTERM)


class ServerProcess:
    """A model_server child process on free localhost ports; a context manager.

    Args:
      *flags: extra model_server flags (--model_base_path=..., --output_defense=...).
      model: the model name whose readiness `start()` waits for.
      stderr_path: file for the server's log (access lines); None uses a temporary file.
      api_key: the key readiness checks send, for a server started with --api_keys_file.
    """

    def __init__(
        self,
        *flags: str,
        model: str = "m",
        stderr_path: str | None = None,
        api_key: str | None = None,
    ):
        self.host = "127.0.0.1"
        self.grpc_port = free_port()
        self.rest_port = free_port()
        self.model = model
        self.args = [
            sys.executable,
            "-m",
            "copycat_tf.model_server",
            f"--host={self.host}",
            f"--port={self.grpc_port}",
            f"--rest_api_port={self.rest_port}",
            *flags,
        ]
        self._stderr_path = stderr_path
        self.api_key = api_key
        self.proc: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def rss_kb(self) -> int:
        """Resident memory of the server process (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def start(self, timeout_s: float = 120.0) -> ServerProcess:
        """Starts the process and waits until the model is AVAILABLE."""
        if self._stderr_path is None:
            fd, self._stderr_path = tempfile.mkstemp(prefix="model_server-", suffix=".log")
            os.close(fd)
        env = dict(os.environ)
        parts = (_PACKAGE_PARENT, env.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in parts if p)
        # A file, not a pipe: nobody reads a pipe while the server runs, and a full pipe
        # would block its logging.
        for attempt in range(BIND_ATTEMPTS):
            with open(self._stderr_path, "w") as log:
                self.proc = spawn(self.args, env, log)
            try:
                wait_available(
                    self.rest_port,
                    self.model,
                    timeout_s,
                    proc=self.proc,
                    log_path=self._stderr_path,
                    api_key=self.api_key,
                )
                return self
            except RuntimeError:
                self.stop()
                # Another process took a port between free_port() and the server's bind
                # (e.g. parallel test workers): new ports, once more.
                if "cannot bind" not in self.log() or attempt == BIND_ATTEMPTS - 1:
                    raise
                self._new_ports()
            except BaseException:
                self.stop()
                raise
        return self

    def _new_ports(self) -> None:
        old = (f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}")
        self.grpc_port, self.rest_port = free_port(), free_port()
        new = (f"--port={self.grpc_port}", f"--rest_api_port={self.rest_port}")
        self.args = [dict(zip(old, new, strict=True)).get(a, a) for a in self.args]

    def log(self) -> str:
        """What the server has written to stderr so far."""
        with open(self._stderr_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout_s: float = 30.0) -> tuple[int, str]:
        """SIGTERM (the server drains), then wait; returns (exit code, server log)."""
        if self.proc is None:
            return 0, ""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.log()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
