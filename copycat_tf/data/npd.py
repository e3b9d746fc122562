"""Non-problem-domain (NPD) image streams: what the attacker sends to the target.

One spec string selects a source (see `parse_npd_spec`):

  folder:<path>                 every image under <path> (recursive); PNG, JPEG, GIF, BMP,
                                WebP, ... Unreadable files are skipped and counted.
  tfds:<name>[:<split>]         a prepared TFDS dataset (labels dropped), split default train
  pd:<problem-domain spec>      problem-domain images, labels dropped (e.g.
                                pd:fashion_mnist:train), for the NPD+PD fine-tuning data:
                                the target labels them, ground truth is never read
  synthetic:noise               uniform noise, needs no data
  synthetic:dead_leaves         occluding disks and squares of random grey levels or colours
                                with power-law sizes (the "dead leaves" model), no data
  mix:<w>*<spec>|<w>*<spec>...  a weighted mixture, e.g.
                                mix:0.5*folder:/usr/share/openclipart/png|0.5*synthetic:dead_leaves

The stream is indexed: item k is a pure function of (spec, seed, k), so a run can resume at
any index, and `shard_index/num_shards` split the indices between workers (k mod num_shards).
Images come out cropped/resized to the target's (H, W) and converted to its channels; with
`crops_per_image=r`, each source image gives r items: the centred full view, then r-1
random crops.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from copycat_tf.data import images
from copycat_tf.data.problem_domain import list_images, looks_like_image
from copycat_tf.errors import UserInputError

NPD_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")
GENERATORS = ("noise", "dead_leaves")
_MIX_CHUNK = 4096


@dataclasses.dataclass
class NpdItem:
    """One stream position: the image to send, or None when the source was unreadable."""

    index: int
    image: np.ndarray | None
    source_id: str
    error: str = ""


# ----------------------------------------------------------------------------- sources


class _Synthetic:
    """Images made from the index's random generator alone (infinite)."""

    finite = False
    length = None

    def __init__(self, name: str):
        if name not in GENERATORS:
            raise UserInputError(
                f"NPD generator {name!r} unknown; valid: "
                + ", ".join(f"synthetic:{g}" for g in GENERATORS)
            )
        self.name = name

    def item(self, local: int, shape, rng: np.random.Generator, crop: int) -> NpdItem:
        h, w, c = shape
        if self.name == "noise":
            image = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)
        else:
            image = dead_leaves(rng, h, w, c)
        return NpdItem(-1, image, f"{self.name}/{local}")


