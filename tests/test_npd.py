"""NPD streams: deterministic, indexable, split between workers, any image to any shape."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from copycat_tf.data.npd import NpdStream, dead_leaves
from copycat_tf.errors import UserInputError


def _items(stream, n, start=0):
    out = []
    for k in stream.indices(start):
        item = stream.item(k)
        if item is None or len(out) == n:
            break
        out.append(item)
    return out


@pytest.mark.parametrize("generator", ["noise", "dead_leaves"])
def test_synthetic_is_deterministic_and_random_access(generator):
    a = NpdStream(f"synthetic:{generator}", (12, 10, 3), seed=5)
    b = NpdStream(f"synthetic:{generator}", (12, 10, 3), seed=5)
    c = NpdStream(f"synthetic:{generator}", (12, 10, 3), seed=6)
    first = _items(a, 8)
    assert all(i.image.shape == (12, 10, 3) and i.image.dtype == np.uint8 for i in first)
    np.testing.assert_array_equal(b.item(6).image, first[6].image)  # random access
    assert not np.array_equal(c.item(6).image, first[6].image)
    assert len({i.image.tobytes() for i in first}) == 8


def test_dead_leaves_are_occluding_shapes_not_noise():
    image = dead_leaves(np.random.default_rng(0), 64, 64, 3)
    colours = {tuple(p) for p in image.reshape(-1, 3)}
    assert 3 <= len(colours) <= 161  # flat-coloured regions, far fewer than 4096 pixels
    # Neighbouring pixels mostly share their shape's colour (natural-image-like edges).
    same = (image[:, 1:] == image[:, :-1]).all(axis=-1).mean()
    assert same > 0.7
    grey = dead_leaves(np.random.default_rng(0), 32, 32, 1)
    assert grey.shape == (32, 32, 1)


def test_workers_get_disjoint_interleaved_indices():
    s0 = NpdStream("synthetic:noise", (8, 8, 1), seed=1, shard_index=0, num_shards=3)
    s2 = NpdStream("synthetic:noise", (8, 8, 1), seed=1, shard_index=2, num_shards=3)
    whole = NpdStream("synthetic:noise", (8, 8, 1), seed=1)
    assert [i.index for i in _items(s0, 4)] == [0, 3, 6, 9]
    assert [i.index for i in _items(s2, 3, start=4)] == [5, 8, 11]
    np.testing.assert_array_equal(s2.item(8).image, whole.item(8).image)
    with pytest.raises(UserInputError, match="--shard_index"):
        NpdStream("synthetic:noise", (8, 8, 1), shard_index=3, num_shards=3)


def _write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: composited over white
    Image.fromarray(rgba, "RGBA").save(folder / "clear.png")
    Image.fromarray(rng.integers(0, 256, (40, 20), dtype=np.uint8), "L").save(folder / "g.gif")
    Image.fromarray(rng.integers(0, 256, (25, 25, 3), dtype=np.uint8)).save(folder / "c.bmp")
    Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(folder / "w.webp")
    jpeg = tf.io.encode_jpeg(rng.integers(0, 256, (33, 44, 3), dtype=np.uint8)).numpy()
    (folder / "p.JPG").write_bytes(jpeg)


def test_folder_every_format_any_shape_with_crops(tmp_path):
    _write_images(tmp_path / "imgs")
    stream = NpdStream(f"folder:{tmp_path / 'imgs'}", (16, 16, 1), seed=0, crops_per_image=3)
    assert stream.length == 15
    items = _items(stream, 100)
    assert len(items) == 15 and all(i.image.shape == (16, 16, 1) for i in items)
    assert {i.source_id.split("#")[0] for i in items} == {
        "clear.png",
        "g.gif",
        "c.bmp",
        "w.webp",
        "p.JPG",
    }
    clear = next(i for i in items if i.source_id == "clear.png#crop0")
    assert (clear.image == 255).all()
    # Crops of one file differ; the order is a seeded permutation of the files.
    crops = [i.image for i in items if i.source_id.startswith("c.bmp")]
    assert len({c.tobytes() for c in crops}) == 3
    other = NpdStream(f"folder:{tmp_path / 'imgs'}", (16, 16, 1), seed=1, crops_per_image=3)
    assert [i.source_id for i in _items(other, 15)] != [i.source_id for i in items]
    rgb = NpdStream(f"folder:{tmp_path / 'imgs'}", (8, 12, 3)).item(0)
    assert rgb.image.shape == (8, 12, 3)


def test_mixture_is_deterministic_with_the_requested_weights():
    spec = "mix:3*synthetic:noise|1*synthetic:dead_leaves"
    stream = NpdStream(spec, (8, 8, 1), seed=2)
    items = _items(stream, 2000)
    kinds = [i.source_id.split("/")[0] for i in items]
    assert 0.70 < kinds.count("noise") / len(kinds) < 0.80
    # Indices inside each part count up without gaps, from any start.
    noise = [int(i.source_id.split("/")[1]) for i in items if i.source_id.startswith("noise")]
    assert noise == list(range(len(noise)))
    late = NpdStream(spec, (8, 8, 1), seed=2).item(1500)
    assert late.source_id == items[1500].source_id
    np.testing.assert_array_equal(late.image, items[1500].image)


def test_tfds_source(tmp_path):
    from tfds_fixtures import TinyShapes

    data_dir = str(tmp_path / "tfds")
    TinyShapes(data_dir=data_dir).download_and_prepare()
    stream = NpdStream("tfds:tiny_shapes", (6, 6, 3), data_dir=data_dir)
    assert stream.length == 50
    items = _items(stream, 100)
    assert len(items) == 50 and items[7].source_id == "tiny_shapes:train:7"
    # Each example is a flat grey image of its own value; TFDS stores them shuffled.
    values = [int(i.image[0, 0, 0]) for i in items]
    assert sorted(values) == list(range(50)) and items[7].image.shape == (6, 6, 3)
    assert all((i.image == v).all() for i, v in zip(items, values, strict=True))
    np.testing.assert_array_equal(stream.item(3).image, items[3].image)  # going back


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("imagenet", "not understood"),
        ("synthetic:clouds", "unknown"),
        ("mix:0*synthetic:noise|1*synthetic:noise", "positive weight"),
        ("mix:synthetic:noise|synthetic:noise", "expected <weight>"),
    ],
)
def test_bad_specs(spec, fragment):
    with pytest.raises(UserInputError, match=fragment):
        NpdStream(spec, (8, 8, 1))
