"""A run's workdir: its identity (resolved flags, config) written first, and atomic files."""

from __future__ import annotations

import json
import os
import tempfile

from copycat_tf.errors import UserInputError

FLAGS_FILE = "flags.txt"
CONFIG_FILE = "config.json"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the new one, never half.

    Temp file in the same directory, fsync, rename over `path`, fsync the directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: str, obj) -> None:
    """`atomic_write_bytes` of `obj` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _resolved(value):
    """A recorded path (or list of paths) with symbolic links resolved, for comparison."""
    if isinstance(value, list):
        return [_resolved(v) for v in value]
    return os.path.realpath(value) if isinstance(value, str) else value


def init_workdir(
    workdir: str, identity: dict, flags_text: str = "", path_keys: tuple[str, ...] = ()
) -> None:
    """Creates `workdir` and records the run's identity before anything else is written.

    Args:
      workdir: the run's directory.
      identity: settings that define the run (data, model, ...). Re-running in a workdir
        whose recorded identity differs is refused, so checkpoints never mix runs.
      flags_text: the resolved command-line flags (written to flags.txt).
      path_keys: identity keys holding a path or a list of paths; they are compared with
        symbolic links resolved, so a run reached through another link to the same
        directory (a symlinked runs/ folder, a checkout reached through a link) still resumes.

    Raises:
      UserInputError: the workdir is not writable or belongs to a different run.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"workdir {workdir} cannot be created ({e}); pick another") from e
    if not os.access(workdir, os.W_OK):
        raise UserInputError(f"workdir {workdir} is not writable; pick another --workdir")
    config_path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path) as f:
            recorded = json.load(f)

        def same(key):
            if key in path_keys:
                return _resolved(recorded.get(key)) == _resolved(identity[key])
            return recorded.get(key) == identity[key]

        changed = sorted(k for k in identity if not same(k))
        if changed:
            detail = ", ".join(f"{k}: {recorded.get(k)!r} -> {identity[k]!r}" for k in changed)
            raise UserInputError(
                f"workdir {workdir} holds a different run ({detail}); use a new --workdir "
                "or the original settings to resume"
            )
    atomic_write_json(config_path, identity)
    if flags_text:
        atomic_write_bytes(os.path.join(workdir, FLAGS_FILE), flags_text.encode())
