"""Train sampler: each sample gets its own augmentation seed. Val sampler: shards without padding.

Why per-sample seeds: DataLoader workers draw their RNG state once when they start, so with persistent workers
the engine's ``torch.manual_seed(seed + epoch)`` would not reach them and a resumed run would see different
crops. Drawing one base seed from torch's global RNG when an epoch starts (in the main process) and giving the
sample at global position p of the epoch's permutation the seed ``base + p`` makes the augmentation a function
of (global seed, epoch, position) only: independent of ``num_workers``, persistent or not, and different on
every rank (rank r holds positions r, r + world_size, ...).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler, Sampler


class SeededDistributedSampler(DistributedSampler):
    """A ``DistributedSampler`` (same shuffling, ``set_epoch``) that yields ``(index, seed)`` pairs."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base = int(torch.randint(0, 2**62, ()).item())
        for k, index in enumerate(super().__iter__()):
            yield index, base + k * self.num_replicas + self.rank


class ShardSampler(Sampler[int]):
    """Indices ``rank::world_size`` in order: every sample on exactly one rank, no padding, no duplicates."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
