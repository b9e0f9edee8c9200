"""From a reader (uint8 CHW samples) to a DataLoader: transform, first-N limit, ``None``-skipping collate."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from swinlab.data.transforms import ImageTransform


class TransformedDataset(Dataset):
    """``source[i]`` -> ``(float image, label)``, or ``None`` if unreadable; only the first ``limit`` samples.

    Keys are indices, or ``(index, seed)`` pairs from ``SeededDistributedSampler`` for random transforms; a
    bare index with a random transform draws its seed from torch's global RNG.
    """

    def __init__(self, source: Dataset, transform: ImageTransform, limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError(f"a sample limit must be >= 1, got {limit}")
        self.source = source
        self.transform = transform
        self.size = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        sample = self.source[index % self.size]
        if sample is None:
            return None
        image, label = sample
        rng = None
        if self.transform.is_random:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        return self.transform(image, rng), label


class SeededSubset(Dataset):
    """``dataset`` restricted to ``indices``, passing ``(index, seed)`` keys through (``torch.utils.data.Subset``
    would index its list with the pair)."""

    def __init__(self, dataset: Dataset, indices: range) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):
        if isinstance(key, tuple):
            index, seed = key
            return self.dataset[(self.indices[index], seed)]
        return self.dataset[self.indices[key]]


def collate_skip_none(
    batch: list[tuple[torch.Tensor, int] | None], sample_shape: tuple[int, ...] = (0,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the readable samples; a batch with none left is an empty ``(0, *sample_shape)`` batch."""
    kept = [s for s in batch if s is not None]
    if not kept:
        return torch.empty(0, *sample_shape), torch.empty(0, dtype=torch.int64)
    return torch.stack([s[0] for s in kept]), torch.tensor([s[1] for s in kept], dtype=torch.int64)
