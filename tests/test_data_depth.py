"""Depth data (swinlab.data.depth, depth_scenes): NYUv2 file lists on generated fixtures, the procedural scenes'
exact geometry, the Middlebury pair, the ``depth`` data kind through ``data.build``, and the errors."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from swinlab.config import DataConfig
from swinlab.data import build
from swinlab.data.depth import (
    MIDDLEBURY_CALIBRATION,
    DepthTransform,
    NYUDepth,
    ProceduralDepth,
    depth_from_png,
    middlebury_motorcycle,
    read_depth_list,
)
from swinlab.data.depth_scenes import render_scene


def _write_pair(folder, name, depth_mm, rgb=None):
    """``name_rgb.png`` and a 16-bit ``name_depth.png`` (millimetres) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = depth_mm.shape
    rgb = np.full((h, w, 3), 100, np.uint8) if rgb is None else rgb
    Image.fromarray(rgb).save(folder / f"{name}_rgb.png")
    Image.fromarray(depth_mm.astype(np.uint16)).save(folder / f"{name}_depth.png")


@pytest.fixture
def nyu_root(tmp_path):
    """A tiny NYUv2 tree in the BTS / GLPDepth layout: sync/<scene>/ for training, official_splits/test/ for test."""
    rng = np.random.default_rng(0)
    lines = {"train": [], "val": []}
    for split, base in (("train", tmp_path / "sync"), ("val", tmp_path / "official_splits" / "test")):
        for i in range(3):
            depth = rng.integers(500, 9000, size=(24, 32))
            depth[0, :5] = 0  # invalid pixels stay 0
            _write_pair(base / "kitchen_0001", f"{split}{i}", depth)
            lead = "/" if split == "train" else ""  # BTS's training list starts paths with '/', its test list not
            lines[split].append(
                f"{lead}kitchen_0001/{split}{i}_rgb.png {lead}kitchen_0001/{split}{i}_depth.png 518.8579"
            )
    (tmp_path / "train_list.txt").write_text("\n".join(lines["train"]) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(lines["val"]) + "\n\n")
    return tmp_path


def test_depth_png_is_read_in_metres(tmp_path):
    depth = np.array([[0, 1, 1000], [1234, 65535, 9999]])
    _write_pair(tmp_path, "a", depth)
    got = depth_from_png(tmp_path / "a_depth.png")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, depth.astype(np.float32) / 1000)


def test_file_list_resolves_the_bts_layout(nyu_root):
    train = read_depth_list(nyu_root / "train_list.txt", nyu_root, "train")
    val = read_depth_list(nyu_root / "test_list.txt", nyu_root, "val")
    assert len(train) == len(val) == 3
    assert train[0].rgb == nyu_root / "sync" / "kitchen_0001" / "train0_rgb.png"
    assert val[2].depth == nyu_root / "official_splits" / "test" / "kitchen_0001" / "val2_depth.png"
    assert train[0].focal == pytest.approx(518.8579)
    rgb, depth = NYUDepth(nyu_root / "test_list.txt", nyu_root, "val")[1]
    assert rgb.shape == (3, 24, 32) and rgb.dtype == torch.uint8
    assert depth.shape == (1, 24, 32) and depth.dtype == torch.float32
    assert (depth[0, 0, :5] == 0).all() and depth.max() < 9.0


def test_nyu_depth_through_build(nyu_root):
    cfg = DataConfig(
        name="nyu_depth", root=str(nyu_root), train_list="train_list.txt", val_list="test_list.txt", img_size=16,
        batch_size=2,
    )  # fmt: skip
    bundle = build(cfg, seed=0)
    assert bundle.kind == "depth" and bundle.describe() == "3 train / 3 val depth maps"
    image, depth = next(iter(bundle.train_loader))
    assert image.shape == (2, 3, 16, 16) and depth.shape == (2, 1, 16, 16)
    image, depth = next(iter(bundle.val_loader))
    assert image.shape == (2, 3, 24, 32) and depth.shape == (2, 1, 24, 32)  # whole frames for evaluation
    expected = depth_from_png(nyu_root / "official_splits/test/kitchen_0001/val0_depth.png")
    np.testing.assert_array_equal(depth[0, 0].numpy(), expected)
    scaled = build(DataConfig(**{**cfg.__dict__, "scale_size": 12}), seed=0)
    assert next(iter(scaled.val_loader))[1].shape == (2, 1, 12, 16)


