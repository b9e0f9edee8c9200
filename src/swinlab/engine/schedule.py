"""Per-iteration learning-rate schedules as pure functions of the optimizer step.

The schedule holds no state beyond its constants, so resuming needs only the step counter from the checkpoint.
Shape follows the official Swin recipe (timm ``CosineLRScheduler`` with ``t_in_epochs=False`` and a warm-up
prefix): linear from ``warmup_lr`` to ``lr`` over the warm-up steps, then a half cosine from ``lr`` down to
``min_lr`` over the remaining steps, and ``min_lr`` after the end. ``multistep`` (the official SimMIM
pre-training) keeps ``lr`` after the warm-up and multiplies it by ``gamma`` at each milestone step.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from swinlab.config import OptimConfig

KINDS = ("cosine", "constant", "multistep")


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"
    milestones: tuple[int, ...] = ()
    """``multistep``: the (sorted) steps from which on ``gamma`` applies once more."""
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown LR schedule {self.kind!r} (choose one of {', '.join(KINDS)})")
        if self.kind == "multistep" and not self.milestones:
            raise ValueError("the multistep schedule needs milestones (optim.milestones, in epochs)")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be between 0 and total_steps={self.total_steps}")

    def lr_at(self, step: int) -> float:
        """Learning rate for the optimizer update with 0-based index ``step``."""
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "multistep":
            return self.lr * self.gamma ** bisect.bisect_right(self.milestones, step)
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps == 0 or step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / decay_steps
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


LR_SCALINGS = ("none", "linear")


def lr_factor(cfg: OptimConfig, global_batch: int) -> float:
    """What ``cfg``'s learning rates are multiplied by for a run whose updates average ``global_batch`` samples:
    1 for ``lr_scaling: none``, ``global_batch / base_batch`` for ``linear`` (the official Swin recipes' rule)."""
    if cfg.lr_scaling not in LR_SCALINGS:
        raise ValueError(f"optim.lr_scaling={cfg.lr_scaling!r}: choose one of {', '.join(LR_SCALINGS)}")
    return global_batch / cfg.base_batch if cfg.lr_scaling == "linear" else 1.0


def build_schedule(cfg: OptimConfig, *, steps_per_epoch: int, epochs: int, global_batch: int = 1) -> LRSchedule:
    """The schedule of ``cfg`` for a run of ``epochs`` epochs of ``steps_per_epoch`` optimizer updates of
    ``global_batch`` samples each (which scales the rates under ``lr_scaling: linear``)."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch} (is the training set empty?)")
    total = steps_per_epoch * epochs
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    factor = lr_factor(cfg, global_batch)
    return LRSchedule(
        lr=cfg.lr * factor,
        min_lr=cfg.min_lr * factor,
        warmup_lr=cfg.warmup_lr * factor,
        warmup_steps=warmup,
        total_steps=total,
        kind=cfg.schedule,
        milestones=tuple(sorted(round(epoch * steps_per_epoch) for epoch in cfg.milestones)),
        gamma=cfg.gamma,
    )
