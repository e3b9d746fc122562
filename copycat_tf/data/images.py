"""Image conversions on the attack path (PIL: fast per image, every common format)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

# Largest source image decoded (pixels); bigger files are refused as unreadable rather
# than exhausting memory (PIL's decompression-bomb guard, made explicit).
MAX_SOURCE_PIXELS = 64_000_000


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of uint8 pixels [H, W, C] (C = 1 or 3): exactly the pixels sent."""
    array = np.asarray(image, np.uint8)
    mode = "L" if array.shape[-1] == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(
        buf, format="PNG", compress_level=3
    )
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, C] from PNG bytes written by png_bytes."""
    image = Image.open(io.BytesIO(data))
    array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def open_image(data: bytes) -> Image.Image:
    """Decodes any format PIL reads (PNG, JPEG, GIF, BMP, WebP, TIFF, ...).

    Raises:
      ValueError: the bytes are not a readable image.
    """
    try:
        with warnings.catch_warnings():  # oversized images are refused below, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_SOURCE_PIXELS:
            raise ValueError(f"image of {image.width}x{image.height} pixels is too large")
        image.load()
    except Image.UnidentifiedImageError as e:  # its message names a buffer's address
        raise ValueError("not a readable image: no format PIL reads") from e
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image: {e}") from e
    return image


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Grey ('L') or RGB; transparent pixels are composited over white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def box_pixels(size: tuple[int, int], height: int, width: int, box) -> tuple:
    """A relative box (x0, y0, x1, y1) in pixels of a picture of `size` (w, h); for None
    the largest centred box with the aspect ratio width/height."""
    w, h = size
    if box is None:
        target = width / height
        cw, ch = (h * target, h) if w / h > target else (w, w / target)
        x0, y0 = (w - cw) / 2, (h - ch) / 2
        return (x0, y0, x0 + cw, y0 + ch)
    return (box[0] * w, box[1] * h, box[2] * w, box[3] * h)


def crop_and_resize(
    image: Image.Image,
    shape: tuple[int, int, int],
    box: tuple[float, float, float, float] | None = None,
) -> np.ndarray:
    """A crop (relative box x0, y0, x1, y1 in [0, 1]) resized to shape (H, W, C), uint8.

    Without a box the largest centred crop with the target's aspect ratio is used.
    """
    height, width, channels = shape
    image = to_mode(image, channels)
    pixels = box_pixels(image.size, height, width, box)
    resized = image.resize((width, height), Image.Resampling.BILINEAR, box=pixels, reducing_gap=3.0)
    array = np.asarray(resized, np.uint8)
    return array[..., None] if array.ndim == 2 else array


# ----------------------------------------------------------------------------- preparation
# Natural NPD pictures are decoded once into RGBA, shrunk to a working size, then each NPD
# item crops and resizes that picture to the target's size and composites it over a
# background there (cheap at 28x28, whatever the picture's size).


def working_picture(data: bytes, max_side: int) -> Image.Image:
    """A decoded picture, shrunk (never enlarged) so its longer side is max_side, as
    premultiplied RGBa: Pillow resizes RGBA by premultiplying the whole picture first, so
    every crop of a picture kept this way (crop_rgba) skips that work with the same pixels.

    Raises:
      ValueError: the bytes are not a readable image.
    """
    image = open_image(data)
    rgba = image.convert("RGBA")
    scale = max_side / max(rgba.size)
    if scale < 1:
        size = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
        rgba = rgba.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return rgba.convert("RGBa")


def crop_rgba(
    picture: Image.Image, height: int, width: int, box: tuple[float, float, float, float] | None
) -> np.ndarray:
    """The relative box (x0, y0, x1, y1) of an RGBA or premultiplied RGBa picture resized
    to (height, width), as straight-alpha RGBA float32 [H, W, 4] in [0, 1]; None is the
    largest centred crop of the target's aspect. Colours under transparent pixels do not
    bleed (resized premultiplied: Pillow does it for RGBA, an RGBa picture already is)."""
    pixels = box_pixels(picture.size, height, width, box)
    resized = picture.resize((width, height), Image.Resampling.BILINEAR, box=pixels)
    if resized.mode == "RGBa":
        resized = resized.convert("RGBA")
    return np.asarray(resized, np.float32) / 255.0


def composite(rgba: np.ndarray, background: np.ndarray) -> np.ndarray:
    """RGB float [H, W, 3] of an RGBA float image over an RGB float background."""
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha + background * (1.0 - alpha)


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """Float RGB -> float [H, W, channels] (grey by ITU-R 601 luma, as PIL's "L")."""
    if channels == 3:
        return rgb
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return luma[..., None]


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a float [H, W, C] image (edges repeated)."""
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    out = image
    for axis in (0, 1):
        padded = np.pad(
            out, [(radius, radius) if a == axis else (0, 0) for a in range(3)], mode="edge"
        )
        length = out.shape[axis]
        out = sum(
            t * np.take(padded, np.arange(i, i + length), axis=axis) for i, t in enumerate(taps)
        )
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 [0, 255] (rounded, clipped)."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
