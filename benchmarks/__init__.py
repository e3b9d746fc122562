"""Reproducible performance measurements; run each as `python -m benchmarks.<name>`."""

import copycat_tf  # noqa: F401  (TensorFlow imported quietly before the benchmarks import it)
