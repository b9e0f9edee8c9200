"""In-memory image sets (IDX, CIFAR): one uint8 (N, C, H, W) array; samples are views, never copies."""

from __future__ import annotations

import numpy as np
import torch


class ArrayDataset(torch.utils.data.Dataset):
    """Samples are ``(uint8 CHW tensor, int label)``; subclasses set ``mean`` / ``std`` for normalising."""

    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be a uint8 (N, C, H, W) array, got {images.dtype} {images.shape}")
        labels = np.asarray(labels, dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"labels span [{labels.min()}, {labels.max()}] but there are {len(classes)} classes")
        self.images = torch.from_numpy(images)
        self.labels = labels
        self.classes = list(classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
