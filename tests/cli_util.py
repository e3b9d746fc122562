"""Running the entry modules as a user does: a subprocess with flags."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_verb(verb: str, *args: str, timeout: float = 300, env: dict | None = None):
    """Runs `python -m copycat_tf.<verb> args...`; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"copycat_tf.{verb}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=full_env,
    )


def error_lines(proc) -> list[str]:
    """The non-empty lines a failed command wrote to stderr."""
    return [line for line in proc.stderr.splitlines() if line.strip()]
