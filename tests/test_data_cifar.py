"""CIFAR-10/100 readers on tiny pickle batches written in the official layout."""

import os
import pickle

import numpy as np
import pytest

from swinlab.config import DataConfig
from swinlab.data import CIFAR, build


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _batch(n, label_key, offset):
    data = ((np.arange(n * 3072) + offset) % 256).astype(np.uint8).reshape(n, 3072)
    return {b"batch_label": b"x", label_key.encode(): [i % 10 for i in range(n)], b"data": data,
            b"filenames": [b"f.png"] * n}  # fmt: skip


def _cifar10(parent, n=4):
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for i in range(1, 6):
        _dump(root / f"data_batch_{i}", _batch(n, "labels", i))
    _dump(root / "test_batch", _batch(n, "labels", 0))
    _dump(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072})
    return root


def _cifar100(parent, n=6):
    root = parent / "cifar-100-python"
    root.mkdir(parents=True)
    for name in ("train", "test"):
        batch = _batch(n, "fine_labels", 0)
        batch[b"coarse_labels"] = [0] * n
        _dump(root / name, batch)
    _dump(root / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                          b"coarse_label_names": [b"c"] * 20})  # fmt: skip
    return root


def test_cifar10_folder_or_parent(tmp_path):
    folder = _cifar10(tmp_path)
    for root in (folder, tmp_path):
        ds = CIFAR(root, train=True)
        assert len(ds) == 20 and ds.classes[3] == "c3" and ds.channels == 3
        image, label = ds[5]
        assert image.shape == (3, 32, 32) and label == 1
    expected = ((np.arange(3072) + 1) % 256).astype(np.uint8).reshape(3, 32, 32)
    np.testing.assert_array_equal(CIFAR(tmp_path)[0][0].numpy(), expected)  # first image of data_batch_1
    assert len(CIFAR(tmp_path, train=False)) == 4


def test_cifar100_fine_labels(tmp_path):
    _cifar100(tmp_path)
    ds = CIFAR(tmp_path, train=False, num_classes=100)
    assert len(ds) == 6 and len(ds.classes) == 100 and ds[4][1] == 4


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR(tmp_path)
    with pytest.raises(ValueError, match="10 or 100"):
        CIFAR(tmp_path, num_classes=7)
    root = _cifar10(tmp_path)
    (root / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        CIFAR(root)


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = _cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    _dump(root / "batches.meta", {b"label_names": Evil()})
    with pytest.raises(ValueError, match="refusing"):
        CIFAR(root)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_build_cifar(tmp_path, name):
    (_cifar10 if name == "cifar10" else _cifar100)(tmp_path)
    bundle = build(DataConfig(name=name, root=str(tmp_path), batch_size=4, augment="light"), seed=0)
    x, _ = next(iter(bundle.train_loader))
    assert x.shape == (4, 3, 32, 32) and bundle.in_chans == 3
    assert bundle.num_classes == (10 if name == "cifar10" else 100)
