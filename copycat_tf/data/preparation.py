"""How a natural NPD picture becomes what the target sees, without knowing the target's domain.

Clipart and photos are not what a deployed classifier expects: a Fashion-MNIST model sees
light garments on black, a medical model dark tissue on white, and the attacker knows
neither. Each NPD item therefore draws its own preparation (seeded by its stream index,
so it is reproducible and part of the dataset's identity):

  background   what shows through transparent pixels: black, white, a random grey, a
               random colour, or a random texture (chosen per item among those allowed)
  invert       probability of a polarity inversion (light-on-dark <-> dark-on-light)
  jitter       strength of random brightness, contrast and gamma changes (0: none)
  jitter_on    what the jitter changes: "picture" (the picture's own pixels, before it is
               laid over its background, so the background stays the arm's exactly) or
               "canvas" (the composited image, background included: datasets made before
               jitter_on existed; a black background jittered to grey is no longer black,
               and the arm the adaptation rates is not what was sent)
  blur         probability of a small Gaussian blur
  crop_area    range of the crop's share of the picture (small shares zoom into detail,
               which matters at 28x28); the first crop of a picture is its full view
  crop_aspect  range of the crop's aspect ratio
  cycle        a finite folder starts over with new random crops instead of ending
  adapt_after  0, or explore-then-commit: the first `adapt_after` stream positions draw
               their background and polarity ("arm") with the probabilities above; the
               labels the target answers for them rate each arm by how rare its answers
               are (mean self-information under the answered label frequencies), and
               later positions draw arms with weights favouring the informative ones
               (every arm keeps a small share). A choice made from the answers alone,
               whatever the target's domain; it is recorded in the manifest.
  probe        0, or N: positions N..3N-1 are mirrored and one-pixel-shifted copies of
               positions 0..N-1, which tell whether the target is mirror-invariant
               (data.invariance; any NPD source, not only pictures)

`legacy` reproduces the pixels of datasets made before preparation existed (transparency
over white, crops of 25-100%, the stream ends), so they can be resumed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from copycat_tf.data import images
from copycat_tf.errors import UserInputError

BACKGROUNDS = ("black", "white", "grey", "colour", "texture")
JITTER_ON = ("picture", "canvas")
# Adaptive arm weights: 2^(SHARPNESS * bits) per arm, each arm kept at >= ARM_FLOOR.
SHARPNESS = 2.0
ARM_FLOOR = 0.02


def _range(text: str, name: str, low: float, high: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        a = b = float("nan")
    if not (low <= a <= b <= high):
        raise UserInputError(
            f"--{name}={text!r} is invalid; expected MIN,MAX with {low:g} <= MIN <= MAX <= {high:g}"
        )
    return a, b


def _probability(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise UserInputError(f"--{name}={value} is invalid; expected a probability in [0, 1]")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Preparation:
    """A parsed set of preparation knobs (see the module docstring)."""

    backgrounds: tuple[str, ...]
    invert: float
    jitter: float
    blur: float
    crop_area: tuple[float, float]
    crop_aspect: tuple[float, float]
    cycle: bool
    adapt_after: int = 0
    legacy: bool = False
    jitter_on: str = "picture"
    probe: int = 0

    @classmethod
    def parse(
        cls,
        background: str,
        invert: float,
        jitter: float,
        blur: float,
        crop_area: str,
        crop_aspect: str,
        cycle: bool,
        adapt_after: int = 0,
        legacy: bool = False,
        jitter_on: str = "picture",
        probe: int = 0,
    ) -> Preparation:
        """From the flags' values (background "random" allows every kind).

        Raises:
          UserInputError: a value out of range or an unknown background.
        """
        if legacy:
            return LEGACY
        kinds = BACKGROUNDS if background == "random" else tuple(background.split(","))
        unknown = [k for k in kinds if k not in BACKGROUNDS]
        if unknown or not kinds:
            raise UserInputError(
                f"--npd_background={background!r} is invalid; expected random or a comma list "
                f"of {', '.join(BACKGROUNDS)}"
            )
        if not 0.0 <= jitter <= 1.0:
            raise UserInputError(f"--npd_jitter={jitter} is invalid; expected 0..1")
        if jitter_on not in JITTER_ON:
            raise UserInputError(
                f"--npd_jitter_on={jitter_on!r} is invalid; expected {' or '.join(JITTER_ON)}"
            )
        if adapt_after < 0:
            raise UserInputError(f"--npd_adapt_after={adapt_after}; expected >= 0 (0: off)")
        if probe < 0:
            raise UserInputError(f"--invariance_probe={probe}; expected >= 0 (0: off)")
        return cls(
            backgrounds=kinds,
            invert=_probability(invert, "npd_invert"),
            jitter=float(jitter),
            blur=_probability(blur, "npd_blur"),
            crop_area=_range(crop_area, "npd_crop_area", 0.0001, 1.0),
            crop_aspect=_range(crop_aspect, "npd_crop_aspect", 0.1, 10.0),
            cycle=bool(cycle),
            adapt_after=int(adapt_after),
            jitter_on=jitter_on,
            probe=int(probe),
        )

    @classmethod
    def of(cls, recipe, legacy: bool = False) -> Preparation:
        """The preparation a Recipe describes (copycat_tf.recipe.Recipe's npd_* fields).

        Raises:
          UserInputError: a knob out of range.
        """
        return cls.parse(
            background=recipe.npd_background,
            invert=recipe.npd_invert,
            jitter=recipe.npd_jitter,
            blur=recipe.npd_blur,
            crop_area=recipe.npd_crop_area,
            crop_aspect=recipe.npd_crop_aspect,
            cycle=recipe.npd_cycle,
            adapt_after=recipe.npd_adapt_after,
            legacy=legacy,
            jitter_on=recipe.npd_jitter_on,
            probe=recipe.invariance_probe,
        )

    def to_dict(self) -> dict:
        """The manifest's record (part of the dataset's identity)."""
        if self.legacy:
            return {"legacy": True}
        record = dataclasses.asdict(self)
        del record["legacy"]
        return json_ready(record)

    # ------------------------------------------------------------------ arms

    @property
    def arms(self) -> list[tuple[str, bool]]:
        """(background, inverted) pairs an item can draw."""
        polarities = [p for p, share in ((False, 1 - self.invert), (True, self.invert)) if share]
        return [(b, p) for b in self.backgrounds for p in polarities]

    def base_weights(self) -> np.ndarray:
        """Arm probabilities before adaptation: uniform backgrounds, inversion with p."""
        share = {False: 1 - self.invert, True: self.invert}
        w = np.array([share[inv] / len(self.backgrounds) for _, inv in self.arms])
        return w / w.sum()

    def draw_arm(self, rng: np.random.Generator, weights: np.ndarray | None) -> int:
        """The arm of an item: the first draw of its preparation generator."""
        w = self.base_weights() if weights is None else weights
        return int(rng.choice(len(w), p=w))

    # ------------------------------------------------------------------ geometry

    def crop_box(self, rng: np.random.Generator, full_view: bool):
        """None (the centred full view) or a random relative box (x0, y0, x1, y1)."""
        if full_view:
            return None
        area = rng.uniform(*self.crop_area)
        ratio = np.exp(rng.uniform(np.log(self.crop_aspect[0]), np.log(self.crop_aspect[1])))
        w = min(1.0, np.sqrt(area * ratio))
        h = min(1.0, np.sqrt(area / ratio))
        x0 = rng.uniform(0, 1 - w)
        y0 = rng.uniform(0, 1 - h)
        return (x0, y0, x0 + w, y0 + h)

    # ------------------------------------------------------------------ pixels

    def apply(
        self, picture, shape, box, rng: np.random.Generator, weights: np.ndarray | None = None
    ) -> np.ndarray:
        """uint8 [H, W, C] of a working picture (data.images.working_picture); the
        arm is drawn with `weights` (None: base_weights)."""
        height, width, channels = shape
        background, inverted = self.arms[self.draw_arm(rng, weights)]
        rgba = images.crop_rgba(picture, height, width, box)
        if self.jitter and self.jitter_on == "picture":
            gamma, contrast, brightness = self._jitter(rng)
            alpha = rgba[..., 3:]
            rgb = rgba[..., :3] ** gamma
            mean = float((rgb * alpha).sum() / max(1e-6, 3 * float(alpha.sum())))
            rgb = np.clip((rgb - mean) * contrast + mean + brightness, 0.0, 1.0)
            rgba = np.concatenate([rgb, alpha], axis=-1)
        rgb = images.composite(rgba, _background(background, rng, height, width))
        x = images.to_channels(rgb, channels)
        if inverted:
            x = 1.0 - x
        if self.jitter and self.jitter_on == "canvas":
            gamma, contrast, brightness = self._jitter(rng)
            x = np.clip(x, 0.0, 1.0) ** gamma
            x = (x - x.mean()) * contrast + x.mean() + brightness
        if rng.random() < self.blur:
            x = images.gaussian_blur(x, rng.uniform(0.5, 1.2))
        return images.to_uint8(x)

    def _jitter(self, rng: np.random.Generator) -> tuple[float, float, float]:
        """(gamma, contrast, brightness) of one item."""
        j = self.jitter
        return math.exp(rng.uniform(-j, j)), 1.0 + rng.uniform(-j, j), rng.uniform(-j, j) / 2


def _background(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    if kind == "black":
        level = np.zeros(3, np.float32)
    elif kind == "white":
        level = np.ones(3, np.float32)
    elif kind == "grey":
        level = np.full(3, rng.random(), np.float32)
    elif kind == "colour":
        level = rng.random(3).astype(np.float32)
    else:  # texture: a smooth random field, a different one per item
        return smooth_field(rng, height, width, 3)
    return np.broadcast_to(level, (height, width, 3))


def adapted_weights(
    num_arms: int, answers: list[tuple[int, int]], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Arm weights from (arm, stolen label) pairs of the exploration: each arm is rated by
    the mean self-information (bits) of its labels under the labels' overall frequencies
    (a label the target rarely answers is worth more), weights grow as 2^(SHARPNESS *
    bits), and every arm keeps at least ARM_FLOOR.

    Returns:
      (weights summing to 1, bits per arm; arms never answered get the overall mean).
    """
    labels = np.array([label for _, label in answers], np.int64)
    arms = np.array([arm for arm, _ in answers], np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64) + 1.0
    info = -np.log2(counts / counts.sum())
    overall = float(info[labels].mean()) if len(labels) else 0.0
    bits = np.array(
        [
            float(info[labels[arms == a]].mean()) if (arms == a).any() else overall
            for a in range(num_arms)
        ]
    )
    raw = np.exp2(SHARPNESS * (bits - bits.max()))
    weights = raw / raw.sum()
    floor = min(ARM_FLOOR, 0.5 / num_arms)
    weights = floor + (1 - floor * num_arms) * weights
    return weights / weights.sum(), bits


def smooth_field(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """A float [H, W, C] in [0, 1] of low-frequency random structure: coarse noise upsampled
    bilinearly (cheap, smooth, different at every draw)."""
    cells = int(rng.integers(2, 7))
    coarse = rng.random((cells + 1, cells + 1, channels)).astype(np.float32)
    ys = np.linspace(0, cells, height, dtype=np.float32)
    xs = np.linspace(0, cells, width, dtype=np.float32)
    y0 = np.minimum(ys.astype(int), cells - 1)
    x0 = np.minimum(xs.astype(int), cells - 1)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def json_ready(value):
    """Tuples as lists, so a record compares equal to itself after a JSON round trip."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


# Datasets made before NPD preparation existed (manifest schema 1).
LEGACY = Preparation(
    backgrounds=("white",),
    invert=0.0,
    jitter=0.0,
    blur=0.0,
    crop_area=(0.25, 1.0),
    crop_aspect=(3 / 4, 4 / 3),
    cycle=False,
    legacy=True,
)
