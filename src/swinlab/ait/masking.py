"""Mask augmentation of AiT's depth tokenizer: random square cells of the encoder's input are zeroed (= marked
invalid) while the loss is taken on the full label, so the tokenizer learns to in-paint holes and the ids it gives
for ground truth with sensor holes describe a completed depth map.

The official recipe (``vae/dataset/nyudepthv2.py``) zeroes ``ceil(0.5 · cells)`` of the 16x16-pixel cells per
image, drawn uniformly without replacement from numpy's global RNG; here one call masks a whole batch with each
image drawn independently, from a ``torch.Generator`` when given.
"""

from __future__ import annotations

import math

import torch


def mask_patches(
    x: torch.Tensor, ratio: float = 0.5, patch: int = 16, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero ``ceil(ratio · cells)`` random ``patch x patch`` cells of each image of ``x`` (B, C, H, W).

    Returns ``(masked, keep)``: ``masked = x · keep`` and ``keep`` (B, 1, H, W) in ``x``'s dtype, 1 where the
    pixel was kept. Feed ``masked`` to the tokenizer with the untouched ``x`` as the label.
    """
    if x.ndim != 4:
        raise ValueError(f"mask_patches expects a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    b, _, h, w = x.shape
    if patch < 1 or h % patch or w % patch:
        raise ValueError(f"image size {(h, w)} (H, W) is not a multiple of the mask patch size {patch}")
    rows, cols = h // patch, w // patch
    count = math.ceil(rows * cols * ratio)
    scores = torch.rand(b, rows * cols, generator=generator, device=generator.device if generator else "cpu")
    hidden = scores.to(x.device).topk(count, dim=1, sorted=False).indices
    keep = torch.ones(b, rows * cols, dtype=x.dtype, device=x.device).scatter_(1, hidden, 0.0)
    keep = keep.view(b, 1, rows, cols).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return x * keep, keep
