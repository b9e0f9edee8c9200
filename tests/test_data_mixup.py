"""Mixup / CutMix: soft targets, lam correction, box geometry, the disabled path."""

import pytest
import torch

from swinlab.data.mixup import Mixup, cutmix_box, smooth_one_hot


def _batch(n=6, c=2, s=16):
    return torch.randn(n, c, s, s), torch.arange(n) % 5


def test_disabled_returns_input_and_smoothed_one_hot():
    x, y = _batch()
    out, t = Mixup(0.0, 0.0, label_smoothing=0.1, num_classes=5)(x, y)
    assert out is x
    assert t[0, 0].item() == pytest.approx(0.9 + 0.02) and t[0, 1].item() == pytest.approx(0.02)
    torch.testing.assert_close(t.sum(1), torch.ones(6))


def test_mixup_targets_match_pixels():
    x, y = _batch()
    out, t = Mixup(1.0, 0.0, label_smoothing=0.0, num_classes=5)(x, y)
    torch.testing.assert_close(t.sum(1), torch.ones(6))
    lam = t[1, y[1]].item()  # sample 1 (class 1) is mixed with sample 4 (class 4)
    assert 0.0 < lam < 1.0 and t[1, y[4]].item() == pytest.approx(1 - lam)
    torch.testing.assert_close(out[1], lam * x[1] + (1 - lam) * x[4])


def test_cutmix_lam_is_the_pasted_area():
    x, y = _batch(n=4, s=20)
    for seed in range(20):
        torch.manual_seed(seed)
        out, t = Mixup(0.0, 1.0, label_smoothing=0.0, num_classes=5)(x, y)
        torch.testing.assert_close(t.sum(1), torch.ones(4))
        kept = (out[0] == x[0]).all(0).float().mean().item()  # fraction of pixels still from sample 0
        assert t[0, y[0]].item() == pytest.approx(kept, abs=1e-6)


def test_cutmix_box_inside_image():
    torch.manual_seed(0)
    for lam in (0.0, 0.1, 0.5, 0.99):
        for _ in range(50):
            y0, y1, x0, x1 = cutmix_box(17, 23, lam)
            assert 0 <= y0 <= y1 <= 17 and 0 <= x0 <= x1 <= 23


def test_switch_and_prob():
    x, y = _batch()
    never = Mixup(1.0, 1.0, prob=0.0, label_smoothing=0.0, num_classes=5)
    out, t = never(x, y)
    assert out is x and torch.equal(t, smooth_one_hot(y, 5, 0.0))
    torch.manual_seed(1)
    kinds = set()
    both = Mixup(1.0, 1.0, switch_prob=0.5, label_smoothing=0.0, num_classes=5)
    for _ in range(20):
        out, _ = both(x, y)
        kinds.add(bool((out == x).any()))  # CutMix keeps some original pixels, Mixup changes all
    assert kinds == {True, False}


def test_reproducible_under_manual_seed_and_errors():
    x, y = _batch()
    m = Mixup(0.8, 1.0, label_smoothing=0.1, num_classes=5)
    torch.manual_seed(3)
    a = m(x, y)
    torch.manual_seed(3)
    b = m(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="alphas"):
        Mixup(-1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        Mixup(label_smoothing=1.0)
    with pytest.raises(ValueError, match="expected x"):
        m(x, y[:3])
