"""NPD streams: deterministic, indexable, split between workers, any image to any shape."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from copycat_tf.data import images
from copycat_tf.data.generators import GENERATORS, dead_leaves
from copycat_tf.data.npd import NpdStream
from copycat_tf.data.preparation import LEGACY, Preparation
from copycat_tf.errors import UserInputError
from copycat_tf.recipe import Recipe


def _items(stream, n, start=0):
    out = []
    for k in stream.indices(start):
        item = stream.item(k)
        if item is None or len(out) == n:
            break
        out.append(item)
    return out


@pytest.mark.parametrize("generator", sorted(GENERATORS))
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
    """The legacy preparation: exactly what datasets made before preparation hold."""
    _write_images(tmp_path / "imgs")
    folder = f"folder:{tmp_path / 'imgs'}"
    stream = NpdStream(folder, (16, 16, 1), seed=0, crops_per_image=3, preparation=LEGACY)
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
    other = NpdStream(folder, (16, 16, 1), seed=1, crops_per_image=3, preparation=LEGACY)
    assert [i.source_id for i in _items(other, 15)] != [i.source_id for i in items]
    rgb = NpdStream(folder, (8, 12, 3), preparation=LEGACY).item(0)
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
    stream = NpdStream("tfds:tiny_shapes", (6, 6, 3), data_dir=data_dir, preparation=LEGACY)
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


def _prep(**knobs):
    settings = {
        "background": "black",
        "invert": 0.0,
        "jitter": 0.0,
        "blur": 0.0,
        "crop_area": "1,1",
        "crop_aspect": "1,1",
        "cycle": False,
        "adapt_after": 0,
        **knobs,
    }
    return Preparation.parse(**settings)


def _clear_and_opaque(folder):
    """A fully transparent picture and an opaque one with a bright square on dark."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 40, 4), np.uint8), "RGBA").save(folder / "clear.png")
    opaque = np.full((40, 40, 3), 30, np.uint8)
    opaque[10:30, 10:30] = 220
    Image.fromarray(opaque).save(folder / "square.png")
    return f"folder:{folder}"


def _first(spec, prep, name, shape=(16, 16, 1), seed=0, index_limit=20):
    stream = NpdStream(spec, shape, seed=seed, preparation=prep)
    return next(
        stream.item(k) for k in range(index_limit) if stream.item(k).source_id.startswith(name)
    )


def test_background_knob(tmp_path):
    spec = _clear_and_opaque(tmp_path / "p")
    assert (_first(spec, _prep(background="black"), "clear").image == 0).all()
    assert (_first(spec, _prep(background="white"), "clear").image == 255).all()
    grey = _first(spec, _prep(background="grey"), "clear").image
    assert len(np.unique(grey)) == 1
    texture = _first(spec, _prep(background="texture"), "clear").image
    assert len(np.unique(texture)) > 5  # a smooth random field, not a flat tone
    # The background only shows through transparency: an opaque picture is unchanged.
    black = _first(spec, _prep(background="black"), "square").image
    white = _first(spec, _prep(background="white"), "square").image
    np.testing.assert_array_equal(black, white)
    # "random" draws the background per item: several kinds over a stream.
    stream = NpdStream(spec, (16, 16, 1), preparation=_prep(background="random", cycle=True))
    clear = [stream.item(k).image for k in range(60) if "clear" in stream.item(k).source_id]
    assert len({(int(c.min()), int(c.max())) for c in clear}) > 3


def test_invert_jitter_and_blur_knobs(tmp_path):
    spec = _clear_and_opaque(tmp_path / "p")
    plain = _first(spec, _prep(), "square").image.astype(int)
    inverted = _first(spec, _prep(invert=1.0), "square").image.astype(int)
    np.testing.assert_array_equal(inverted, 255 - plain)
    jittered = _first(spec, _prep(jitter=0.5), "square").image.astype(int)
    assert np.abs(jittered - plain).max() > 5
    blurred = _first(spec, _prep(blur=1.0), "square").image.astype(int)
    edges = lambda x: np.abs(np.diff(x, axis=1)).max()  # noqa: E731
    assert edges(blurred) < edges(plain)


