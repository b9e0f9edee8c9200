"""Stochastic depth: drop a whole residual branch per sample (Huang et al. 2016)."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float = 0.0, training: bool = False, inplace: bool = False) -> torch.Tensor:
    """Zero the branch for a random ``p`` fraction of samples and rescale the rest by ``1 / (1 - p)``.

    ``inplace`` overwrites ``x``: for a branch output nothing else reads (its backward needs only the mask), it
    saves allocating a tensor the size of the activations."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
    return x.mul_(mask) if inplace else x * mask


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p, self.inplace = p, inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
