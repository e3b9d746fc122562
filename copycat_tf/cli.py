"""Shared command-line plumbing of the entry modules: running main, recipes from flags,
one-line errors.

Entry modules define their flags at import (no TensorFlow needed, so `--help` is instant)
and import the library inside main(); `run` imports TensorFlow first with its native
start-up noise filtered out.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable

from absl import app, flags

from copycat_tf.errors import Terminated, UserInputError

# Recipe fields whose flag has another name.
_FLAG_NAMES = {"precision": "mixed_precision"}


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


def recipe_from_flags(values: flags.FlagValues, base):
    """`base` (a recipe dataclass) with each field that has a flag of its name overridden."""
    overrides = {}
    for field in dataclasses.fields(base):
        name = _FLAG_NAMES.get(field.name, field.name)
        if name in values and values[name].value is not None:
            overrides[field.name] = values[name].value
    return dataclasses.replace(base, **overrides)


def define_api_key_flags() -> None:
    """--api_key_env / --api_key_file: where the target's API key comes from."""
    flags.DEFINE_string("api_key_env", "", "Environment variable holding the target's API key.")
    flags.DEFINE_string("api_key_file", "", "File holding the target's API key (first line).")


def api_key_from_flags() -> str | None:
    """The API key the --api_key_env / --api_key_file flags point at (never logged)."""
    return read_api_key(flags.FLAGS.api_key_env, flags.FLAGS.api_key_file)


def read_api_key(env_var: str = "", path: str = "") -> str | None:
    """An API key from an environment variable or a file's first line (never logged)."""
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


def run(
    main: Callable[[list[str]], None],
    required: tuple[str, ...] = (),
    flags_parser: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """app.run(main): TensorFlow imported quietly first, user errors printed as one line
    (exit status 2) instead of a traceback; --version prints the version. `flags_parser`
    replaces absl's (main gets what it returns)."""
    if "--version" in sys.argv[1:]:
        from copycat_tf.__main__ import main as package_main  # one version line for all

        sys.exit(package_main(["--version"]))
    for name in required:
        flags.mark_flag_as_required(name)
    if main.__module__ != "__main__":
        # A console script (copycat-<verb>): absl's --help lists the key flags of the
        # program it runs, so the verb's flags are made key flags of that program too.
        for flag in flags.FLAGS.get_key_flags_for_module(main.__module__):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def wrapped(argv):
        from copycat_tf._native_log import import_tensorflow_quietly, quiet_library_info

        import_tensorflow_quietly()
        quiet_library_info()
        prog = sys.argv[0].rsplit("/", 1)[-1].removesuffix(".py")
        try:
            main(argv)
        except (UserInputError, FloatingPointError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
        except Terminated:
            print(f"{prog}: terminated; re-run the same command to resume", file=sys.stderr)
            sys.exit(128 + 15)

    if flags_parser is None:
        app.run(wrapped)
    else:
        app.run(wrapped, flags_parser=flags_parser)
