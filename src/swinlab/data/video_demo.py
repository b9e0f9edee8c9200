"""``motion_demo``: a generated video classification task that a single frame cannot solve.

Each video shows one shape (square, disc or cross, random size and colour) drifting across a noisy background
in one of four directions, the class: ``left``, ``right``, ``up``, ``down``. The picture is a torus: the shape
leaves one edge and re-enters at the opposite one, and its start position is uniform, so at *every* frame its
position is uniform whatever the class. A second, static shape of the same kind is a distractor. Any single
frame is therefore independent of the label (single-frame accuracy cannot beat chance, 25%); only the
displacement between frames tells the class.

Videos are generated on the fly from ``(seed, split, index)``, so nothing ships with the package and every
epoch, worker and machine sees the same pixels. They go through the same frame sampling and clip transforms
as decoded video files (:class:`swinlab.data.video.VideoClips`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

MOTION_CLASSES = ("left", "right", "up", "down")
_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) per unit of speed
_SPLITS = {"train": 0, "val": 1}


class ArrayVideo:
    """Frames already in memory, ``(T, C, H, W)`` uint8."""

    def __init__(self, frames: torch.Tensor) -> None:
        self.frames = frames
        self.num_frames = frames.shape[0]

    def read(self, indices: Sequence[int]) -> torch.Tensor:
        return self.frames[list(indices)]


def _shape_mask(kind: int, side: int) -> np.ndarray:
    """A ``side x side`` boolean mask of a square (0), disc (1) or plus-shaped cross (2)."""
    yy, xx = np.mgrid[:side, :side] - (side - 1) / 2
    if kind == 0:
        return np.ones((side, side), bool)
    if kind == 1:
        return yy**2 + xx**2 <= (side / 2) ** 2
    return (np.abs(yy) <= side / 6) | (np.abs(xx) <= side / 6)


def motion_video(rng: np.random.Generator, label: int, num_frames: int = 24, size: int = 32) -> torch.Tensor:
    """One video of class ``label`` (index into :data:`MOTION_CLASSES`): uint8 ``(num_frames, 3, size, size)``."""
    dy, dx = _STEP[MOTION_CLASSES[label]]
    speed = rng.uniform(0.75, 1.5)  # pixels per frame
    kind, side = int(rng.integers(3)), int(rng.integers(size // 6, size // 3 + 1))
    mask = _shape_mask(kind, side)
    colour, distractor_colour = rng.integers(140, 256, size=(2, 3))
    background = rng.integers(0, 90, size=3)
    start, distractor_at = rng.uniform(0, size, size=(2, 2))
    ys, xs = np.nonzero(mask)

    def paint(frame: np.ndarray, at: np.ndarray, rgb: np.ndarray) -> None:
        y, x = np.round(at).astype(int)
        frame[(ys + y) % size, (xs + x) % size] = rgb  # wraps around the edges: the picture is a torus

    noise = rng.normal(0, 12, size=(num_frames, size, size, 3))
    frames = np.clip(background + noise, 0, 255).astype(np.uint8)
    for t in range(num_frames):
        paint(frames[t], distractor_at, distractor_colour)
        paint(frames[t], start + speed * t * np.array([dy, dx]), colour)
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


class MotionDemo:
    """``size`` generated videos of the ``train`` or ``val`` split (a :class:`swinlab.data.video.VideoSource`);
    classes are balanced (video i has class ``i % 4``)."""

    def __init__(self, split: str, size: int, seed: int = 0, num_frames: int = 24, img_size: int = 32) -> None:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if size < 1 or num_frames < 1 or img_size < 12:
            raise ValueError(f"need size >= 1, num_frames >= 1, img_size >= 12; got {size}, {num_frames}, {img_size}")
        self.split, self.size, self.seed = split, size, seed
        self.classes = list(MOTION_CLASSES)
        self.num_frames, self.img_size = num_frames, img_size

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return index % len(MOTION_CLASSES)

    def open(self, index: int) -> ArrayVideo:
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        return ArrayVideo(motion_video(rng, self.label(index), self.num_frames, self.img_size))

    def describe(self, index: int) -> str:
        return f"motion_demo/{self.split}/{index}"