def dead_leaves(rng: np.random.Generator, h: int, w: int, c: int, shapes: int = 160):
    """A dead-leaves image: shapes painted front to back, each hiding what lies behind.

    Radii follow the scale-invariant density r^-3 between 1.5% and 60% of the image size,
    which gives natural-image-like edge and size statistics without any data.
    """
    size = max(h, w)
    r_min, r_max = 0.015 * size + 0.5, 0.6 * size
    u = rng.random(shapes)
    radii = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
    cx = rng.uniform(-0.1 * w, 1.1 * w, shapes)
    cy = rng.uniform(-0.1 * h, 1.1 * h, shapes)
    squares = rng.random(shapes) < 0.35
    colours = rng.integers(0, 256, size=(shapes + 1, c), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx = np.abs(xx[None] - cx[:, None, None].astype(np.float32))
    dy = np.abs(yy[None] - cy[:, None, None].astype(np.float32))
    r = radii[:, None, None].astype(np.float32)
    inside = np.where(squares[:, None, None], np.maximum(dx, dy) < r, dx * dx + dy * dy < r * r)
    # The first (front-most) shape covering a pixel wins; uncovered pixels get a background.
    front = np.where(inside.any(axis=0), inside.argmax(axis=0), shapes)
    return colours[front]


class _Folder:
    """Every image file under a directory, in a seeded order."""

    finite = True

    def __init__(self, root: str, seed: int):
        if not os.path.isdir(root):
            raise UserInputError(f"NPD folder {root} does not exist; pass folder:<directory>")
        files = list_images(root, NPD_EXTENSIONS)
        if not files:
            raise UserInputError(
                f"NPD folder {root} holds no image files ({', '.join(NPD_EXTENSIONS)})"
            )
        if not any(looks_like_image(f) for f in files):
            raise UserInputError(
                f"NPD folder {root}: none of its {len(files)} files is a readable image"
            )
        order = np.random.default_rng([seed, 1]).permutation(len(files))
        self.root = root
        self.files = [files[i] for i in order]
        self.length = len(self.files)

    def item(self, local: int, shape, rng: np.random.Generator, crop: int) -> NpdItem:
        path = self.files[local]
        source_id = os.path.relpath(path, self.root)
        try:
            with open(path, "rb") as f:
                image = images.open_image(f.read())
        except (OSError, ValueError) as e:
            return NpdItem(-1, None, source_id, str(e)[:200])
        return NpdItem(-1, images.crop_and_resize(image, shape, _crop_box(rng, crop)), source_id)


class _Tfds:
    """A prepared TFDS split read in order (labels dropped); images decoded here."""

    finite = True

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        from copycat_tf.data.problem_domain import tfds_builder

        builder = tfds_builder(name, data_dir)
        image_keys = [
            k for k, f in builder.info.features.items() if isinstance(f, tfds.features.Image)
        ]
        if not image_keys:
            raise UserInputError(f"TFDS dataset {name!r} has no image feature")
        if split not in builder.info.splits:
            raise UserInputError(
                f"TFDS dataset {name!r} has no split {split!r}: {sorted(builder.info.splits)}"
            )
        self.name, self.split, self.key = name, split, image_keys[0]
        self.builder = builder
        self.length = int(builder.info.splits[split].num_examples)
        self._iterator = None
        self._position = 0

    def _encoded(self, local: int) -> bytes:
        import tensorflow_datasets as tfds

        if self._iterator is None or local < self._position:
            ds = self.builder.as_dataset(
                split=self.split,
                shuffle_files=False,
                decoders={self.key: tfds.decode.SkipDecoding()},
            ).skip(local)
            self._iterator, self._position = ds.as_numpy_iterator(), local
        while self._position < local:
            next(self._iterator)
            self._position += 1
        self._position += 1
        return next(self._iterator)[self.key]

    def item(self, local: int, shape, rng: np.random.Generator, crop: int) -> NpdItem:
        source_id = f"{self.name}:{self.split}:{local}"
        try:
            image = images.open_image(self._encoded(local))
        except ValueError as e:
            return NpdItem(-1, None, source_id, str(e)[:200])
        return NpdItem(-1, images.crop_and_resize(image, shape, _crop_box(rng, crop)), source_id)


class _ProblemDomain:
    """Images of a problem-domain split (data.problem_domain), read in order, labels dropped."""

    finite = True

    def __init__(self, spec: str, data_dir: str | None):
        from copycat_tf.data import problem_domain

        parsed = problem_domain.parse_pd_spec(spec)
        domain = problem_domain.load_problem_domain(parsed, data_dir=data_dir)
        self.split = parsed.split or "train"
        self.dataset = domain.split(self.split).map(lambda x, y: x)
        self.spec = spec
        self.length = int(domain.sizes[self.split])
        self._iterator = None
        self._position = 0

    def item(self, local: int, shape, rng: np.random.Generator, crop: int) -> NpdItem:
        if self._iterator is None or local < self._position:
            self._iterator = self.dataset.skip(local).as_numpy_iterator()
            self._position = local
        while self._position < local:
            next(self._iterator)
            self._position += 1
        self._position += 1
        array = next(self._iterator)
        source_id = f"pd:{self.spec}:{local}"
        if crop == 0 and array.shape == tuple(shape):
            return NpdItem(-1, array, source_id)  # exactly the PD pixels
        image = images.Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        return NpdItem(-1, images.crop_and_resize(image, shape, _crop_box(rng, crop)), source_id)


def _crop_box(rng: np.random.Generator, crop: int):
    """None (centred full view) for crop 0, else a random crop of 25-100% of the area."""
    if crop == 0:
        return None
    area = rng.uniform(0.25, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = min(1.0, np.sqrt(area * ratio))
    h = min(1.0, np.sqrt(area / ratio))
    x0 = rng.uniform(0, 1 - w)
    y0 = rng.uniform(0, 1 - h)
    return (x0, y0, x0 + w, y0 + h)


# ----------------------------------------------------------------------------- specs


def _parse_single(spec: str, seed: int, data_dir: str | None):
    kind, sep, rest = spec.partition(":")
    if sep and kind == "synthetic":
        return _Synthetic(rest)
    if sep and kind == "folder" and rest:
        return _Folder(rest, seed)
    if sep and kind == "tfds" and rest:
        name, _, split = rest.partition(":")
        return _Tfds(name, split or "train", data_dir)
    if sep and kind == "pd" and rest:
        return _ProblemDomain(rest, data_dir)
    raise UserInputError(
        f"NPD spec {spec!r} is not understood; expected folder:<path>, tfds:<name>[:split], "
        f"pd:<problem-domain spec>, synthetic:<{'|'.join(GENERATORS)}> or "
        "mix:<w>*<spec>|<w>*<spec>"
    )


def parse_npd_spec(spec: str, seed: int = 0, data_dir: str | None = None):
    """[(weight, source)] for a spec; one entry with weight 1 unless it is a mixture.

    Raises:
      UserInputError: malformed spec, missing/empty folder, unknown generator or dataset.
    """
    spec = spec.strip()
    if not spec.startswith("mix:"):
        return [(1.0, _parse_single(spec, seed, data_dir))]
    parts = []
    for part in spec[len("mix:") :].split("|"):
        weight, star, inner = part.partition("*")
        try:
            w = float(weight)
        except ValueError:
            w = -1.0
        if not star or w <= 0:
            raise UserInputError(
                f"NPD mixture part {part!r} of {spec!r}: expected <weight>*<spec> with a "
                "positive weight, e.g. mix:0.5*synthetic:noise|0.5*synthetic:dead_leaves"
            )
        parts.append((w, _parse_single(inner, seed, data_dir)))
    if len(parts) < 2:
        raise UserInputError(f"NPD mixture {spec!r} needs at least two parts")
    total = sum(w for w, _ in parts)
    return [(w / total, s) for w, s in parts]


class NpdStream:
    """The deterministic, indexed stream of NPD images for one worker.

    Args:
      spec: NPD spec string.
      shape: (H, W, C) the target takes.
      seed: fixes order, crops, mixture draws and synthetic images.
      crops_per_image: items per source image (file or TFDS example).
      shard_index, num_shards: this worker takes indices k with k % num_shards == shard_index.
      data_dir: TFDS data dir for tfds: sources.
    """

    def __init__(
        self,
        spec: str,
        shape: tuple[int, int, int],
        seed: int = 0,
        crops_per_image: int = 1,
        shard_index: int = 0,
        num_shards: int = 1,
        data_dir: str | None = None,
    ):
        if crops_per_image < 1:
            raise UserInputError(f"--crops_per_image={crops_per_image}; expected >= 1")
        if not 0 <= shard_index < num_shards:
            raise UserInputError(
                f"--shard_index={shard_index} must be in [0, --num_shards={num_shards})"
            )
        self.spec = spec
        self.shape = tuple(int(d) for d in shape)
        self.seed = seed
        self.crops = crops_per_image
        self.shard_index, self.num_shards = shard_index, num_shards
        self.parts = parse_npd_spec(spec, seed, data_dir)
        self._weights = np.array([w for w, _ in self.parts])
        self._counts_before: dict[int, np.ndarray] = {0: np.zeros(len(self.parts), np.int64)}

    def _crops_of(self, source) -> int:
        return self.crops if source.finite else 1

    def _source_length(self, source) -> int | None:
        return None if not source.finite else source.length * self._crops_of(source)

    @property
    def length(self) -> int | None:
        """Items in the whole stream (all workers), None when unbounded or mixed."""
        if len(self.parts) == 1:
            return self._source_length(self.parts[0][1])
        return None

    def _chunk(self, chunk: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7, chunk])
        return rng.choice(len(self.parts), size=_MIX_CHUNK, p=self._weights)

    def _locate(self, k: int) -> tuple[int, int]:
        """(part, index within that part) of global index k."""
        if len(self.parts) == 1:
            return 0, k
        chunk, offset = divmod(k, _MIX_CHUNK)
        for c in range(max(self._counts_before), chunk):
            counts = np.bincount(self._chunk(c), minlength=len(self.parts))
            self._counts_before[c + 1] = self._counts_before[c] + counts
        assignment = self._chunk(chunk)
        part = int(assignment[offset])
        return part, int(self._counts_before[chunk][part] + (assignment[:offset] == part).sum())

    def indices(self, start: int = 0) -> Iterator[int]:
        """This worker's indices >= start, in order (unbounded; `item` says when it ends)."""
        k = start + (self.shard_index - start) % self.num_shards
        while True:
            yield k
            k += self.num_shards

    def item(self, k: int) -> NpdItem | None:
        """The item at global index k, or None past the end of the stream."""
        part, local = self._locate(k)
        source = self.parts[part][1]
        crops = self._crops_of(source)
        src_index, crop = divmod(local, crops)
        if source.finite and src_index >= source.length:
            return None
        rng = np.random.default_rng([self.seed, k])
        result = source.item(src_index, self.shape, rng, crop)
        result.index = k
        if crops > 1:
            result.source_id += f"#crop{crop}"
        return result
