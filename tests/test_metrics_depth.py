"""Depth metrics (swinlab.metrics.depth) against values worked out by hand from their definitions."""

import math

import pytest
import torch

from swinlab.metrics.depth import DEPTH_METRICS, depth_metrics, eigen_crop_box, mean_depth_metrics, valid_mask

# One 2x2 image: ground truth 1, 2, 4 m and an invalid pixel (0); predictions 1.5, 2, 4.4 and anything there.
GT = torch.tensor([[1.0, 2.0], [4.0, 0.0]], dtype=torch.float64)
PRED = torch.tensor([[1.5, 2.0], [4.4, 7.0]], dtype=torch.float64)


def _hand() -> dict[str, float]:
    """The metrics of PRED vs GT on the three valid pixels, written out term by term."""
    g = [math.log(1.5), 0.0, math.log(1.1)]
    mean_g2 = sum(x * x for x in g) / 3
    return {
        "d1": 2 / 3,  # ratios 1.5, 1.0, 1.1: only 1.5 is >= 1.25
        "d2": 1.0,
        "d3": 1.0,
        "abs_rel": (0.5 / 1 + 0 + 0.4 / 4) / 3,
        "sq_rel": (0.25 / 1 + 0 + 0.16 / 4) / 3,
        "rmse": math.sqrt((0.25 + 0 + 0.16) / 3),
        "rmse_log": math.sqrt(mean_g2),
        "log10": (math.log10(1.5) + math.log10(1.1)) / 3,
        "silog": math.sqrt(mean_g2 - 0.5 * (sum(g) / 3) ** 2),
    }


def test_one_image_matches_hand_computed_values():
    got = depth_metrics(PRED, GT)
    assert tuple(got) == DEPTH_METRICS
    for name, value in _hand().items():
        assert got[name].shape == (1,)
        assert got[name].item() == pytest.approx(value, rel=1e-12), name


def test_layouts_agree_and_float32_stays_close():
    b11 = depth_metrics(PRED.view(1, 1, 2, 2), GT.view(1, 1, 2, 2))
    f32 = depth_metrics(PRED.float(), GT.float())
    for name, value in _hand().items():
        assert b11[name].item() == pytest.approx(value, rel=1e-12)
        assert f32[name].dtype == torch.float32
        assert f32[name].item() == pytest.approx(value, rel=1e-6)


def test_mean_is_over_images_not_pixels():
    # image 0: one valid pixel off by 1 m (rmse 1); image 1: 3 exact pixels and one off by 4 m (rmse
    # sqrt(16 / 4) = 2). Pooled over the 5 pixels the rmse would be sqrt(17 / 5) = 1.844; per image, then mean: 1.5.
    gt = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[3.0, 3.0], [3.0, 5.0]]])
    pred = torch.tensor([[[3.0, 9.0], [9.0, 9.0]], [[3.0, 3.0], [3.0, 9.0]]])
    assert depth_metrics(pred, gt)["rmse"].tolist() == pytest.approx([1.0, 2.0])
    assert mean_depth_metrics(pred, gt)["rmse"] == pytest.approx(1.5)


def test_range_limits_are_strict_and_configurable():
    gt = torch.tensor([[1e-3, 10.0, 2.0, 12.0]])
    pred = torch.tensor([[5.0, 5.0, 2.0, 12.0]])
    assert valid_mask(gt).tolist() == [[[False, False, True, False]]]
    assert depth_metrics(pred, gt)["rmse"].item() == 0.0  # only the 2 m pixel counts
    wide = depth_metrics(pred, gt, min_depth=0.0, max_depth=20.0)["rmse"].item()
    assert wide == pytest.approx(math.sqrt((5 - 1e-3) ** 2 / 4 + 25 / 4))


def test_inf_and_nan_predictions_are_replaced_as_officially():
    gt = torch.tensor([[9.0, 1.0]])
    pred = torch.tensor([[float("inf"), float("nan")]])
    got = depth_metrics(pred, gt)
    # inf -> 10 (error 1), nan -> 1e-3 (error 0.999)
    assert got["rmse"].item() == pytest.approx(math.sqrt((1.0 + 0.999**2) / 2), rel=1e-6)
    minus = depth_metrics(torch.tensor([[-float("inf"), 1.0]]), gt)
    assert minus["abs_rel"].item() == pytest.approx((1 / 9) / 2, rel=1e-6)  # -inf -> 10 as well


def test_eigen_crop_is_the_official_box_on_480x640():
    assert eigen_crop_box(480, 640) == (45, 471, 41, 601)
    assert eigen_crop_box(240, 320) == (22, 236, 20, 300)  # scaled (rounded) on other sizes
    gt = torch.full((1, 480, 640), 2.0)
    pred = gt.clone()
    pred[0, :45] = 4.0  # wrong only outside the crop: rows 0..44, row 471 on, columns < 41 and >= 601
    pred[0, 471:] = 4.0
    pred[0, :, :41] = 4.0
    pred[0, :, 601:] = 4.0
    assert depth_metrics(pred, gt, crop="eigen")["rmse"].item() == 0.0
    assert depth_metrics(pred, gt)["rmse"].item() > 0.5
    inside = pred.clone()
    inside[0, 45, 41] = inside[0, 470, 600] = 4.0  # the crop's corners are in it
    expected = math.sqrt(2 * 4.0 / (426 * 560))
    assert depth_metrics(inside, gt, crop="eigen")["rmse"].item() == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="image 1 of the batch has no valid pixel"):
        depth_metrics(torch.ones(2, 4, 4), torch.cat([torch.ones(1, 4, 4), torch.zeros(1, 4, 4)]))
    with pytest.raises(ValueError, match="differs from ground-truth shape"):
        depth_metrics(torch.ones(1, 4, 4), torch.ones(1, 4, 5))
    with pytest.raises(TypeError, match="floating-point"):
        depth_metrics(torch.ones(1, 4, 4), torch.ones(1, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be \\(B, 1, H, W\\)"):
        depth_metrics(torch.ones(1, 2, 4, 4), torch.ones(1, 2, 4, 4))
    with pytest.raises(ValueError, match="crop must be None or 'eigen'"):
        depth_metrics(torch.ones(1, 4, 4), torch.ones(1, 4, 4), crop="garg")
    with pytest.raises(ValueError, match="below max_depth"):
        depth_metrics(torch.ones(1, 4, 4), torch.ones(1, 4, 4), min_depth=5, max_depth=1)
