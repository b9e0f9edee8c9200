"""Corrupted depth labels (swinlab.data.depth.punch_holes, DepthHoles, a config's ``depth_holes``): the share of
zeroed pixels, determinism per (seed, index), training labels only, and the range check."""

import pytest
import torch

from swinlab.config import ConfigError, DataConfig
from swinlab.data.depth import HOLES_STREAM, DepthHoles, ProceduralDepth, depth_sets, punch_holes


def test_holes_cover_the_share_and_repeat_per_sample():
    depth = 1.0 + torch.rand(1, 48, 64)
    holey = punch_holes(depth, 0.3, seed=2, index=7)
    share = float((holey == 0).float().mean())
    assert 0.3 <= share < 0.3 + (48 / 4) * (64 / 4) / (48 * 64)  # at most one largest rectangle over the share
    assert torch.equal(holey, punch_holes(depth, 0.3, seed=2, index=7))
    assert not torch.equal(holey == 0, punch_holes(depth, 0.3, seed=2, index=8) == 0)
    assert not torch.equal(holey == 0, punch_holes(depth, 0.3, seed=3, index=7) == 0)
    kept = holey > 0
    assert torch.equal(holey[kept], depth[kept]) and depth.min() > 0  # the input itself is untouched
    assert torch.equal(punch_holes(depth, 0.0, 2, 7), depth)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_hole_share_is_checked(fraction):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        punch_holes(torch.ones(1, 8, 8), fraction, 0, 0)
    with pytest.raises(ValueError, match=r"data\.depth_holes"):
        DepthHoles(ProceduralDepth(2, 16, 0), fraction)


def test_only_training_labels_get_holes():
    base = {"name": "procedural_depth", "img_size": 32, "train_limit": 4, "val_limit": 2, "hflip": False}
    clean_train, clean_val = depth_sets(DataConfig(**base))
    train, val = depth_sets(DataConfig(**base, depth_holes=0.2))
    for i in range(4):
        image, depth = train[(i, 0)]
        clean_image, clean = clean_train[(i, 0)]
        assert torch.equal(image, clean_image)
        assert torch.equal(depth, punch_holes(clean, 0.2, HOLES_STREAM, i))
        assert float((depth == 0).float().mean()) >= 0.2
    assert all(torch.equal(val[i][1], clean_val[i][1]) and (val[i][1] > 0).all() for i in range(2))


def test_depth_holes_is_a_checked_config_key():
    from swinlab.recipe import load_config

    cfg = load_config(None, ["data.name=procedural_depth", "data.depth_holes=0.25"])
    assert cfg.data.depth_holes == 0.25
    with pytest.raises(ConfigError, match="depth_holes"):
        load_config(None, ["data.depth_holes=1.0"])
