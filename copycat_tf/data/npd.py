"""Non-problem-domain (NPD) image streams: what the attacker sends to the target.

One spec string selects a source (see `parse_npd_spec`):

  folder:<path>                 every image under <path> (recursive); PNG, JPEG, GIF, BMP,
                                WebP, ... Unreadable files are skipped and counted.
  tfds:<name>[:<split>]         a prepared TFDS dataset (labels dropped), split default train
  pd:<problem-domain spec>      problem-domain images, labels dropped (e.g.
                                pd:fashion_mnist:train), for the NPD+PD fine-tuning data:
                                the target labels them, ground truth is never read
  synthetic:<generator>         procedural images that need no data (GENERATORS)
  mix:<w>*<spec>|<w>*<spec>...  a weighted mixture, e.g.
                                mix:0.5*folder:/usr/share/openclipart/png|0.5*synthetic:shapes

The stream is indexed: item k is a pure function of (spec, seed, k, preparation), so a run
can resume at any index, and `shard_index/num_shards` split the indices between workers
(k mod num_shards). Pictures of folder: and tfds: sources are prepared for the target
(data.preparation: crops, background, polarity, jitter, blur) at its (H, W, C); each
picture gives `crops_per_image` items, its full view first, and with `cycle` a finite
source starts over with new random crops instead of ending. pd: items are the problem
domain's pixels as they are.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterator

import numpy as np

from copycat_tf.data import images, invariance
from copycat_tf.data.generators import GENERATORS
from copycat_tf.data.image_files import list_images, looks_like_image
from copycat_tf.data.preparation import LEGACY, Preparation
from copycat_tf.errors import UserInputError

NPD_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")
_MIX_CHUNK = 4096
# Pictures are decoded once and shrunk to this many times the target's size: enough
# resolution for the smallest crops, cheap to crop again and again.
_WORKING_SCALE = 8


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

    def item(self, local: int, shape, rng: np.random.Generator) -> NpdItem:
        return NpdItem(-1, GENERATORS[self.name](rng, *shape), f"{self.name}/{local}")


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

    def source_id(self, local: int) -> str:
        return os.path.relpath(self.files[local], self.root)

    def encoded(self, local: int) -> bytes:
        with open(self.files[local], "rb") as f:
            return f.read()


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

    def source_id(self, local: int) -> str:
        return f"{self.name}:{self.split}:{local}"

    def encoded(self, local: int) -> bytes:
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
        box = LEGACY.crop_box(rng, full_view=crop == 0)
        return NpdItem(-1, images.crop_and_resize(image, shape, box), source_id)


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
                "positive weight, e.g. mix:0.5*synthetic:noise|0.5*synthetic:shapes"
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
      seed: fixes order, crops, preparation, mixture draws and synthetic images.
      crops_per_image: items per source picture (file or TFDS example) in one pass.
      shard_index, num_shards: this worker takes indices k with k % num_shards == shard_index.
      data_dir: data dir for tfds: and pd: sources.
      preparation: how folder:/tfds: pictures are prepared (data.preparation), and its
        invariance probe; None is the Recipe's default without the probe.
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
        preparation: Preparation | None = None,
    ):
        if crops_per_image < 1:
            raise UserInputError(f"--crops_per_image={crops_per_image}; expected >= 1")
        if not 0 <= shard_index < num_shards:
            raise UserInputError(
                f"--shard_index={shard_index} must be in [0, --num_shards={num_shards})"
            )
        if preparation is None:  # the Recipe's, without the attack's invariance probe
            from copycat_tf.recipe import Recipe

            preparation = dataclasses.replace(Preparation.of(Recipe()), probe=0)
        self.spec = spec
        self.shape = tuple(int(d) for d in shape)
        self.seed = seed
        self.crops = crops_per_image
        self.preparation = preparation
        self.shard_index, self.num_shards = shard_index, num_shards
        self.data_dir = data_dir
        self.parts = parse_npd_spec(spec, seed, data_dir)
        self._weights = np.array([w for w, _ in self.parts])
        self._counts_before: dict[int, np.ndarray] = {0: np.zeros(len(self.parts), np.int64)}
        self._picture_cache: dict[tuple[int, int], object] = {}
        # Pictures kept for the stream's life (keep_pictures): a query selection's
        # candidate pools pass over a folder again and again.
        self._kept: dict[tuple[int, int], object] = {}
        self._kept_bytes = 0
        self._keep_limit = 0
        self._lock = threading.Lock()
        # Arm weights of positions >= preparation.adapt_after (set once the exploration's
        # answers are known; see attack.producer).
        self.arm_weights: np.ndarray | None = None
        # Query selection: index k >= remap_from sends the item at position remap(k)
        # (set once the choice is made; see attack.selection).
        self.remap: Callable[[int], int] | None = None
        self.remap_from = 0

    def arguments(self) -> dict:
        """The arguments that build this stream again (data.npd_processes' workers)."""
        return {
            "spec": self.spec,
            "shape": self.shape,
            "seed": self.seed,
            "crops_per_image": self.crops,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "data_dir": self.data_dir,
            "preparation": self.preparation,
        }

    def position(self, k: int) -> int:
        """The stream position query index k sends (k itself unless a selection remaps it)."""
        if self.remap is not None and k >= self.remap_from:
            return self.remap(k)
        return k

    def prepared_pictures(self):
        """The preparation of the stream's pictures (folder:, tfds: parts); None when it
        has none (synthetic:, pd:)."""
        pictures = any(isinstance(source, (_Folder, _Tfds)) for _, source in self.parts)
        return self.preparation if pictures else None

    @property
    def adapts(self) -> bool:
        """Whether items past the preparation's exploration need adapted arm weights."""
        prep = self.prepared_pictures()
        return prep is not None and bool(prep.adapt_after) and not prep.legacy

    @property
    def thread_safe(self) -> bool:
        """Whether `item` may be called from several threads at once (folder: and
        synthetic: sources; tfds: and pd: read sequentially)."""
        return all(isinstance(source, (_Folder, _Synthetic)) for _, source in self.parts)

    def _crops_of(self, source) -> int:
        return self.crops if source.finite else 1

    def _cycles(self, source) -> bool:
        return isinstance(source, (_Folder, _Tfds)) and self.preparation.cycle

    @property
    def length(self) -> int | None:
        """Items in the whole stream (all workers), None when unbounded or mixed."""
        if len(self.parts) > 1:
            return None
        source = self.parts[0][1]
        if not source.finite or self._cycles(source):
            return None
        return source.length * self._crops_of(source)

    def _chunk(self, chunk: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 7, chunk])
        return rng.choice(len(self.parts), size=_MIX_CHUNK, p=self._weights)

    def _locate(self, k: int) -> tuple[int, int]:
        """(part, index within that part) of global index k."""
        if len(self.parts) == 1:
            return 0, k
        chunk, offset = divmod(k, _MIX_CHUNK)
        with self._lock:
            for c in range(max(self._counts_before), chunk):
                counts = np.bincount(self._chunk(c), minlength=len(self.parts))
                self._counts_before[c + 1] = self._counts_before[c] + counts
            before = self._counts_before[chunk]
        assignment = self._chunk(chunk)
        part = int(assignment[offset])
        return part, int(before[part] + (assignment[:offset] == part).sum())

    def indices(self, start: int = 0) -> Iterator[int]:
        """This worker's indices >= start, in order (unbounded; `item` says when it ends)."""
        k = start + (self.shard_index - start) % self.num_shards
        while True:
            yield k
            k += self.num_shards

    def _weights_at(self, k: int) -> np.ndarray | None:
        if not self.adapts or k < self.preparation.adapt_after:
            return None
        if self.arm_weights is None:
            raise RuntimeError(f"NPD item {k} needs the adapted arm weights, not set yet")
        return self.arm_weights

    def arm(self, k: int) -> int | None:
        """The preparation arm (index into preparation.arms) of item k; None for items that
        are not prepared pictures (synthetic, pd:, legacy)."""
        return self._arm_at(self.position(k))[1]

    def _arm_at(self, position: int) -> tuple[int, int | None]:
        """(mixture part, preparation arm or None) of the item at a stream position (an
        invariance-probe copy's are its original's: a mirrored or shifted picture keeps
        its background and polarity)."""
        probe = invariance.kind_of(position, self.preparation.probe)
        if probe is not None:
            return self._arm_at(probe[1])
        part, _ = self._locate(position)
        if self.preparation.legacy or not isinstance(self.parts[part][1], (_Folder, _Tfds)):
            return part, None
        rng = np.random.default_rng([self.seed, position, 2])
        return part, self.preparation.draw_arm(rng, self._weights_at(position))

    def arm_name(self, position: int) -> str:
        """The arm of the item at a stream position, as a query selection's bandit sees it:
        its part of a mixture ("part N") and, for a prepared picture, its background and
        polarity ("white/inverted"); "all" when the stream has neither."""
        part, arm = self._arm_at(position)
        names = [f"part {part}"] if len(self.parts) > 1 else []
        if arm is not None:
            background, inverted = self.preparation.arms[arm]
            names.append(background + ("/inverted" if inverted else ""))
        return " ".join(names) or "all"

    def item(self, k: int) -> NpdItem | None:
        """The item at global index k, or None past the end of the stream."""
        return self.as_query(k, self._item_at(self.position(k)))

    def as_query(self, k: int, item: NpdItem | None) -> NpdItem | None:
        """A copy of the item at position(k), as query k sends it (None stays None)."""
        if item is None:
            return None
        source_id = item.source_id
        if self.remap is not None and k >= self.remap_from:
            source_id += f"@{self.position(k)}"  # the stream position chosen for query k
        return dataclasses.replace(item, index=k, source_id=source_id)

    def item_at_position(self, k: int) -> NpdItem | None:
        """The item at stream position k, whatever query index a selection maps to it
        (a selection's candidates)."""
        result = self._item_at(k)
        if result is not None:
            result.index = k
        return result

    def _item_at(self, k: int) -> NpdItem | None:
        probe = invariance.kind_of(k, self.preparation.probe)
        if probe is not None:  # a mirrored or shifted copy of an earlier position
            kind, original = probe
            item = self._item_at(original)
            if item is None:
                return None
            image = None if item.image is None else invariance.transform(item.image, kind)
            return NpdItem(k, image, f"{item.source_id}#{kind}", item.error)
        part, local = self._locate(k)
        source = self.parts[part][1]
        rng = np.random.default_rng([self.seed, k])
        if isinstance(source, _Synthetic):
            result = source.item(local, self.shape, rng)
        else:
            crops = self._crops_of(source)
            per_pass = source.length * crops
            passes, within = divmod(local, per_pass)
            if passes and not self._cycles(source):
                return None
            src_index, crop = divmod(within, crops)
            if isinstance(source, _ProblemDomain):
                result = source.item(src_index, self.shape, rng, crop)
            else:
                result = self._picture_item(part, source, src_index, crop, passes, rng, k)
            if crops > 1 or passes:
                result.source_id += f"#p{passes}crop{crop}" if passes else f"#crop{crop}"
        result.index = k
        return result

    def _picture_item(self, part, source, src_index, crop, passes, rng, k) -> NpdItem:
        source_id = source.source_id(src_index)
        full_view = crop == 0 and passes == 0
        prep = self.preparation
        try:
            if prep.legacy:  # exactly the pixels of datasets made before preparation
                image = images.open_image(source.encoded(src_index))
                pixels = images.crop_and_resize(image, self.shape, prep.crop_box(rng, full_view))
            else:
                picture = self._picture(part, source, src_index)
                box = prep.crop_box(rng, full_view)
                rng = np.random.default_rng([self.seed, k, 2])
                pixels = prep.apply(picture, self.shape, box, rng, self._weights_at(k))
        except (OSError, ValueError) as e:
            return NpdItem(-1, None, source_id, str(e)[:200])
        return NpdItem(-1, pixels, source_id)

    def keep_pictures(self, limit_bytes: int) -> None:
        """Keeps decoded working pictures for the stream's life, the first ones decoded up
        to `limit_bytes` of pixels (then no more are added: a picture not kept is decoded
        again, which costs time only). For streams whose positions come back to the same
        pictures (a query selection's candidate pools cycle through a folder); 0: off."""
        self._keep_limit = int(limit_bytes)

    def _picture(self, part: int, source, src_index: int):
        """The working picture, decoded once for the consecutive crops of one picture (and
        once for the stream's life when kept, see keep_pictures)."""
        key = (part, src_index)
        with self._lock:
            picture = self._picture_cache.get(key)
            if picture is None:
                picture = self._kept.get(key)
        if picture is None:
            picture = images.working_picture(
                source.encoded(src_index), _WORKING_SCALE * max(self.shape[:2])
            )
            size = picture.width * picture.height * len(picture.getbands())
            with self._lock:
                if len(self._picture_cache) >= 16:
                    self._picture_cache.pop(next(iter(self._picture_cache)))
                self._picture_cache[key] = picture
                if key not in self._kept and self._kept_bytes + size <= self._keep_limit:
                    self._kept[key] = picture
                    self._kept_bytes += size
        return picture
