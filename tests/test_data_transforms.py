"""Tensor transforms: shapes per mode, crop geometry, eval path, channels, normalisation, determinism."""

import random

import pytest
import torch

from swinlab.data.transforms import ImageTransform, random_resized_crop_box, rrc_scale


def _img(c=1, h=28, w=28):
    return torch.randint(0, 256, (c, h, w), dtype=torch.uint8)


def _tf(size=32, train=True, **kw):
    kw = {"mean": (0.5,), "std": (0.5,), "in_chans": 1, **kw}
    return ImageTransform(size, train=train, **kw)


@pytest.mark.parametrize("augment", ["standard", "light", "none"])
def test_train_modes_shape_and_dtype(augment):
    out = _tf(augment=augment)(_img(), random.Random(0))
    assert out.shape == (1, 32, 32) and out.dtype == torch.float32


def test_rrc_scale_regimes():
    assert rrc_scale(32) == (0.35, 1.0) and rrc_scale(224) == (0.08, 1.0)
    assert 0.08 < rrc_scale(96)[0] < 0.35


def test_rrc_box_inside_image_with_area_and_ratio():
    rng = random.Random(1)
    for h, w in ((28, 28), (40, 90), (300, 20)):
        for _ in range(200):
            top, left, ch, cw = random_resized_crop_box(h, w, (0.35, 1.0), rng)
            assert top >= 0 and top + ch <= h and left >= 0 and left + cw <= w and ch > 0 and cw > 0
    top, left, ch, cw = random_resized_crop_box(28, 28, (0.35, 1.0), random.Random(3))
    assert 0.3 <= ch * cw / 784 <= 1.0 and 0.6 <= cw / ch <= 1.6


def test_same_seed_same_output_and_flip_happens():
    tf, img = _tf(), _img()
    a, b = tf(img, random.Random(5)), tf(img, random.Random(5))
    assert torch.equal(a, b)
    outs = {tf(img, random.Random(s)).sum().item() for s in range(8)}
    assert len(outs) > 1
    flip = _tf(augment="none", hflip=True)  # "none" is resize only: no flip
    assert not flip.is_random


def test_eval_small_is_plain_resize_and_large_is_center_crop():
    img = torch.arange(28 * 28, dtype=torch.uint8).view(1, 28, 28) % 200
    small = _tf(28, train=False)(img)
    torch.testing.assert_close(small, img.float() / 127.5 - 1.0)
    big = _tf(128, train=False, in_chans=3, mean=(0.0,), std=(1.0,))(_img(3, 200, 300))
    assert big.shape == (3, 128, 128)
    ones = torch.full((3, 160, 240), 255, dtype=torch.uint8)
    ones[:, :, :40] = 0  # a black border band that the eval centre crop removes
    out = _tf(128, train=False, in_chans=3, mean=(0.0,), std=(1.0,))(ones)
    assert out.min().item() == pytest.approx(1.0, abs=1e-4)


def test_channels_repeat_and_errors():
    out = _tf(train=False, out_chans=3)(_img())
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[2])
    with pytest.raises(ValueError, match="cannot turn 3-channel images into 1"):
        _tf(in_chans=3, out_chans=1)
    with pytest.raises(ValueError, match="mean has 2 values"):
        _tf(mean=(0.1, 0.2), in_chans=3)
    with pytest.raises(ValueError, match="unknown augment"):
        _tf(augment="heavy")
    with pytest.raises(ValueError, match="needs rng"):
        _tf()(_img())


def test_normalisation_uses_mean_and_std():
    img = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    out = ImageTransform(8, train=False, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0), in_chans=3)(img)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