def test_jitter_on_the_picture_leaves_its_background_exact(tmp_path):
    """--npd_jitter_on=picture jitters the picture before it is laid over its background
    (what the adaptation rates as the item's arm); canvas, as datasets made before the knob,
    jitters the composited image, background included."""
    folder = tmp_path / "p"
    folder.mkdir()
    half = np.zeros((40, 40, 4), np.uint8)
    half[8:32, 8:32] = (200, 120, 60, 255)  # an opaque patch; the rest transparent
    Image.fromarray(half, "RGBA").save(folder / "half.png")
    spec = f"folder:{folder}"
    transparent = np.ones((16, 16), bool)
    transparent[2:14, 2:14] = False  # the patch (edges included) in the 16x16 full view
    for background, level in (("black", 0), ("white", 255)):
        knobs = {"background": background, "jitter": 0.5, "cycle": True}
        picture = NpdStream(spec, (16, 16, 1), preparation=_prep(**knobs))
        canvas = NpdStream(spec, (16, 16, 1), preparation=_prep(jitter_on="canvas", **knobs))
        on_picture = [picture.item(k).image[..., 0] for k in range(16)]
        on_canvas = [canvas.item(k).image[..., 0] for k in range(16)]
        assert all((x[transparent] == level).all() for x in on_picture)
        assert sum((x[transparent] != level).any() for x in on_canvas) >= 2
        # The picture itself is jittered either way.
        assert len({int(x[8, 8]) for x in on_picture}) > 3
    assert _prep().jitter_on == "picture" and Preparation.of(Recipe()).jitter_on == "picture"


