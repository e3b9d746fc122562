"""copycat_tf: copy a black-box image classifier and measure how much was copied."""

import os

# Python-side TensorFlow logging; users who want it set TF_CPP_MIN_LOG_LEVEL themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from copycat_tf._native_log import import_tensorflow_quietly

import_tensorflow_quietly()

__version__ = "0.1.0"
