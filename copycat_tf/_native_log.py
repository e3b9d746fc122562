"""Keeps TensorFlow's native start-up chatter out of the verbs' output.

TensorFlow's C++ runtime writes lines such as "oneDNN custom operations are on" and
"Could not find cuda drivers" straight to file descriptor 2 while it is imported and
while devices are first listed, before TF_CPP_MIN_LOG_LEVEL is honoured. We capture that
descriptor during those two steps and pass through every line that is not known noise,
so real errors still reach the user. TF_CPP_MIN_LOG_LEVEL=0 disables the filter.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on"
    r"|Could not find cuda drivers|failed call to cuInit|Unable to register cu\w+ factory"
    r"|TF-TRT Warning|computation placer already registered|cuda_(?:dnn|fft|blas)\.cc"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
)


def import_tensorflow_quietly() -> None:
    """Imports tensorflow and lists its devices with known native noise filtered out.

    TensorFlow's Python-side INFO logging is off unless the user set TF_CPP_MIN_LOG_LEVEL.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
            # TF's Python INFO lines (SavedModel writing, signature renames) are not ours.
            tf.get_logger().setLevel("WARNING")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not _NOISE.search(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _LibraryInfoFilter:
    """Drops INFO records that TensorFlow/Keras modules log through absl (SavedModel
    writing details and the like); warnings and errors still pass."""

    _PARTS = (f"{os.sep}tensorflow{os.sep}", f"{os.sep}keras{os.sep}", f"{os.sep}tf_keras{os.sep}")

    def filter(self, record) -> bool:
        import logging

        if record.levelno >= logging.WARNING:
            return True
        return not any(part in record.pathname for part in self._PARTS)


def quiet_library_info() -> None:
    """Installs the filter on absl's handler (call once the program uses absl logging)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
        handler.addFilter(_LibraryInfoFilter())
