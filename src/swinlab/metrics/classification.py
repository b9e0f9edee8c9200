"""Classification metrics as *counts*: shards evaluated on different ranks are summed before dividing."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1,)) -> torch.Tensor:
    """Number of samples whose label is among the ``k`` highest logits, for each ``k`` in ``ks``.

    Args:
        logits: ``(N, C)`` scores.
        target: ``(N,)`` integer labels.
        ks: the ``k`` values; each must be between 1 and ``C``.

    Returns:
        An int64 tensor of shape ``(len(ks),)`` on ``logits.device``.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (N,) = ({logits.shape[0]},), got shape {tuple(target.shape)}")
    num_classes = logits.shape[1]
    bad = [k for k in ks if not 1 <= k <= num_classes]
    if bad:
        raise ValueError(f"top-k needs 1 <= k <= num_classes={num_classes}, got k={bad}")
    if not ks:
        return torch.zeros(0, dtype=torch.int64, device=logits.device)
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])
