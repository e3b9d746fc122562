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
    w, h = image.size
    if box is None:
        target = width / height
        cw, ch = (h * target, h) if w / h > target else (w, w / target)
        x0, y0 = (w - cw) / 2, (h - ch) / 2
        pixels = (x0, y0, x0 + cw, y0 + ch)
    else:
        pixels = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    resized = image.resize((width, height), Image.Resampling.BILINEAR, box=pixels, reducing_gap=3.0)
    array = np.asarray(resized, np.uint8)
    return array[..., None] if array.ndim == 2 else array
