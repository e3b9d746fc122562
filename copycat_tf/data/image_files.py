"""Image files on disk: finding them and telling them from other files, without
TensorFlow (NPD streams import this in worker processes that never need it)."""

from __future__ import annotations

import os

# Extensions tf.io.decode_image reads, and the leading bytes that identify each format.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


def list_images(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[str]:
    """All files under `root` (recursive, sorted) with one of `extensions`."""
    found = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for f in sorted(files):
            if f.lower().endswith(extensions):
                found.append(os.path.join(dirpath, f))
    return found


def looks_like_image(path: str) -> bool:
    """True when the file starts with the signature of a format tf.io.decode_image reads."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head.startswith(_IMAGE_MAGIC)
