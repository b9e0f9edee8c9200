"""Shifted-window bookkeeping for tokens laid out as ``(B, *grid, C)``, written once for any rank (2D images,
3D video).

Everything here depends only on the geometry (grid size, window, shift) and never on learned weights, so the
index tables and masks are cached per ``(geometry, device)`` and shared by every block that sees the same
input size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F

MASK_VALUE = -100.0
"""Added to the logits of key tokens a query must not see; the official value (not ``-inf``)."""

Size = tuple[int, ...]
_F = TypeVar("_F", bound=Callable)


def geometry_cache(fn: _F) -> _F:
    """Memoise a builder of constant tensors (indices, masks, coordinate tables) per hashable arguments.

    The tensors are built outside inference mode: a table first built under ``torch.inference_mode()`` would
    otherwise be an inference tensor, and a later training step that saves it for backward would fail.
    Callers must not modify the returned tensors.

    Under ``torch.compile`` a cache hit is a plain dictionary lookup that dynamo traces, so the table enters
    the graph as an input (no graph break, no constant folding); only a miss runs the builder eagerly (a
    graph break, and recompilations as the cache grows), so a compiled model should build the tables of an
    input size before tracing its blocks (``SwinTransformerV2`` does). Tracing the builder itself, or baking its result
    in as a constant, makes inductor fuse long index arithmetic into the kernels, which torch 2.13 fails to
    simplify for some sizes (sympy "'StrictLessThan' object has no attribute 'diff'").
    """
    cache: dict = {}

    @torch.compiler.disable
    def build(*args):
        if len(cache) >= 64:
            cache.clear()
        with torch.inference_mode(False), torch.no_grad():
            cache[args] = table = fn(*args)
        return table

    @functools.wraps(fn)
    def cached(*args):
        return cache[args] if args in cache else build(*args)

    return cached  # type: ignore[return-value]


def window_partition(x: torch.Tensor, window: Size) -> torch.Tensor:
    """Split ``(B, *grid, C)`` into windows: ``(B, num_windows, prod(window), C)``, windows in raster order.

    Each grid side must be a multiple of the window side (pad first).
    """
    batch, *grid, channels = x.shape
    if len(grid) != len(window) or any(g % w for g, w in zip(grid, window, strict=True)):
        raise ValueError(f"grid {tuple(grid)} is not a multiple of window {tuple(window)}")
    rank = len(window)
    split = [d for g, w in zip(grid, window, strict=True) for d in (g // w, w)]
    x = x.reshape(batch, *split, channels)
    # (B, n0, w0, n1, w1, ..., C) -> (B, n0, n1, ..., w0, w1, ..., C)
    order = [0, *range(1, 2 * rank, 2), *range(2, 2 * rank + 1, 2), 2 * rank + 1]
    return x.permute(order).reshape(batch, -1, math.prod(window), channels)


def window_reverse(windows: torch.Tensor, window: Size, grid: Size) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, num_windows, N, C)`` -> ``(B, *grid, C)``."""
    batch, channels, rank = windows.shape[0], windows.shape[-1], len(window)
    counts = [g // w for g, w in zip(grid, window, strict=True)]
    x = windows.reshape(batch, *counts, *window, channels)
    order = [0, *(d for i in range(rank) for d in (1 + i, 1 + rank + i)), 2 * rank + 1]
    return x.permute(order).reshape(batch, *grid, channels)


def clamp_window(grid: Size, window: Size, shift: Size, *, per_axis: bool) -> tuple[Size, Size]:
    """The official rule for feature maps not larger than the window.

    Swin V2 (``per_axis=False``): if the smallest side is <= the window, the window becomes a square of that
    side and the shift is dropped. Video Swin (``per_axis=True``): each axis that is <= its window uses its
    own size and no shift.
    """
    if per_axis:
        clamped = [(g, 0) if g <= w else (w, s) for g, w, s in zip(grid, window, shift, strict=True)]
        return tuple(w for w, _ in clamped), tuple(s for _, s in clamped)
    if min(grid) <= min(window):
        return (min(grid),) * len(grid), (0,) * len(grid)
    return tuple(window), tuple(shift)


@dataclass(frozen=True)
class WindowGeometry:
    """Where a block's windows fall on a grid: padded at the end of each axis to a window multiple, then
    rolled. ``pad_mask``: whether :func:`window_mask` keeps real tokens from attending to the padding."""

    grid: Size
    window: Size
    shift: Size
    pad_mask: bool = True

    @property
    def padded(self) -> Size:
        return tuple(-(-g // w) * w for g, w in zip(self.grid, self.window, strict=True))

    @property
    def needs_padding(self) -> bool:
        return self.padded != self.grid

    @property
    def needs_mask(self) -> bool:
        return (self.pad_mask and self.needs_padding) or any(self.shift)

    @property
    def num_windows(self) -> int:
        return math.prod(p // w for p, w in zip(self.padded, self.window, strict=True))


def window_geometry(
    grid: Size, window: Size, shift: Size, *, per_axis: bool = False, pad_mask: bool = True
) -> WindowGeometry:
    """The geometry a block with this configured window/shift uses on ``grid`` (after :func:`clamp_window`)."""
    window, shift = clamp_window(tuple(grid), tuple(window), tuple(shift), per_axis=per_axis)
    return WindowGeometry(tuple(grid), window, shift, pad_mask)


def _rolled_grid_map(geom: WindowGeometry, values: torch.Tensor) -> torch.Tensor:
    """Roll a per-position map of the padded grid by ``-shift`` and partition it: ``(num_windows, N)``."""
    if any(geom.shift):
        values = torch.roll(values, [-s for s in geom.shift], dims=tuple(range(len(geom.shift))))
    return window_partition(values[None, ..., None], geom.window)[0, ..., 0]


@geometry_cache
def window_token_index(geom: WindowGeometry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat gather indices that do pad + roll + partition (and the inverse) in one ``index_select`` each.

    ``gather`` (num_windows*N,) indexes the flattened grid with one extra zero token appended at position
    ``prod(grid)`` (used for padding); ``scatter`` (prod(grid),) gives each real token's position in window
    order.
    """
    numel = math.prod(geom.grid)
    source = torch.full(geom.padded, numel, dtype=torch.long)
    source[tuple(slice(0, g) for g in geom.grid)] = torch.arange(numel).view(geom.grid)
    gather = _rolled_grid_map(geom, source).flatten()
    real = gather < numel
    scatter = torch.empty(numel, dtype=torch.long)
    scatter[gather[real]] = torch.arange(gather.numel())[real]
    return gather.to(device), scatter.to(device)


@geometry_cache
def window_mask(geom: WindowGeometry, device: torch.device) -> torch.Tensor | None:
    """Additive mask ``(num_windows, N, N)`` (0 or :data:`MASK_VALUE`), or ``None`` when nothing needs
    masking.

    Region ids follow the official construction (three slices per shifted axis of the padded grid, the mask
    keeps a query and a key only if their ids agree), so without padding the result equals the official
    ``attn_mask`` buffer. With ``geom.pad_mask`` padding tokens get a region of their own, so real tokens never
    attend to them and results do not depend on padding; without it the padding tokens are ordinary keys, as in
    the official Video Swin (``compute_mask`` on the padded size).
    """
    if not geom.needs_mask:
        return None
    ids = torch.zeros(geom.padded, dtype=torch.long)
    for axis, (size, win, sft) in enumerate(zip(geom.padded, geom.window, geom.shift, strict=True)):
        pos = torch.arange(size)
        # slices [0, size - win), [size - win, size - sft), [size - sft, size) -> ids 0, 1, 2
        region = (pos >= size - win).long() + (pos >= size - sft).long() if sft else torch.zeros_like(pos)
        ids = ids * 3 + region.view([-1 if a == axis else 1 for a in range(len(geom.padded))])
    ids = torch.roll(ids, list(geom.shift), dims=tuple(range(len(geom.shift))))
    if geom.pad_mask:
        # Padding is marked in the un-rolled frame; rolling the id map below moves it with the features.
        pad = torch.zeros(geom.padded, dtype=torch.bool)
        for axis, g in enumerate(geom.grid):
            pad.narrow(axis, g, geom.padded[axis] - g).fill_(True)
        ids = ids.masked_fill(pad, -1)
    ids = _rolled_grid_map(geom, ids)
    mask = (ids[:, :, None] != ids[:, None, :]).float() * MASK_VALUE
    return mask.to(device)


def to_windows(x: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """``(B, *grid, C)`` -> ``(B, num_windows, N, C)``: pad at the end, roll by ``-shift``, partition (one
    gather)."""
    gather, _ = window_token_index(geom, x.device)
    flat = x.flatten(1, -2)
    if geom.needs_padding:
        flat = F.pad(flat, (0, 0, 0, 1))
    windows = flat.index_select(1, gather)
    return windows.view(x.shape[0], -1, math.prod(geom.window), x.shape[-1])


def from_windows(windows: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """Inverse of :func:`to_windows`: un-roll, crop the padding, ``(B, *grid, C)``."""
    _, scatter = window_token_index(geom, windows.device)
    flat = windows.flatten(1, 2).index_select(1, scatter)
    return flat.view(windows.shape[0], *geom.grid, windows.shape[-1])
