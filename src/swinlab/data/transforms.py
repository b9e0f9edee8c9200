"""Per-sample image transforms on uint8 CHW tensors, written on plain torch ops.

Why not torchvision: no torchvision wheel imports beside the CPU torch 2.13 this project targets (0.28 fails
with ``operator torchvision::nms does not exist``; 0.29 requires torch 2.14 and drags in the CUDA stack), and
the Swin recipes need only a handful of ops: random resized crop, pad-and-crop, flip, resize, centre crop,
normalise.

Randomness: every call takes a ``random.Random``. The train loader seeds one per sample from torch's global
RNG (see ``swinlab.data.samplers``), so ``torch.manual_seed`` reproduces an epoch whatever the number of
workers.

Random-resized-crop scale: the Swin/ImageNet recipe crops down to 8% of the image, which at 224 px still
leaves an object of ~60 px. At 28-32 px an 8% crop is ~9 px of a garment, mostly noise, so small inputs
(``img_size`` < 64) use a milder (0.35, 1); from 128 px on the recipe's (0.08, 1); in between the lower bound
moves linearly. ``augment="simmim"`` is SimMIM's pre-training crop, (0.67, 1) at every size: masked-image modelling
needs most of the image to reconstruct the hidden part from.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

AUGMENTS = ("standard", "simmim", "light", "none")
RATIO = (3 / 4, 4 / 3)
SIMMIM_SCALE = (0.67, 1.0)
EVAL_CROP_FRACTION = 0.875


def rrc_scale(img_size: int) -> tuple[float, float]:
    """Random-resized-crop area range for an output of ``img_size`` pixels (see the module docstring)."""
    if img_size >= 128:
        return (0.08, 1.0)
    if img_size < 64:
        return (0.35, 1.0)
    return (0.35 + (0.08 - 0.35) * (img_size - 64) / 64, 1.0)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    rng: random.Random,
    ratio: tuple[float, float] = RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop with area fraction in ``scale`` and aspect ratio (w/h) in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: the whole image, trimmed to the nearest allowed aspect ratio, centred.
    h, w = height, width
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (height - h) // 2, (width - w) // 2, h, w


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of a CHW tensor; float32 result on the 0-255 scale."""
    x = img.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def resize_shorter(img: torch.Tensor, shorter: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    s = shorter / min(h, w)
    return resize(img, (max(shorter, round(h * s)), max(shorter, round(w * s))))


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size} px from an image of {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    return img[..., top : top + size, left : left + size]


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> torch.Tensor:
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values but the images have {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(channels, 1, 1)


class ImageTransform:
    """uint8 CHW image -> float32 normalised ``(out_chans, img_size, img_size)`` tensor.

    ``train=False`` gives the evaluation path: shorter side to ``img_size / 0.875`` then a centre crop for
    ``img_size >= 128`` (the ImageNet convention), a plain resize for smaller inputs (cropping a 28 px garment
    loses the garment).
    """

    def __init__(
        self,
        img_size: int,
        *,
        train: bool,
        augment: str = "standard",
        hflip: bool = True,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        in_chans: int,
        out_chans: int | None = None,
    ) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augment {augment!r} (choose from {', '.join(AUGMENTS)})")
        if img_size < 1:
            raise ValueError(f"img_size must be positive, got {img_size}")
        out_chans = in_chans if out_chans is None else out_chans
        if out_chans != in_chans and not (in_chans == 1 and out_chans == 3):
            raise ValueError(
                f"cannot turn {in_chans}-channel images into {out_chans} channels "
                f"(only 1 -> 3 by repeating the grey channel)"
            )
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {std}")
        self.img_size = img_size
        self.train = train
        self.augment = augment if train else "none"
        self.hflip = hflip and train
        self.out_chans = out_chans
        mean_t, std_t = (
            _per_channel(tuple(mean), out_chans, "mean"),
            _per_channel(tuple(std), out_chans, "std"),
        )
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t

    @property
    def is_random(self) -> bool:
        return self.augment != "none"

    def __call__(self, img: torch.Tensor, rng: random.Random | None = None) -> torch.Tensor:
        if img.ndim != 3:
            raise ValueError(f"expected a CHW image, got shape {tuple(img.shape)}")
        if self.is_random and rng is None:
            raise ValueError("a random transform needs rng=random.Random(seed)")
        size = self.img_size
        if self.augment in ("standard", "simmim"):
            scale = SIMMIM_SCALE if self.augment == "simmim" else rrc_scale(size)
            top, left, h, w = random_resized_crop_box(img.shape[-2], img.shape[-1], scale, rng)
            x = resize(img[..., top : top + h, left : left + w], (size, size))
        elif self.augment == "light":
            pad = max(2, min(4, size // 8))
            x = F.pad(resize(img, (size, size)), (pad, pad, pad, pad))
            top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
            x = x[..., top : top + size, left : left + size]
        elif size >= 128 and not self.train:
            x = center_crop(resize_shorter(img, int(size / EVAL_CROP_FRACTION)), size)
        else:
            x = resize(img, (size, size))
        if self.hflip and self.is_random and rng.random() < 0.5:
            x = x.flip(-1)
        if x.shape[0] != self.out_chans:
            x = x.expand(self.out_chans, -1, -1)
        return x * self._scale - self._shift
