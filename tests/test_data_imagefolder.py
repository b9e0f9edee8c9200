"""ImageFolder: real JPEG/PNG/BMP/WEBP files, mode conversion, and corrupt files skipped without stopping the
loader."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from swinlab.config import DataConfig
from swinlab.data import ImageFolder, build


def _save(path, mode, size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], len(mode))
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path, format=fmt)


def _tree(root):
    """train: 2 classes x 3 good images of mixed formats and modes; val: 1 image per class."""
    for split, n in (("train", 3), ("val", 1)):
        for c, cls in enumerate(("cat", "dog")):
            for i in range(n):
                ext, mode = [("png", "RGB"), ("jpg", "L"), ("png", "RGBA"), ("bmp", "RGB"), ("webp", "RGB")][
                    (i + c) % 5]  # fmt: skip
                _save(root / split / cls / f"{i}.{ext}", mode)
    return root


def _corrupt(root):
    (root / "train" / "cat" / "broken.jpg").write_bytes(os.urandom(300))
    good = root / "train" / "dog" / "0.png"
    _save(root / "train" / "dog" / "big.png", "RGB", size=(64, 64))
    data = (root / "train" / "dog" / "big.png").read_bytes()
    (root / "train" / "dog" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "train" / "dog" / "big.png").unlink()
    return good


def test_classes_sorted_and_modes_converted(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolder(root / "train")
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 10, 12)
        assert label == (0 if i < 3 else 1)
    grey = ImageFolder(root / "train", channels=1)
    assert grey[0][0].shape == (1, 10, 12) and len(grey.mean) == 1


def test_corrupt_files_warn_once_and_return_none(tmp_path):
    root = _tree(tmp_path)
    _corrupt(root)
    ds = ImageFolder(root / "train")
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.name in ("broken.jpg", "truncated.png")]
    assert len(bad) == 2
    with pytest.warns(RuntimeWarning, match="broken.jpg"):
        assert ds[bad[0]] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[bad[0]] is None  # second time: silent


def test_loader_epoch_skips_corrupt_files(tmp_path):
    root = _tree(tmp_path)
    _corrupt(root)
    cfg = DataConfig(
        name="imagefolder", root=str(root), img_size=16, batch_size=4
    )  # 8 files: no partial batch
    bundle = build(cfg, seed=0)
    assert bundle.train_size == 8 and bundle.class_names == ["cat", "dog"]
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        batches = list(bundle.train_loader)
    labels = torch.cat([y for _, y in batches])
    assert len(batches) == 2 and sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]  # every good sample, once
    assert all(x.shape[1:] == (3, 16, 16) for x, _ in batches)
    x, y = next(iter(bundle.val_loader))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 1]


def test_grayscale_imagefolder_and_errors(tmp_path):
    root = _tree(tmp_path)
    bundle = build(
        DataConfig(name="imagefolder", root=str(root), img_size=8, in_chans=1, batch_size=2), seed=0
    )
    assert bundle.in_chans == 1 and next(iter(bundle.val_loader))[0].shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"data\.root is required"):
        build(DataConfig(name="imagefolder"), seed=0)
    with pytest.raises(FileNotFoundError):
        build(DataConfig(name="imagefolder", root=str(tmp_path / "nope")), seed=0)
    (root / "val" / "bird").mkdir()
    _save(root / "val" / "bird" / "0.png", "RGB")
    with pytest.raises(ValueError, match="bird"):
        build(DataConfig(name="imagefolder", root=str(root)), seed=0)


def test_sixteen_bit_pngs_keep_their_values_or_scale_to_eight_bits(tmp_path):
    from swinlab.data.images import read_image_array

    depth = (np.arange(4 * 6).reshape(4, 6) * 2849).astype(np.uint16)  # up to 65527: a depth map in mm, say
    depth[0, 0], depth[0, 1] = 65535, 32768
    path = tmp_path / "train" / "deep" / "d.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(depth).save(path)
    raw = read_image_array(path)
    assert raw.dtype == np.uint16 and np.array_equal(raw, depth)  # the stored numbers, as stored
    image, _ = ImageFolder(tmp_path / "train", channels=1)[0]
    expected = np.round(depth / 257.0).astype(np.uint8)  # full scale to full scale, not clipped at 255
    assert torch.equal(image[0], torch.from_numpy(expected)) and image[0, 0, 1] == 128
    rgb, _ = ImageFolder(tmp_path / "train", channels=3)[0]
    assert torch.equal(rgb, torch.from_numpy(expected).expand(3, -1, -1))
    Image.fromarray(depth.astype(np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(ValueError, match=r"32-bit.*no agreed range"):
        read_image_array(tmp_path / "f.tiff")


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_eight_bit_images_read_as_pil_converts_them(tmp_path, mode):
    path = tmp_path / "train" / "c" / "x.png"
    if mode == "P":
        path.parent.mkdir(parents=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)).convert(
            "P", palette=Image.Palette.ADAPTIVE).save(path)  # fmt: skip
    else:
        _save(path, mode)
    for channels, pil_mode in ((1, "L"), (3, "RGB")):
        image, _ = ImageFolder(tmp_path / "train", channels=channels)[0]
        with Image.open(path) as img:
            expected = torch.from_numpy(np.array(img.convert(pil_mode)))
        expected = expected[None] if expected.ndim == 2 else expected.permute(2, 0, 1)
        assert torch.equal(image, expected), (mode, channels)
