"""copycat_tf: copy a black-box image classifier and measure how much was copied.

Importing the package has no side effects; the verbs (`python -m copycat_tf.<verb>`) import
TensorFlow through `copycat_tf.cli.run`, which keeps its native start-up noise out of
their output.
"""

__version__ = "0.1.0"
