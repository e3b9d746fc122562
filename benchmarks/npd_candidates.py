"""Prepared NPD items per second, with working pictures kept premultiplied (today) against
straight RGBA (before): the cost of a query selection's candidate pools and of steal's NPD.

  .venv/bin/python -m benchmarks.npd_candidates [--items=4000] [--repeats=3] [--npd=...]

Makes --items consecutive items of the Recipe's NPD stream at 28x28x1 (natural pictures
when installed, 8 crops per picture, arm weights uniform past the exploration) in one
thread, once with each way of keeping the decoded picture, pair by pair --repeats times
(after one pass that reads the files into the OS cache; the order alternates), and prints
items/s of each and their ratio (same items, same process, same run). Pillow resizes an
RGBA picture by premultiplying the whole picture first; a picture kept premultiplied
skips that for each of its crops, with the same pixels (tests/test_npd.py).
"""

from __future__ import annotations

import argparse
import time

from benchmarks.common import SHAPE, machine_line


def _straight_picture(data: bytes, max_side: int):
    """The working picture as it was kept before: straight RGBA, shrunk the same way."""
    from PIL import Image

    from copycat_tf.data import images

    rgba = images.open_image(data).convert("RGBA")
    scale = max_side / max(rgba.size)
    if scale < 1:
        size = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
        rgba = rgba.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return rgba


def _items_per_second(npd: str, start: int, count: int, straight: bool) -> float:
    import numpy as np

    from copycat_tf.data import images
    from copycat_tf.data import npd as npd_module
    from copycat_tf.data.preparation import Preparation
    from copycat_tf.recipe import Recipe

    recipe = Recipe()
    stream = npd_module.NpdStream(
        npd,
        SHAPE,
        seed=0,
        crops_per_image=recipe.crops_per_image,
        preparation=Preparation.of(recipe),
    )
    if stream.adapts:
        arms = len(stream.preparation.arms)
        stream.arm_weights = np.full(arms, 1.0 / arms)
    kept = images.working_picture
    if straight:
        npd_module.images.working_picture = _straight_picture
    try:
        began = time.perf_counter()
        for k in range(start, start + count):
            stream.item_at_position(k)
        return count / (time.perf_counter() - began)
    finally:
        npd_module.images.working_picture = kept


def main() -> None:
    from copycat_tf.recipe import Recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--npd", default=Recipe().resolved_npd())
    args = parser.parse_args()
    start = 100_000  # past the exploration, as a selection round's pool is
    _items_per_second(args.npd, start, args.items, straight=False)  # files into the OS cache
    rows = []
    for repeat in range(args.repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)  # neither always first
        rate = {way: _items_per_second(args.npd, start, args.items, way) for way in order}
        rows.append((repeat, rate[True], rate[False]))
    print(f"{'repeat':>6}  {'straight RGBA items/s':>21}  {'premultiplied items/s':>21}  ratio")
    for repeat, before, now in rows:
        print(f"{repeat:>6}  {before:>21.0f}  {now:>21.0f}  {now / before:5.2f}")
    print()
    print(
        "command: .venv/bin/python -m benchmarks.npd_candidates "
        f"--items={args.items} --repeats={args.repeats} --npd={args.npd}"
    )
    print(machine_line(f"NPD {args.npd}, {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}, one thread"))


if __name__ == "__main__":
    main()
