"""The generated motion demo: deterministic, balanced, and its class is the direction the shape moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from swinlab.data.video_demo import MOTION_CLASSES, MotionDemo


def _displacement(frames: torch.Tensor, lag: int) -> tuple[int, int]:
    """The torus shift (dy, dx) that best maps frame 0 onto frame ``lag`` once the static parts (background,
    distractor) are removed by subtracting the temporal median."""
    x = frames.float().mean(1).numpy()  # (T, H, W) grey
    moving = x - np.median(x, axis=0)
    a, b = moving[0], moving[lag]
    size = a.shape[0]
    scores = {
        (dy, dx): float((np.roll(a, (dy, dx), axis=(0, 1)) * b).sum())
        for dy in range(-size // 2, size // 2)
        for dx in range(-size // 2, size // 2)
    }
    return max(scores, key=scores.get)


def test_deterministic_balanced_and_split_specific():
    train, again, val = MotionDemo("train", 8, seed=3), MotionDemo("train", 8, seed=3), MotionDemo("val", 8, seed=3)
    assert [train.label(i) for i in range(8)] == [0, 1, 2, 3] * 2
    assert torch.equal(train.open(5).frames, again.open(5).frames)
    assert not torch.equal(train.open(5).frames, val.open(5).frames)
    video = train.open(0)
    assert video.frames.shape == (24, 3, 32, 32) and video.frames.dtype == torch.uint8
    assert video.num_frames == 24 and torch.equal(video.read([3, 1]), video.frames[[3, 1]])
    with pytest.raises(ValueError, match="split"):
        MotionDemo("test", 8)


@pytest.mark.parametrize("index", range(8))
def test_the_shape_moves_in_the_labelled_direction(index):
    demo = MotionDemo("val", 8, seed=0)
    dy, dx = _displacement(demo.open(index).frames, lag=6)
    expected = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[MOTION_CLASSES[demo.label(index)]]
    # 6 frames at 0.75-1.5 px/frame: 4-9 px along the class direction, nothing across it
    along = dy * expected[0] + dx * expected[1]
    across = dx * expected[0] + dy * expected[1]
    assert 4 <= along <= 10 and across == 0
