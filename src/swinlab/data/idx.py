"""The IDX format of MNIST / Fashion-MNIST (raw or gzip), and a Fashion-MNIST dataset over IDX files.

IDX header: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per dimension;
the payload follows in C order, big-endian. Images are ``0x00000803`` (uint8, 3-D), labels ``0x00000801``
(uint8, 1-D).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from swinlab.data.memory import ArrayDataset

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


def _open(path: Path):
    """Open raw or gzip by content (the first two bytes), not by file name."""
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a native-byte-order array of the shape its header declares."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with _open(path) as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _DTYPES:
            raise ValueError(
                f"{path}: not an IDX file (magic 0x{magic.hex()}; expected 0x0000 + dtype code + ndim, "
                "e.g. 0x00000803 for images, 0x00000801 for labels)"
            )
        dtype = np.dtype(_DTYPES[magic[2]])
        ndim = magic[3]
        header = f.read(4 * ndim)
        if len(header) < 4 * ndim:
            raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions declared)")
        shape = struct.unpack(f">{ndim}I", header)
        out = np.empty(shape, dtype=dtype.newbyteorder("="))
        view = memoryview(out).cast("B")
        got = 0
        while got < view.nbytes:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        if got < view.nbytes:
            raise ValueError(f"{path}: truncated IDX file: header {shape} needs {view.nbytes} data bytes, got {got}")
        if f.read(1):
            raise ValueError(f"{path}: IDX file has data beyond the {shape} its header declares")
    if dtype.itemsize > 1 and np.little_endian:
        out.byteswap(inplace=True)
    return out


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` as IDX; gzip when the name ends in ``.gz`` (mtime 0, so the bytes are reproducible)."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"IDX cannot store dtype {array.dtype} (supported: {', '.join(_DTYPES.values())})")
    if array.ndim > 255:
        raise ValueError(f"IDX stores at most 255 dimensions, got {array.ndim}")
    payload = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    payload += array.astype(_DTYPES[code], copy=False).tobytes()
    if path.suffix == ".gz":
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _find(root: Path, stem: str) -> Path:
    for folder in (root, root / "FashionMNIST" / "raw", root / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"{stem}(.gz) not found in {root} (nor in its FashionMNIST/raw or raw subfolders)")


class FashionMNIST(ArrayDataset):
    """Fashion-MNIST (or any 10-class IDX set with the same file names), in memory as one uint8 array."""

    mean = FASHION_MNIST_MEAN
    std = FASHION_MNIST_STD

    def __init__(self, root: str | Path, train: bool = True, classes: list[str] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST folder not found: {root}")
        prefix = "train" if train else "t10k"
        images_path = _find(root, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1:
            raise ValueError(f"{labels_path}: expected 1-D labels, got shape {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(
                f"count mismatch: {len(images)} images in {images_path} but {len(labels)} labels in {labels_path}"
            )
        super().__init__(images[:, None], labels, classes or FASHION_MNIST_CLASSES)
