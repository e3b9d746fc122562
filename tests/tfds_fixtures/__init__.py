"""A tiny TFDS dataset builder (TFDS requires builders to live in a package)."""

import numpy as np
import tensorflow_datasets as tfds


class TinyShapes(tfds.core.GeneratorBasedBuilder):
    """50 grey 12x12 images in two classes, only a train split."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(12, 12, 1)),
                    "label": tfds.features.ClassLabel(names=["a", "b"]),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(50)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"image": np.full((12, 12, 1), i, np.uint8), "label": i % 2}
