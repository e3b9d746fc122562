"""Procedural NPD images that need no data at all (`synthetic:<name>` NPD specs).

Each generator maps a seeded random generator to one uint8 [H, W, C] image, so a stream
item is a pure function of its index. `noise` is the weakest (answered by one or two
classes); `dead_leaves` the classic occlusion model with natural-image edge statistics;
`shapes` and `leaves` object-like scenes: few large occluders with flat, gradient or
textured paint, both polarities.
"""

from __future__ import annotations

import numpy as np

from copycat_tf.data import images
from copycat_tf.data.preparation import smooth_field


def noise(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    """Uniform noise: the weakest NPD (answered by one or two classes)."""
    return rng.integers(0, 256, size=(h, w, c), dtype=np.uint8)


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


def _shape_masks(rng: np.random.Generator, n: int, h: int, w: int, r_min: float, r_max: float):
    """n random filled shapes (ellipses, rectangles, triangles), rotated: bool [n, H, W]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = (yy + 0.5) / h
    xx = (xx + 0.5) / w
    cx = rng.uniform(0.1, 0.9, n)[:, None, None]
    cy = rng.uniform(0.1, 0.9, n)[:, None, None]
    rx = rng.uniform(r_min, r_max, n)[:, None, None]
    ry = rx * np.exp(rng.uniform(-0.7, 0.7, n))[:, None, None]
    angle = rng.uniform(0, np.pi, n)[:, None, None]
    u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
    v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
    kind = rng.integers(0, 3, n)[:, None, None]
    ellipse = u * u + v * v < 1
    rectangle = np.maximum(np.abs(u), np.abs(v)) < 1
    triangle = (v > -0.5) & (np.abs(u) < (1 - v) / 1.5)
    return np.where(kind == 0, ellipse, np.where(kind == 1, rectangle, triangle))


def _fill(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    """A shape's paint: a flat tone, a linear gradient or a smooth texture, float [H, W, C]."""
    choice = rng.random()
    if choice < 0.4:
        return np.broadcast_to(rng.random(c).astype(np.float32), (h, w, c))
    if choice < 0.75:
        a, b = rng.random(c).astype(np.float32), rng.random(c).astype(np.float32)
        theta = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(theta) * xx / w + np.sin(theta) * yy / h + 1) / 2
        return a + (b - a) * t[..., None]
    return smooth_field(rng, h, w, c)


def shapes(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    """A few large shapes (1-6) with flat, gradient or textured paint over a flat or
    gradient background, light-on-dark or dark-on-light: object-like NPD without data."""
    n = int(rng.integers(1, 7))
    masks = _shape_masks(rng, n, h, w, 0.12, 0.5)
    image = _fill(rng, h, w, c) * rng.uniform(0.0, 0.35)
    if rng.random() < 0.5:
        image = 1.0 - image
    for i in range(n):
        image = np.where(masks[i][..., None], _fill(rng, h, w, c), image)
    if rng.random() < 0.5:
        image = 1.0 - image
    return images.to_uint8(image)


def leaves(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    """Dead leaves revised: fewer, larger occluders (5-40, radius 8-70% of the image) with
    gradient or textured paint, over a flat background, and a random polarity."""
    n = int(rng.integers(5, 41))
    masks = _shape_masks(rng, n, h, w, 0.04, 0.35)
    image = np.broadcast_to(rng.random(c).astype(np.float32), (h, w, c))
    for i in range(n):  # later shapes lie on top
        image = np.where(masks[i][..., None], _fill(rng, h, w, c), image)
    if rng.random() < 0.5:
        image = 1.0 - image
    return images.to_uint8(image)


GENERATORS = {
    "noise": noise,
    "dead_leaves": dead_leaves,
    "shapes": shapes,
    "leaves": leaves,
}
GENERATOR_NAMES = tuple(GENERATORS)
