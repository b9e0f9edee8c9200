"""Depth data in its real formats, as ``(image, depth)`` samples: the ``depth`` data kind.

- ``nyu_depth``: NYUv2 as the BTS / GLPDepth / AiT file lists describe it: each line ``rgb_path depth_path focal``,
  paths relative to a base folder (a leading ``/`` is ignored, as those codes concatenate strings); the depth is a
  16-bit PNG in millimetres (0 = no measurement), read as metres.
- ``procedural_depth``: rendered rooms with exact depth (:mod:`swinlab.data.depth_scenes`), no download.
- ``middlebury_motorcycle``: the real Middlebury 2014 stereo pair scikit-image ships, its ground-truth disparity
  turned into depth by ``Z = f · B / (d + doffs)`` with the calibration of the shipped quarter-size images; pixels
  without ground truth are 0. Needs the optional extra ``scikit-image``.

``depth_holes`` (a share of pixels) corrupts the *training* labels of any of them with rectangular sensor holes
(:func:`punch_holes`, 0 = invalid), the same holes for a sample in every run: clean exact depth with controlled
corruption, to measure what a method does about missing ground truth (AiT's mask augmentation). Validation labels
stay clean.

A sample is ``(rgb uint8 (3, H, W), depth float32 (1, H, W) metres)`` from a source, and after
:class:`DepthTransform` ``(normalised float image, depth)``; depth pixels are resized by nearest neighbour so that an
invalid 0 never blends into its neighbours.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from swinlab.config import DataConfig
from swinlab.data.depth_scenes import render_scene
from swinlab.data.images import read_image, read_image_array
from swinlab.data.transforms import resize

DEPTH_DATASETS = ("nyu_depth", "procedural_depth", "middlebury_motorcycle")
MM_PER_METRE = 1000.0
PROCEDURAL_SIZES = (512, 64)
"""Scenes of ``procedural_depth`` (train, val) when ``data.train_limit`` / ``data.val_limit`` do not say."""
PROCEDURAL_STREAMS = (0, 1)
"""Scene streams (``render_scene``'s seed) of the training and validation scenes of ``procedural_depth``."""
HOLES_STREAM = 2
"""Seed of the hole pattern stream: like the scenes, the holes are the data's, not the run seed's."""
HOLE_SIDES = (1 / 16, 1 / 4)
"""Range of a hole's side as a share of the map's side (a Kinect's holes: thin edges to large dark patches)."""
MIDDLEBURY_CALIBRATION = {"focal_px": 994.978, "baseline_m": 0.193001, "doffs_px": 31.086}
"""Calibration of scikit-image's quarter-size Motorcycle pair, as its ``stereo_motorcycle`` documents it."""
NYU_BASE_FOLDERS = {"train": ("", "sync"), "val": ("", "official_splits/test")}
"""Folders under ``data.root`` the paths of a list may be relative to (BTS / GLPDepth keep the test images in
``official_splits/test``, the training ones in ``sync``): the first holding a list's first image is used."""


def depth_from_png(path: str | Path) -> np.ndarray:
    """A 16-bit depth PNG in millimetres as ``(H, W)`` float32 metres (0 stays 0 = invalid)."""
    array = read_image_array(path)
    if array.dtype != np.uint16:
        raise ValueError(f"{path}: a depth map must be a 16-bit PNG in millimetres, got {array.dtype} values")
    if array.ndim != 2:
        raise ValueError(f"{path}: a depth map must have one channel, got shape {array.shape}")
    return array.astype(np.float32) / MM_PER_METRE


def _sample(rgb: np.ndarray, depth: np.ndarray, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked ``(3, H, W)`` uint8 and ``(1, H, W)`` float32 tensors of an RGB and a depth array."""
    if rgb.shape[:2] != depth.shape:
        raise ValueError(f"{what}: image {rgb.shape[:2]} and depth {depth.shape} differ in size (H, W)")
    if not (depth > 0).any():
        raise ValueError(f"{what}: the depth map has no valid pixel (every value is 0)")
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), torch.from_numpy(depth)[None]


@dataclass(frozen=True)
class DepthListEntry:
    rgb: Path
    depth: Path
    focal: float


def read_depth_list(list_path: str | Path, root: str | Path, split: str = "train") -> list[DepthListEntry]:
    """The entries of a BTS / GLPDepth file list, paths resolved under ``root`` (see :data:`NYU_BASE_FOLDERS`)."""
    list_path, root = Path(list_path), Path(root)
    if not list_path.is_file():
        raise FileNotFoundError(f"depth file list not found: {list_path}")
    rows = []
    for number, line in enumerate(list_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        words = line.split()
        if len(words) != 3:
            raise ValueError(f"{list_path}:{number}: expected 'rgb_path depth_path focal', got {line.strip()!r}")
        try:
            focal = float(words[2])
        except ValueError:
            raise ValueError(f"{list_path}:{number}: focal {words[2]!r} is not a number") from None
        rows.append((words[0].lstrip("/"), words[1].lstrip("/"), focal))
    if not rows:
        raise ValueError(f"depth file list {list_path} has no entries")
    bases = [root / sub for sub in NYU_BASE_FOLDERS[split]]
    base = next((b for b in bases if (b / rows[0][0]).is_file()), None)
    if base is None:
        tried = ", ".join(str(b / rows[0][0]) for b in bases)
        raise FileNotFoundError(f"{list_path}:1: image not found (tried {tried}); is data.root the NYUv2 folder?")
    return [DepthListEntry(base / rgb, base / depth, focal) for rgb, depth, focal in rows]


class NYUDepth(Dataset):
    """NYUv2 (or any set in its format) from a file list: ``(rgb, depth)`` samples; a missing file or a depth map of
    the wrong kind is an error naming the file, not a skipped sample."""

    def __init__(self, list_path: str | Path, root: str | Path, split: str = "train") -> None:
        self.entries = read_depth_list(list_path, root, split)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.entries[index]
        return _sample(read_image(entry.rgb, 3), depth_from_png(entry.depth), str(entry.depth))


class ProceduralDepth(Dataset):
    """``count`` rendered scenes of ``size`` pixels; ``seed`` picks the stream (train and val use different ones).

    Each scene is rendered on first use and kept when the whole set fits in ``cache_bytes`` (at 64 px, rendering is
    ~2.6 ms a scene, a third of a small tokenizer's training step; 1024 kept scenes take 29 MB).
    """

    def __init__(self, count: int, size: int, seed: int, cache_bytes: int = 256 << 20) -> None:
        self.count, self.size, self.seed = count, size, seed
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        if count * size * size * 7 <= cache_bytes:  # 3 bytes of RGB + 4 of depth a pixel
            self._cache = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(f"scene {index} out of range for {self.count} scenes")
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        scene = render_scene(self.size, self.seed, index)
        sample = _sample(scene.rgb, scene.depth, f"scene {index}")
        if self._cache is not None:
            self._cache[index] = sample
        return sample


def punch_holes(depth: torch.Tensor, fraction: float, seed: int, index: int) -> torch.Tensor:
    """A copy of ``depth`` (..., H, W) with uniformly placed rectangles zeroed until they cover at least ``fraction``
    of its pixels (the last one may overshoot by its area; zeros the map already had are not counted); sides are drawn
    in :data:`HOLE_SIDES`. A pure function of ``(seed, index, fraction)`` and the map's size, so a sample's holes are
    the same in every run."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"depth hole fraction must be in [0, 1), got {fraction}")
    out = depth.clone()
    if fraction == 0.0:
        return out
    h, w = depth.shape[-2:]
    hole = torch.zeros((h, w), dtype=torch.bool)
    rng = np.random.default_rng([seed % 2**63, index % 2**63])
    low, high = HOLE_SIDES
    while hole.float().mean() < fraction:
        rh, rw = (max(1, round(side * rng.uniform(low, high))) for side in (h, w))
        top, left = int(rng.integers(0, h - rh + 1)), int(rng.integers(0, w - rw + 1))
        hole[top : top + rh, left : left + rw] = True
    out[..., hole] = 0.0
    return out


class DepthHoles(Dataset):
    """A depth source whose labels get :func:`punch_holes` (sample ``index`` gets the holes of ``index``); images are
    untouched. A map left without any valid pixel would be an error later, so ``fraction`` stays below 1."""

    def __init__(self, source: Dataset, fraction: float, seed: int = HOLES_STREAM) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"data.depth_holes must be a share of pixels in [0, 1), got {fraction}")
        self.source, self.fraction, self.seed = source, fraction, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, depth = self.source[index]
        return rgb, punch_holes(depth, self.fraction, self.seed, index)


def middlebury_motorcycle() -> tuple[np.ndarray, np.ndarray]:
    """The left image ``(500, 741, 3)`` uint8 and its depth ``(500, 741)`` float32 metres (0: no ground truth)."""
    try:
        from skimage.data import stereo_motorcycle
    except ImportError:
        raise ImportError(
            "data.name=middlebury_motorcycle needs scikit-image: pip install 'swinlab[depth]' (or scikit-image)"
        ) from None
    left, _, disparity = stereo_motorcycle()
    c = MIDDLEBURY_CALIBRATION
    known = np.isfinite(disparity)
    depth = np.zeros(disparity.shape, dtype=np.float32)
    depth[known] = c["focal_px"] * c["baseline_m"] / (disparity[known] + c["doffs_px"])
    return left, depth


class FrameCrops(Dataset):
    """One frame as a set: ``count`` copies for training (the random crop makes them differ) or, with ``tile``,
    its non-overlapping ``tile`` x ``tile`` crops in raster order for validation."""

    def __init__(self, rgb: np.ndarray, depth: np.ndarray, count: int = 1, tile: int | None = None) -> None:
        self.rgb, self.depth = _sample(rgb, depth, "frame")
        self.count, self.tile = count, tile
        if tile is not None:
            h, w = depth.shape
            if tile > min(h, w):
                raise ValueError(f"tile {tile} is larger than the {h}x{w} frame")
            corners = [(r * tile, c * tile) for r in range(h // tile) for c in range(w // tile)]
            self.corners = [(t, x) for t, x in corners if (self.depth[0, t : t + tile, x : x + tile] > 0).any()]

    def __len__(self) -> int:
        return self.count if self.tile is None else len(self.corners)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tile is None:
            return self.rgb, self.depth
        top, left = self.corners[index]
        window = (slice(None), slice(top, top + self.tile), slice(left, left + self.tile))
        return self.rgb[window], self.depth[window]


def rescale_pair(rgb: torch.Tensor, depth: torch.Tensor, shorter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image (float, bilinear) and depth (nearest) with their shorter side resized to ``shorter`` pixels."""
    h, w = depth.shape[-2:]
    s = shorter / min(h, w)
    size = (max(shorter, round(h * s)), max(shorter, round(w * s)))
    return resize(rgb, size), resize_depth(depth, size)


def resize_depth(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of a ``(1, H, W)`` depth map (an invalid 0 is never averaged into a valid pixel)."""
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth
    return F.interpolate(depth[None], size=size, mode="nearest-exact")[0]


class DepthTransform:
    """``(rgb uint8, depth)`` -> ``(normalised float32 image, depth metres)``, geometry applied to both.

    Both: the shorter side resized to ``scale_size`` when given. Training: a random ``img_size`` square crop (redrawn
    up to 10 times while it holds no valid depth) and a horizontal flip with ``hflip``. Evaluation: the whole frame.
    """

    def __init__(
        self,
        img_size: int,
        *,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        hflip: bool = True,
        scale_size: int | None = None,
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"depth images are RGB: need 3 means and 3 positive stds, got {mean}, {std}")
        self.img_size, self.train, self.hflip, self.scale_size = img_size, train, hflip and train, scale_size
        self._mean = torch.tensor(mean).view(3, 1, 1) * 255.0
        self._std = torch.tensor(std).view(3, 1, 1) * 255.0

    @property
    def is_random(self) -> bool:
        return self.train

    def __call__(
        self, rgb: torch.Tensor, depth: torch.Tensor, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = rgb.float()
        if self.scale_size is not None:
            image, depth = rescale_pair(image, depth, self.scale_size)
        if self.train:
            if rng is None:
                raise ValueError("a random transform needs rng=random.Random(seed)")
            image, depth = self._crop(image, depth, rng)
            if self.hflip and rng.random() < 0.5:
                image, depth = image.flip(-1), depth.flip(-1)
        return (image - self._mean) / self._std, depth.contiguous()

    def _crop(self, image: torch.Tensor, depth: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.img_size
        h, w = depth.shape[-2:]
        if h < size or w < size:
            raise ValueError(f"cannot crop {size} px from a {h}x{w} depth frame (set data.scale_size >= {size})")
        for _ in range(10):
            top, left = rng.randint(0, h - size), rng.randint(0, w - size)
            crop = depth[:, top : top + size, left : left + size]
            if (crop > 0).any():
                break
        return image[:, top : top + size, left : left + size], crop


class DepthSamples(Dataset):
    """A source of ``(rgb, depth)`` with its transform, keyed by index or ``(index, seed)`` as the train sampler
    gives (see :mod:`swinlab.data.samplers`)."""

    def __init__(self, source: Dataset, transform: DepthTransform, limit: int | None = None) -> None:
        self.source, self.transform = source, transform
        self.size = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        rng = None
        if self.transform.is_random:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        return self.transform(*self.source[index], rng)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
"""RGB normalisation of every depth set unless ``data.mean`` / ``data.std`` say otherwise."""


def _sources(cfg: DataConfig) -> tuple[Dataset, Dataset, int | None]:
    """Raw train and val sources of ``cfg.name`` and the shorter side the transforms still resize to."""
    if cfg.name == "procedural_depth":  # fixed streams: like a real set, the scenes do not follow the run seed
        train = ProceduralDepth(cfg.train_limit or PROCEDURAL_SIZES[0], cfg.img_size, seed=PROCEDURAL_STREAMS[0])
        return train, ProceduralDepth(cfg.val_limit or PROCEDURAL_SIZES[1], cfg.img_size, PROCEDURAL_STREAMS[1]), None
    if cfg.name == "middlebury_motorcycle":
        rgb, depth = _sample(*middlebury_motorcycle(), "the Middlebury frame")
        if cfg.scale_size is not None:  # resized once here, so that validation tiles the frame training crops
            rgb, depth = rescale_pair(rgb, depth, cfg.scale_size)
            rgb = rgb.round().clamp(0, 255).byte()
        rgb_hwc, depth_hw = rgb.permute(1, 2, 0).numpy(), depth[0].numpy()
        train = FrameCrops(rgb_hwc, depth_hw, count=cfg.train_limit or PROCEDURAL_SIZES[0])
        return train, FrameCrops(rgb_hwc, depth_hw, tile=cfg.img_size), None
    if cfg.name != "nyu_depth":
        raise ValueError(f"{cfg.name!r} is not a depth dataset ({', '.join(DEPTH_DATASETS)})")
    if cfg.root is None or cfg.train_list is None or cfg.val_list is None:
        raise ValueError(
            "data.name=nyu_depth needs data.root (the NYUv2 folder) and data.train_list / data.val_list (BTS / "
            "GLPDepth file lists: 'rgb_path depth_path focal' per line)"
        )
    root = Path(cfg.root).expanduser()

    def listed(name: str) -> Path:
        path = Path(name).expanduser()
        return path if path.is_absolute() else root / path

    train, val = NYUDepth(listed(cfg.train_list), root, "train"), NYUDepth(listed(cfg.val_list), root, "val")
    return train, val, cfg.scale_size


def depth_sets(cfg: DataConfig) -> tuple[DepthSamples, DepthSamples]:
    """Train and val sets of ``cfg.name`` (one of :data:`DEPTH_DATASETS`) with their transforms: training crops of
    ``img_size``, validation frames whole (``procedural_depth``: rendered at ``img_size``; ``nyu_depth``: the
    frame resized by ``scale_size``; ``middlebury_motorcycle``: ``img_size`` tiles of the frame). With
    ``depth_holes`` above 0 the training labels are :class:`DepthHoles`."""
    train_src, val_src, scale_size = _sources(cfg)
    if cfg.depth_holes:
        train_src = DepthHoles(train_src, cfg.depth_holes)
    mean, std = tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD)

    def transform(train: bool) -> DepthTransform:
        return DepthTransform(cfg.img_size, train=train, mean=mean, std=std, hflip=cfg.hflip, scale_size=scale_size)

    limits = (None, None) if cfg.name == "procedural_depth" else (cfg.train_limit, cfg.val_limit)
    return DepthSamples(train_src, transform(True), limits[0]), DepthSamples(val_src, transform(False), limits[1])
