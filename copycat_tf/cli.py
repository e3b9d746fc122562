"""Shared command-line plumbing for the entry modules (flags, one-line errors)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

from copycat_tf._native_log import quiet_library_info
from copycat_tf.errors import UserInputError


def parse_image_size(text: str) -> tuple[int, int] | None:
    """'' -> None, '32' -> (32, 32), '32x48' -> (32, 48)."""
    if not text:
        return None
    parts = text.lower().split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 1:
        raise UserInputError(f"--image_size={text!r} is invalid; expected H or HxW, e.g. 32x32")
    return size


def define_api_key_flags() -> None:
    """--api_key_env / --api_key_file: where the target's API key comes from."""
    flags.DEFINE_string("api_key_env", "", "Environment variable holding the target's API key.")
    flags.DEFINE_string("api_key_file", "", "File holding the target's API key (first line).")


def api_key_from_flags() -> str | None:
    """The API key the --api_key_env / --api_key_file flags point at (never logged)."""
    return read_api_key(flags.FLAGS.api_key_env, flags.FLAGS.api_key_file)


def read_api_key(env_var: str = "", path: str = "") -> str | None:
    """An API key from an environment variable or a file's first line (never logged)."""
    import os

    if env_var:
        value = os.environ.get(env_var)
        if not value:
            raise UserInputError(f"--api_key_env={env_var}: variable unset or empty")
        return value
    if path:
        try:
            with open(path) as f:
                return f.readline().strip()
        except OSError as e:
            raise UserInputError(f"--api_key_file {path}: {e}") from e
    return None


def run(main: Callable[[list[str]], None], required: tuple[str, ...] = ()) -> None:
    """app.run(main) printing user errors as one line and exiting 2 instead of a traceback."""
    for name in required:
        flags.mark_flag_as_required(name)

    def wrapped(argv):
        quiet_library_info()
        try:
            main(argv)
        except (UserInputError, FloatingPointError) as e:
            prog = sys.argv[0].rsplit("/", 1)[-1].removesuffix(".py")
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(wrapped)