def test_a_premultiplied_working_picture_crops_to_the_same_pixels():
    """Pictures are kept premultiplied (RGBa) so a crop does not premultiply the whole
    picture again; every crop is the one of the straight RGBA picture, bit for bit (the
    pixels of datasets stolen before stay what a resumed steal makes)."""
    import io

    from copycat_tf.data import images

    rng = np.random.default_rng(4)
    rgba = rng.integers(0, 256, (90, 70, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((90, 70)) < 0.4, 0, rng.integers(1, 256, (90, 70)))
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    kept = images.working_picture(buffer.getvalue(), 56)
    assert kept.mode == "RGBa" and kept.size == (44, 56)
    # The working picture as it was kept before: straight RGBA, shrunk the same way.
    straight = Image.open(io.BytesIO(buffer.getvalue())).convert("RGBA")
    straight = straight.resize(kept.size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    boxes = [None, (0.0, 0.0, 1.0, 1.0)]
    for _ in range(20):
        x0, y0 = rng.uniform(0.0, 0.6, 2)
        boxes.append((x0, y0, rng.uniform(x0 + 0.05, 1.0), rng.uniform(y0 + 0.05, 1.0)))
    for box in boxes:
        crop = images.crop_rgba(kept, 28, 28, box)
        assert crop.shape == (28, 28, 4) and crop.dtype == np.float32
        np.testing.assert_array_equal(crop, images.crop_rgba(straight, 28, 28, box))


def test_kept_pictures_are_decoded_once_give_the_same_pixels_and_stay_bounded(
    tmp_path, monkeypatch
):
    """keep_pictures (a query selection's pools cycle through a folder): a kept picture
    is never decoded again, its items are bit for bit those of a stream keeping none, and
    no picture is added past the byte limit."""
    folder = tmp_path / "many"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(20):  # more than the 16 pictures any stream holds for its next crops
        Image.fromarray(rng.integers(0, 256, (12, 18, 4), dtype=np.uint8), "RGBA").save(
            folder / f"{i:02d}.png"
        )
    spec = f"folder:{folder}"
    prep = Preparation.parse(**{**_knobs(_prep(background="random", invert=0.5)), "cycle": True})

    def stream(limit):
        s = NpdStream(spec, (16, 16, 1), seed=3, crops_per_image=2, preparation=prep)
        s.keep_pictures(limit)
        return s

    decoded = []
    real = images.working_picture
    monkeypatch.setattr(images, "working_picture", lambda *a: decoded.append(1) or real(*a))
    positions = list(range(120)) + list(reversed(range(120)))  # 3 passes, then back
    plain = [stream(0).item(k).image for k in positions]
    assert len(decoded) > 3 * 20  # without keeping, pictures are decoded again
    decoded.clear()
    kept = stream(1 << 30)
    for k, image in zip(positions, plain, strict=True):
        np.testing.assert_array_equal(kept.item(k).image, image)
    assert len(decoded) == 20 and len(kept._kept) == 20
    assert kept._kept_bytes == 20 * 12 * 18 * 4
    decoded.clear()
    bounded = stream(2 * 12 * 18 * 4 + 100)  # room for 2 pictures: the first 2 decoded
    for k, image in zip(positions, plain, strict=True):
        np.testing.assert_array_equal(bounded.item(k).image, image)
    assert len(bounded._kept) == 2 and bounded._kept_bytes == 2 * 12 * 18 * 4
    assert len(decoded) > 20  # the others are decoded again (2 kept + 16 recent < 20)


def test_crop_area_and_aspect_knobs():
    rng = np.random.default_rng(0)
    prep = _prep(crop_area="0.02,0.05", crop_aspect="0.5,2")
    for _ in range(200):
        x0, y0, x1, y1 = prep.crop_box(rng, full_view=False)
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        assert 0.019 <= (x1 - x0) * (y1 - y0) <= 0.051
        assert 0.49 <= (x1 - x0) / (y1 - y0) <= 2.01
    assert prep.crop_box(rng, full_view=True) is None


def test_cycle_knob_reaches_any_budget_with_new_crops(tmp_path):
    spec = _clear_and_opaque(tmp_path / "p")
    knobs = {"crop_area": "0.1,1", "background": "random"}
    ends = NpdStream(spec, (8, 8, 1), crops_per_image=2, preparation=_prep(**knobs))
    assert ends.length == 4 and ends.item(4) is None
    cycles = NpdStream(spec, (8, 8, 1), crops_per_image=2, preparation=_prep(cycle=True, **knobs))
    assert cycles.length is None
    items = [cycles.item(k) for k in range(40)]
    assert items[4].source_id.endswith("#p1crop0")
    assert len({i.image.tobytes() for i in items}) > 30  # new crops on every pass


def test_preparation_is_a_pure_function_of_spec_seed_and_index(tmp_path):
    spec = _clear_and_opaque(tmp_path / "p")
    prep = _prep(background="random", invert=0.5, jitter=0.3, blur=0.3, crop_area="0.02,1")
    prep = Preparation.parse(**{**_knobs(prep), "cycle": True})
    a = NpdStream(spec, (16, 16, 3), seed=4, crops_per_image=3, preparation=prep)
    b = NpdStream(spec, (16, 16, 3), seed=4, crops_per_image=3, preparation=prep)
    forward = [a.item(k).image for k in range(30)]
    for k in reversed(range(30)):  # any order of access, another stream object
        np.testing.assert_array_equal(b.item(k).image, forward[k])
    c = NpdStream(spec, (16, 16, 3), seed=5, crops_per_image=3, preparation=prep)
    assert sum(np.array_equal(c.item(k).image, forward[k]) for k in range(30)) < 3


def _knobs(prep):
    return {
        "background": ",".join(prep.backgrounds),
        "invert": prep.invert,
        "jitter": prep.jitter,
        "blur": prep.blur,
        "crop_area": ",".join(map(str, prep.crop_area)),
        "crop_aspect": ",".join(map(str, prep.crop_aspect)),
        "cycle": prep.cycle,
        "adapt_after": prep.adapt_after,
    }


@pytest.mark.parametrize(
    "knob,value,fragment",
    [
        ("background", "purple", "--npd_background"),
        ("invert", 1.5, "--npd_invert"),
        ("crop_area", "0.5,0.1", "--npd_crop_area"),
        ("crop_area", "x", "--npd_crop_area"),
        ("jitter", -1.0, "--npd_jitter"),
        ("jitter_on", "both", "--npd_jitter_on"),
    ],
)
def test_bad_preparation_knobs(knob, value, fragment):
    with pytest.raises(UserInputError, match=fragment):
        _prep(**{knob: value})


def test_new_generators_are_varied_not_noise():
    for name in ("shapes", "leaves"):
        rng = np.random.default_rng(0)
        batch = np.stack([GENERATORS[name](rng, 28, 28, 1) for _ in range(64)])
        # Smooth regions (neighbours alike), yet varied brightness and polarity.
        assert (np.abs(np.diff(batch.astype(int), axis=2)) < 8).mean() > 0.6
        means = batch.reshape(64, -1).mean(axis=1)
        assert means.min() < 80 and means.max() > 170


def test_adapted_weights_favour_arms_answered_with_rare_labels():
    from copycat_tf.data.preparation import ARM_FLOOR, adapted_weights

    # Arm 0 always gets the common label 0; arm 1 a spread of rare ones; arm 2 no answers.
    answers = [(0, 0)] * 90 + [(1, c) for c in (1, 2, 3, 4, 5)] * 2
    weights, bits = adapted_weights(3, answers, num_classes=6)
    assert abs(weights.sum() - 1) < 1e-9 and weights.min() >= ARM_FLOOR - 1e-9
    assert weights[1] > weights[2] > weights[0] and bits[1] > bits[0]


def test_adaptive_stream_explores_then_draws_arms_by_weight(tmp_path):
    spec = _clear_and_opaque(tmp_path / "p")
    knobs = {"background": "black,white", "invert": 0.0, "cycle": True}
    plain = NpdStream(spec, (8, 8, 1), preparation=_prep(**knobs))
    adaptive = NpdStream(spec, (8, 8, 1), preparation=_prep(adapt_after=10, **knobs))
    assert adaptive.adapts and not plain.adapts
    for k in range(10):  # the exploration is the plain stream
        np.testing.assert_array_equal(adaptive.item(k).image, plain.item(k).image)
    with pytest.raises(RuntimeError, match="arm weights"):
        adaptive.item(10)
    adaptive.arm_weights = np.array([0.0, 1.0])  # white only
    arms = {adaptive.arm(k) for k in range(10, 60)}
    assert arms == {1}
    clear = [adaptive.item(k) for k in range(10, 60)]
    clear = [i.image for i in clear if i.source_id.startswith("clear")]
    assert clear and all((c == 255).all() for c in clear)


@pytest.mark.parametrize("spec", ["synthetic:shapes", "folder"])
def test_invariance_probe_copies_are_mirrors_and_shifts_of_the_first_items(spec, tmp_path):
    from copycat_tf.data import invariance

    if spec == "folder":
        spec = _clear_and_opaque(tmp_path / "p")
    knobs = {"background": "black,white", "crop_area": "0.2,1", "cycle": True}
    plain = NpdStream(spec, (12, 12, 1), seed=3, preparation=_prep(**knobs))
    probed = NpdStream(spec, (12, 12, 1), seed=3, preparation=_prep(probe=5, **knobs))
    for k in range(5):  # the originals, and everything after the copies, are the stream's
        np.testing.assert_array_equal(probed.item(k).image, plain.item(k).image)
    for k in range(15, 30):
        np.testing.assert_array_equal(probed.item(k).image, plain.item(k).image)
        assert probed.arm(k) == plain.arm(k)
    for j in range(5):
        original = plain.item(j)
        mirror, shift = probed.item(5 + j), probed.item(10 + j)
        np.testing.assert_array_equal(mirror.image, original.image[:, ::-1])
        np.testing.assert_array_equal(shift.image[:, 1:], original.image[:, :-1])
        np.testing.assert_array_equal(shift.image[:, 0], original.image[:, 0])
        assert mirror.source_id == f"{original.source_id}#{invariance.MIRROR}"
        assert shift.source_id == f"{original.source_id}#{invariance.SHIFT}"
        assert (mirror.index, shift.index) == (5 + j, 10 + j)
        assert probed.arm(5 + j) == probed.arm(10 + j) == plain.arm(j)  # the same arm
    # A pure function of (spec, seed, index): another stream, any order, the same copies.
    again = NpdStream(spec, (12, 12, 1), seed=3, preparation=_prep(probe=5, **knobs))
    for k in (14, 7, 0, 9):
        np.testing.assert_array_equal(again.item(k).image, probed.item(k).image)
    # A stream without a preparation given (other tools' streams) has no probe.
    assert NpdStream(spec, (12, 12, 1)).preparation.probe == 0
    with pytest.raises(UserInputError, match="--invariance_probe"):
        _prep(probe=-1)


def test_invariance_analysis_tells_an_invariant_target_from_one_that_is_not():
    from copycat_tf.data import invariance

    rng = np.random.default_rng(0)
    n = 200
    originals = rng.integers(0, 10, n)

    def answers(mirror_changes, shift_changes):
        mirror, shift = originals.copy(), originals.copy()
        mirror[:mirror_changes] = (mirror[:mirror_changes] + 1) % 10
        shift[n - shift_changes :] = (shift[n - shift_changes :] + 1) % 10
        labels = np.concatenate([originals, mirror, shift, rng.integers(0, 10, 50)])
        return np.arange(len(labels)), labels

    garments = invariance.analyse(*answers(12, 10), probe=n)  # mirrored: the same garment
    assert garments["flip"] and garments["pairs"] == n
    assert (garments["mirror_changed"], garments["shift_changed"]) == (12, 10)
    digits = invariance.analyse(*answers(60, 10), probe=n)  # a mirrored 3 is no 3
    assert not digits["flip"] and "less invariant to mirrors" in digits["reason"]
    # Pairs with a copy missing (skipped, or past the budget) are left out.
    indices, labels = answers(0, 0)
    keep = indices < 2 * n + 30
    partial = invariance.analyse(indices[keep], labels[keep], probe=n)
    assert partial["pairs"] == 30 and not partial["flip"] and "fewer than" in partial["reason"]
    none = invariance.analyse(indices, labels, probe=0)
    assert not none["flip"] and "no invariance probe" in none["reason"]
    assert invariance.kind_of(3, 0) is None and invariance.kind_of(2 * n, n) == ("shift1", 0)