def test_nyu_errors_name_the_problem(nyu_root):
    def entry(line):
        (nyu_root / "bad.txt").write_text(line + "\n")
        return read_depth_list(nyu_root / "bad.txt", nyu_root)

    with pytest.raises(ValueError, match=r"bad.txt:1: expected 'rgb_path depth_path focal'"):
        entry("kitchen_0001/train0_rgb.png kitchen_0001/train0_depth.png")
    with pytest.raises(ValueError, match=r"bad.txt:1: focal 'f' is not a number"):
        entry("kitchen_0001/train0_rgb.png kitchen_0001/train0_depth.png f")
    with pytest.raises(FileNotFoundError, match=r"bad.txt:1: image not found \(tried .*sync/nope.png"):
        entry("nope.png nope_depth.png 1")
    with pytest.raises(ValueError, match=r"needs data.root .* data.train_list / data.val_list"):
        build(DataConfig(name="nyu_depth", root=str(nyu_root)), seed=0)

    folder = nyu_root / "sync" / "bad"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(folder.parent / "kitchen_0001" / "eight_bit.png")
    _write_pair(folder, "zero", np.zeros((4, 4)))
    _write_pair(folder, "small", np.ones((4, 4)), rgb=np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"eight_bit.png: a depth map must be a 16-bit PNG in millimetres"):
        entry("kitchen_0001/train0_rgb.png kitchen_0001/eight_bit.png 1")
        NYUDepth(nyu_root / "bad.txt", nyu_root)[0]
    with pytest.raises(ValueError, match=r"zero_depth.png: the depth map has no valid pixel"):
        entry("bad/zero_rgb.png bad/zero_depth.png 1")
        NYUDepth(nyu_root / "bad.txt", nyu_root)[0]
    with pytest.raises(ValueError, match=r"small_depth.png: image \(5, 4\) and depth \(4, 4\) differ in size"):
        entry("bad/small_rgb.png bad/small_depth.png 1")
        NYUDepth(nyu_root / "bad.txt", nyu_root)[0]


def test_procedural_scenes_are_exact_and_deterministic():
    scene = render_scene((24, 32), seed=3, index=5)
    again = render_scene((24, 32), seed=3, index=5)
    other = render_scene((24, 32), seed=3, index=6)
    np.testing.assert_array_equal(scene.depth, again.depth)
    np.testing.assert_array_equal(scene.rgb, again.rgb)
    assert not np.array_equal(scene.depth, other.depth)
    assert scene.depth.dtype == np.float32 and scene.rgb.shape == (24, 32, 3)
    assert scene.depth.min() > 0.5 and scene.depth.max() < 10.0
    objects = np.unique(scene.instances)
    assert objects[0] == 0 and 2 <= len(objects) - 1 <= 5
    # every room pixel, lifted to 3D from its depth, lies on one of the five room planes
    h, w = scene.depth.shape
    focal = 0.5 * w / np.tan(np.radians(60.0) / 2)
    v, u = np.mgrid[0:h, 0:w] + 0.5
    rays = np.stack([(u - w / 2) / focal, (v - h / 2) / focal, np.ones((h, w))], -1)
    points = (rays * scene.depth[..., None].astype(np.float64)) @ scene.rotation.T
    room = scene.room
    planes = np.stack(
        [
            np.abs(np.abs(points[..., 0]) - room["half_width"]),
            np.abs(points[..., 1] - room["floor"]),
            np.abs(points[..., 1] + room["ceiling"]),
            np.abs(points[..., 2] - room["back"]),
        ]
    ).min(0)
    assert planes[scene.instances == 0].max() < 1e-5  # float32 depth rounding only
    # objects sit in front of the room: away from every plane
    assert planes[scene.instances > 0].max() > 0.05


