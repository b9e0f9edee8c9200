"""Mixup / CutMix on a batch, with label smoothing into soft targets (one draw per batch).

Written here because timm's and torchvision's versions cannot be imported beside the CPU torch 2.13 this
project uses (both need torchvision; see the ecosystem notes). Randomness comes from torch's global RNG, so
the engine's per-epoch ``torch.manual_seed`` reproduces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """``off = smoothing / num_classes`` everywhere, ``1 - smoothing + off`` on the label: rows sum to 1."""
    off = smoothing / num_classes
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + off


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)``: a box of area ``(1 - lam) * H * W`` at a uniform centre, clipped to the image."""
    cut = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, ()).item())
    cx = int(torch.randint(0, width, ()).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return y0, y1, x0, x1


class Mixup:
    """``(x, y) -> (x_mixed, soft_targets)``: a batch is mixed with itself flipped along the batch dim.

    With probability ``prob`` a batch is mixed; when both alphas are > 0, CutMix is chosen with probability
    ``switch_prob``. ``lam ~ Beta(alpha, alpha)``; for CutMix ``lam`` is recomputed from the pasted box's
    actual area after clipping. Both alphas 0: ``(x, smoothed one-hot)``. Works for any ``(N, ..., H, W)``
    input (video too).
    """

    def __init__(
        self,
        mixup_alpha: float = 1.0,
        cutmix_alpha: float = 0.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"alphas must be >= 0, got mixup_alpha={mixup_alpha}, cutmix_alpha={cutmix_alpha}")
        for name, p in (("prob", prob), ("switch_prob", switch_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    def _sample(self) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for one batch; ``lam == 1`` means no mixing."""
        if (self.mixup_alpha == 0 and self.cutmix_alpha == 0) or torch.rand(()).item() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = torch.rand(()).item() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = torch.tensor(self.cutmix_alpha if use_cutmix else self.mixup_alpha)
        return float(torch.distributions.Beta(alpha, alpha).sample()), use_cutmix

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim < 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"expected x (N, ..., H, W) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        targets = smooth_one_hot(y.long(), self.num_classes, self.label_smoothing)
        lam, use_cutmix = self._sample()
        if lam >= 1.0:
            return x, targets
        x_flip = x.flip(0)
        if use_cutmix:
            height, width = x.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(height, width, lam)
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x_flip[..., y0:y1, x0:x1]
        else:
            x = x * lam + x_flip * (1.0 - lam)
        return x, targets * lam + targets.flip(0) * (1.0 - lam)
