"""Patch embedding and patch merging for channels-last token grids ``(B, *grid, C)``, 2D or 3D."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.layers.linear import Linear

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}


def pad_to_multiple(x: torch.Tensor, multiple: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the trailing ``len(multiple)`` dims of ``x`` at their end up to multiples of ``multiple``."""
    pads: list[int] = []
    for size, m in zip(reversed(x.shape[-len(multiple) :]), reversed(multiple), strict=True):
        pads += [0, -size % m]
    return F.pad(x, pads) if any(pads) else x


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: ``(B, C_in, *size)`` -> ``(B, *grid, embed_dim)``.

    Inputs whose size is not a multiple of the patch are zero-padded at the end (bottom/right) rather than
    rejected, as the official detection and video code does. Key names ``proj`` / ``norm`` as official.
    """

    def __init__(
        self,
        patch_size: tuple[int, ...] = (4, 4),
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: type[nn.Module] | None = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_chans = in_chans
        self.proj = _CONV[len(self.patch_size)](
            in_chans, embed_dim, kernel_size=patch_size, stride=patch_size
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(pad_to_multiple(x, self.patch_size))
        return self.norm(x.movedim(1, -1))


def merge_2x2(x: torch.Tensor) -> torch.Tensor:
    """Gather each 2x2 neighbourhood of the last two spatial axes into channels: ``(..., H, W, C)`` -> ``(...,
    ceil(H/2), ceil(W/2), 4C)``, odd sides zero-padded at the end.

    Channel order is the official one: (even row, even col), (odd row, even col), (even row, odd col), (odd
    row, odd col).
    """
    h, w = x.shape[-3:-1]
    if h % 2 or w % 2:
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
    *lead, h, w, c = x.shape
    # (..., H/2, r, W/2, c, C) -> (..., H/2, W/2, c, r, C): one copy; its backward is one copy too, where
    # concatenating four strided slices would zero-fill a full-size gradient per slice
    x = x.reshape(*lead, h // 2, 2, w // 2, 2, c).movedim(-4, -2)
    return x.reshape(*lead, h // 2, w // 2, 4 * c)


class PatchMergingV2(nn.Module):
    """Swin V2 downsampling: ``merge_2x2 -> Linear(4C, 2C, no bias) -> LayerNorm(2C)`` (post-norm)."""

    def __init__(
        self, dim: int, out_dim: int | None = None, norm_layer: type[nn.Module] = nn.LayerNorm
    ) -> None:
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.reduction = Linear(4 * dim, self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.reduction(merge_2x2(x)))


class PatchMerging(nn.Module):
    """Swin V1 / Video Swin downsampling: ``merge_2x2 -> LayerNorm(4C) -> Linear(4C, 2C, no bias)``
    (pre-norm).

    Only the last two spatial axes are halved, so a 3D ``(B, T, H, W, C)`` grid keeps its time axis.
    """

    def __init__(
        self, dim: int, out_dim: int | None = None, norm_layer: type[nn.Module] = nn.LayerNorm
    ) -> None:
        super().__init__()
        self.out_dim = out_dim or 2 * dim
        self.norm = norm_layer(4 * dim)
        self.reduction = Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduction(self.norm(merge_2x2(x)))
