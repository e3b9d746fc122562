"""`python -m copycat_tf`: the verbs, one line each; `--version` prints the version."""

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
        print(f"copycat_tf {__version__}")
        return 0
    print(f"copycat_tf {__version__}: copy a black-box image classifier and measure the copy.\n")
    print("usage: python -m copycat_tf.<verb> [flags] (or copycat-<verb>); --help on any verb\n")
    width = max(len(name) for name, _ in VERBS)
    for name, what in VERBS:
        print(f"  {name:<{width}}  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
