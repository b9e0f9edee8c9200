"""Reading image files into arrays with their real bit depth, so 16-bit PNGs (depth maps, scientific images) are
neither clipped nor misread.

PIL's ``convert("L")`` of a 16-bit image clips every value above 255 to white: a depth map in millimetres becomes a
near-white picture. :func:`read_image_array` keeps the stored integers (``uint16`` for 16-bit files) for data that
means numbers (AiT's depth), and :func:`read_image` maps them onto 8 bits by the full-scale factor 65535 / 255 for
data that is a picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UINT16_TO_UINT8 = 65535 / 255
"""257: full scale to full scale (0 -> 0, 65535 -> 255)."""


def read_image_array(path: str | Path) -> np.ndarray:
    """The stored values of a single-band or RGB(A) image: ``uint8`` for 8-bit files, ``uint16`` for 16-bit ones
    (``(H, W)`` or ``(H, W, C)``). Float and 32-bit integer images have no agreed scale and are refused."""
    with Image.open(path) as img:
        if img.mode in SIXTEEN_BIT_MODES:
            return np.array(img, dtype=np.uint16)
        if img.mode in ("I", "F"):
            raise ValueError(f"{path}: a {img.mode!r} (32-bit) image has no agreed range; convert it to 8 or 16 bits")
        if img.mode not in ("L", "RGB", "RGBA"):
            img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
        return np.array(img)


def read_image(path: str | Path, channels: int) -> np.ndarray:
    """A picture as ``uint8`` ``(H, W)`` (``channels=1``) or ``(H, W, 3)``: 16-bit values scaled to 8 bits,
    colour averaged to grey the way PIL's ``L`` does, grey repeated to RGB, alpha dropped."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    array = read_image_array(path)
    if array.dtype == np.uint16:
        array = np.round(array / UINT16_TO_UINT8).astype(np.uint8)
    if array.ndim == 3:
        array = array[..., :3]
    mode = "L" if array.ndim == 2 else "RGB"
    return np.array(Image.fromarray(array, mode).convert("L" if channels == 1 else "RGB"))
