"""CIFAR-10 / CIFAR-100 from the official python pickle batches (cifar-10-batches-py, cifar-100-python).

The batches are pickles, and unpickling can run arbitrary code; ``_SafeUnpickler`` therefore only rebuilds
numpy arrays and plain containers, so a tampered file fails with a clear error instead of executing anything.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from swinlab.data.memory import ArrayDataset

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3's pickle protocol 2 stores bytes
}

# name -> (folder, train files, test file, meta file, label key, class-names key)
_LAYOUTS = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
         "labels", "label_names"),
    100: ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}  # fmt: skip


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch (only numpy arrays)")


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file not found: {path}")
    with open(path, "rb") as f:
        try:
            raw = _SafeUnpickler(f, encoding="bytes").load()
        except Exception as e:  # a damaged pickle can fail in many ways; report them all the same way
            raise ValueError(f"{path}: not a readable CIFAR pickle batch: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict in a CIFAR batch, got {type(raw).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _key(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(f"{path}: missing key {key!r} (found {sorted(batch)})")
    return batch[key]


def _resolve(root: Path, folder: str, meta_file: str) -> Path:
    """Accept the extracted folder itself or its parent."""
    for candidate in (root, root / folder):
        if (candidate / meta_file).is_file():
            return candidate
    raise FileNotFoundError(f"no {folder} found at {root} (pass the extracted folder or the folder that holds it)")


class CIFAR(ArrayDataset):
    """CIFAR-10 (num_classes=10) or CIFAR-100 (fine labels) in memory as one uint8 (N, 3, 32, 32) array."""

    def __init__(self, root: str | Path, train: bool = True, num_classes: int = 10) -> None:
        if num_classes not in _LAYOUTS:
            raise ValueError(f"CIFAR num_classes must be 10 or 100, got {num_classes!r}")
        folder, train_files, test_file, meta_file, label_key, names_key = _LAYOUTS[num_classes]
        root = _resolve(Path(root), folder, meta_file)
        names = _key(_load(root / meta_file), names_key, root / meta_file)
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        images, labels = [], []
        for name in train_files if train else [test_file]:
            batch = _load(root / name)
            data = np.asarray(_key(batch, "data", root / name))
            target = np.asarray(_key(batch, label_key, root / name))
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(
                    f"{root / name}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}"
                )
            if len(data) != len(target):
                raise ValueError(f"{root / name}: count mismatch: {len(data)} images, {len(target)} labels")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(target)
        super().__init__(np.concatenate(images), np.concatenate(labels), classes)
        self.mean, self.std = _STATS[num_classes]


_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
