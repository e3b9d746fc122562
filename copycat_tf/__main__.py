"""`python -m copycat_tf`: the verbs, one line each; `--version` prints the version."""

import os
import sys

from copycat_tf import __version__

VERBS = (
    ("train_target", "train the target on problem-domain data; export its SavedModel"),
    ("model_server", "serve SavedModels with TensorFlow Serving's REST and gRPC APIs"),
    ("steal", "query a target with non-problem-domain images; write the fake dataset"),
    ("train_copycat", "train a copycat on a fake dataset; export it like the target"),
    ("evaluate", "compare a copycat with its target on labelled test data"),
    ("demo", "the whole attack on Fashion-MNIST in one command"),
    ("study", "measure the attack the way the Copycat papers do; write RESULTS.md"),
)


def main(argv: list[str]) -> int:
    if "--version" in argv:
        return _write(f"copycat_tf {__version__}\n")
    width = max(len(name) for name, _ in VERBS)
    return _write(
        f"copycat_tf {__version__}: copy a black-box image classifier and measure the copy.\n\n"
        "usage: python -m copycat_tf.<verb> [flags] (or copycat-<verb>); --help on any verb\n\n"
        + "".join(f"  {name:<{width}}  {what}\n" for name, what in VERBS)
    )


def _write(text: str) -> int:
    """Writes to stdout; a reader that stops early (`| head`, `| grep -q`) is no error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would report the failed flush again at exit: point stdout at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
