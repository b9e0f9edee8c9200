"""``root/<class>/**/*.{jpg,jpeg,png,bmp,webp}`` decoded with PIL, classes sorted by folder name.

A corrupt or truncated file must not kill a long run: it is reported once (with its path) and its sample comes
back as ``None``, which the loaders' collate function drops.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image

from swinlab.data.images import read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageFolder(torch.utils.data.Dataset):
    """uint8 CHW images with ``channels`` channels (1: grey, 3: RGB); RGBA, palette, L and 16-bit files are
    converted (:func:`swinlab.data.images.read_image`)."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, root: str | Path, channels: int = 3, classes: list[str] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        if channels not in (1, 3):
            raise ValueError(f"ImageFolder channels must be 1 or 3, got {channels!r}")
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            classes = found
        elif unknown := sorted(set(found) - set(classes)):
            raise ValueError(f"{root}: class folders {unknown} are not among the known classes {classes}")
        index = {name: i for i, name in enumerate(classes)}
        self.samples = [
            (path, index[name])
            for name in found
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class folders under {root}")
        self.root = root
        self.classes = list(classes)
        self.channels = channels
        if channels == 1:  # ImageNet statistics averaged over RGB
            self.mean, self.std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            image = read_image(path, self.channels)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {e}", RuntimeWarning, stacklevel=2)
            return None
        tensor = torch.from_numpy(image)
        return (tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()), label