def test_procedural_depth_through_build():
    cfg = DataConfig(name="procedural_depth", img_size=32, batch_size=4, train_limit=8, val_limit=4, hflip=False)
    bundle = build(cfg, seed=1)
    assert (bundle.train_size, bundle.val_size, bundle.kind) == (8, 4, "depth")
    image, depth = next(iter(bundle.val_loader))
    assert image.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(depth[2, 0].numpy(), render_scene(32, 1, 2).depth)  # the validation stream
    mean = torch.tensor(bundle.mean).view(3, 1, 1)
    std = torch.tensor(bundle.std).view(3, 1, 1)
    rgb = (image[2] * std + mean) * 255
    torch.testing.assert_close(rgb, torch.from_numpy(render_scene(32, 1, 2).rgb).permute(2, 0, 1).float(), atol=1e-3,
                               rtol=0)  # fmt: skip
    kept, fresh = ProceduralDepth(4, 32, 1), ProceduralDepth(4, 32, 1, cache_bytes=0)
    assert kept[2][1] is kept[2][1] and fresh[2][1] is not fresh[2][1]  # small sets keep their rendered scenes
    assert torch.equal(kept[2][1], depth[2]) and torch.equal(fresh[2][0], kept[2][0])
    other_seed = build(cfg, seed=2)  # the run seed changes the crops and the order, not the scenes
    assert torch.equal(next(iter(other_seed.val_loader))[1], depth)
    train_maps = torch.cat(
        [batch[1] for batch in build(DataConfig(**{**cfg.__dict__, "hflip": False}), seed=5).train_loader]
    )
    expected = {render_scene(32, 0, i).depth.tobytes() for i in range(8)}
    assert {m[0].numpy().tobytes() for m in train_maps} == expected


def test_transform_crops_and_flips_image_and_depth_together():
    import random

    rgb = torch.arange(3 * 6 * 8, dtype=torch.uint8).view(3, 6, 8)
    depth = torch.arange(1, 49, dtype=torch.float32).view(1, 6, 8)
    t = DepthTransform(4, train=True, mean=(0, 0, 0), std=(1, 1, 1))
    for seed in range(8):
        image, crop = t(rgb, depth, random.Random(seed))
        assert crop.shape == (1, 4, 4)
        # depth value k sits at flat position k - 1 of the 6x8 grid, and the image's channel 0 holds that position
        torch.testing.assert_close(image[0] * 255, crop[0] - 1)
    with pytest.raises(ValueError, match="cannot crop 8 px from a 6x8 depth frame"):
        DepthTransform(8, train=True, mean=(0, 0, 0), std=(1, 1, 1))(rgb, depth, random.Random(0))


def test_middlebury_pair_gives_metric_depth():
    pytest.importorskip("skimage")
    from skimage.data import stereo_motorcycle

    rgb, depth = middlebury_motorcycle()
    disparity = stereo_motorcycle()[2]
    assert rgb.shape == (500, 741, 3) and depth.shape == (500, 741)
    c = MIDDLEBURY_CALIBRATION
    row, col = (int(i) for i in np.argwhere(np.isfinite(disparity))[len(disparity) * 300])
    assert depth[row, col] == pytest.approx(c["focal_px"] * c["baseline_m"] / (disparity[row, col] + c["doffs_px"]))
    assert (depth[~np.isfinite(disparity)] == 0).all()
    valid = depth[depth > 0]
    assert valid.min() > 1.0 and valid.max() < 10.0  # an indoor scene a few metres deep
    bundle = build(DataConfig(name="middlebury_motorcycle", img_size=64, scale_size=128, batch_size=2), seed=0)
    assert bundle.val_size == 4  # 128 x 190 frame: 2 x 2 whole tiles of 64


def test_middlebury_without_scikit_image_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(ImportError, match=r"needs scikit-image: pip install 'swinlab\[depth\]'"):
        middlebury_motorcycle()
