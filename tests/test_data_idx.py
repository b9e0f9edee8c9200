"""IDX reader/writer and the Fashion-MNIST folder dataset, on tiny files written in the real format."""

import gzip
import struct

import numpy as np
import pytest
import torch

from swinlab.config import DataConfig
from swinlab.data import FashionMNIST, build, read_idx, write_idx
from swinlab.data.build import DEBIAN_FASHION_MNIST
from swinlab.data.make_embedded import balanced_interleaved, main


def _write_set(folder, n_train=20, n_test=10, gz=True, size=8):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        )
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_hand_written_header_is_read(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">I3I", 0x00000803, 2, 3, 4) + images.tobytes()
    (tmp_path / "a").write_bytes(raw)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "labels").write_bytes(struct.pack(">II", 0x00000801, 3) + bytes([7, 0, 9]))
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), [7, 0, 9])


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_round_trip(tmp_path, dtype, name):
    array = (
        (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype != np.uint8
        else np.arange(24, dtype=dtype)
    )
    write_idx(tmp_path / name, array)
    back = read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")


def test_truncated_and_oversized(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 5, 5), np.uint8))
    data = (tmp_path / "x").read_bytes()
    (tmp_path / "short").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated IDX file"):
        read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="beyond"):
        read_idx(tmp_path / "long")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_folder(tmp_path, gz):
    root = _write_set(tmp_path / "fm", gz=gz)
    ds = FashionMNIST(root, train=True)
    assert len(ds) == 20 and ds.channels == 1 and len(ds.classes) == 10
    image, label = ds[3]
    assert image.shape == (1, 8, 8) and image.dtype == torch.uint8 and label == 3
    np.testing.assert_array_equal(image[0].numpy(), read_idx(next(root.glob("train-images*")))[3])
    assert len(FashionMNIST(root, train=False)) == 10


def test_fashion_mnist_count_mismatch(tmp_path):
    root = _write_set(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match="count mismatch"):
        FashionMNIST(root)


def test_fashion_mnist_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(tmp_path)


def test_build_fashion_mnist_from_folder(tmp_path):
    root = _write_set(tmp_path / "fm")
    bundle = build(DataConfig(name="fashion_mnist", root=str(root), img_size=16, batch_size=8), seed=0)
    x, y = next(iter(bundle.train_loader))
    assert x.shape == (8, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (bundle.train_size, bundle.val_size, bundle.num_classes) == (20, 10, 10)


def test_make_embedded_tool(tmp_path):
    source = _write_set(tmp_path / "full", n_train=40, n_test=20)
    main(["--source", str(source), "--out", str(tmp_path / "out"), "--train-per-class", "3",
          "--test-per-class", "2"])  # fmt: skip
    sub = FashionMNIST(tmp_path / "out", train=True)
    full = FashionMNIST(source, train=True)
    assert len(sub) == 30 and list(sub.labels[:10]) == list(range(10))
    first_of_class_2 = np.flatnonzero(full.labels == 2)[0]
    assert (sub.images[2] == full.images[first_of_class_2]).all()
    assert len(FashionMNIST(tmp_path / "out", train=False)) == 20


def test_balanced_interleaved_needs_enough_samples():
    with pytest.raises(ValueError, match="class 1 has only"):
        balanced_interleaved(np.array([0, 0, 1]), per_class=2, num_classes=2)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_full_fashion_mnist_default_root():
    bundle = build(DataConfig(name="fashion_mnist", batch_size=16, val_limit=16), seed=0)
    assert (bundle.train_size, bundle.val_size, bundle.num_classes) == (60000, 16, 10)
    labels = bundle.train_loader.dataset.source.labels
    assert np.bincount(labels).tolist() == [6000] * 10
