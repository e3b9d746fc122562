"""The copycat's tf.data input path against the in-memory `fit` ceiling of the same model.

  .venv/bin/python -m benchmarks.copycat_input [--records=20000] [--models=deep_cnn,plain_cnn]

Steals a fake dataset of --records NPD images from an untrained Fashion-MNIST-shaped
target in-process (real shards and manifest on disk), then, for each model and the
precision policy (--precision, default: what `auto` picks on this machine), trains one
epoch two ways after a warm-up epoch: through train_copycat's input path (shards read in
parallel, decoded, class-balanced, batched, prefetched: training.copycat.training_split +
data.batches.training_batches) and on the same images held in memory as numpy arrays
(`model.fit(x, y)`). Prints images/s of each and their ratio; the two are measured one
after the other in the same process, so the ratio holds even on a loaded machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

from benchmarks.common import SHAPE, export_random_target, machine_line
from copycat_tf import pipeline
from copycat_tf.recipe import Recipe


def _fit_seconds(model, *data, batch_size: int | None = None) -> float:
    """Seconds of one epoch of model.fit(*data), after a warm-up epoch (tracing, caches)."""
    model.fit(*data, batch_size=batch_size, epochs=1, verbose=0)
    start = time.perf_counter()
    model.fit(*data, batch_size=batch_size, epochs=1, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--models", default="deep_cnn,small_cnn,plain_cnn")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    import keras
    import numpy as np

    from copycat_tf.data import batches
    from copycat_tf.data import fake_dataset as fd
    from copycat_tf.models import registry
    from copycat_tf.training import runtime
    from copycat_tf.training.copycat import training_split

    policy = runtime.set_precision(args.precision)
    recipe = dataclasses.replace(Recipe(), npd="synthetic:shapes", query_budget=args.records)
    workdir = tempfile.mkdtemp(prefix="bench-copycat-input-")
    target = export_random_target(workdir)
    pipeline.steal(recipe, f"savedmodel:{target}", os.path.join(workdir, "fake"))
    data = fd.load_fake_data([os.path.join(workdir, "fake")])
    train, _, epoch_size, *_ = training_split(
        data, recipe.holdout_percent, recipe.balance, False, recipe.seed, recipe.max_replication
    )
    images, labels = [], []
    for x, y in train.batch(4096).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    x = np.concatenate(images).astype(np.float32)
    y = np.concatenate(labels)
    rows = []
    for name in args.models.split(","):
        keras.utils.set_random_seed(0)
        model = registry.build_model(name, SHAPE, data.num_classes)
        model.compile(
            optimizer="adamw",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        ds = batches.training_batches(train, recipe.batch_size, None, seed=recipe.seed, cache=False)
        memory = len(x) / _fit_seconds(model, x, y, batch_size=recipe.batch_size)
        tfdata = epoch_size / _fit_seconds(model, ds)
        rows.append((name, tfdata, memory))
    print(f"\n{'model':<12} {'tf.data images/s':>17} {'in-memory images/s':>19} {'ratio':>6}")
    for name, tfdata, memory in rows:
        print(f"{name:<12} {tfdata:>17.0f} {memory:>19.0f} {tfdata / memory:>6.2f}")
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.copycat_input --records={args.records}"
        f" --models={args.models} --precision={args.precision}"
    )
    print(machine_line(f"precision {policy}; batch {recipe.batch_size}; {epoch_size} images"))
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
