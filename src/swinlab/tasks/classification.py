"""Image and video classification: cross entropy (soft targets under Mixup/CutMix or smoothing), top-1/top-5."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.config import Fraction, NonNegative, Probability, TaskConfig
from swinlab.metrics import topk_correct
from swinlab.tasks.base import Batch, Logs, Task, model_device, move_to

if TYPE_CHECKING:
    from swinlab.data.build import DataBundle


@dataclass(frozen=True, kw_only=True)
class ClassificationConfig(TaskConfig):
    name: str = "classification"
    label_smoothing: Fraction = 0.1
    """Share of the target spread over all classes (with Mixup/CutMix, applied to the mixed targets)."""
    mixup: NonNegative = 0.0
    """Mixup alpha (0 disables)."""
    cutmix: NonNegative = 0.0
    """CutMix alpha (0 disables)."""
    mixup_prob: Probability = 1.0
    """Probability that a batch is mixed at all."""
    mixup_switch_prob: Probability = 0.5
    """With both alphas set: probability of CutMix rather than Mixup for a batch."""


@dataclass(frozen=True, kw_only=True)
class VideoClassificationConfig(ClassificationConfig):
    name: str = "video_classification"


_EVAL_SUMS = ("loss", "count", "correct1", "correct5", "count5")


class ClassificationTask(Task):
    """Cross entropy on ``(images, labels)`` batches; top-1 / top-5 accuracy and loss on evaluation.

    Args:
        mixup: a callable ``(x, y) -> (x_mixed, soft_targets)`` (``swinlab.data.mixup.Mixup``) or ``None``.
            When given it owns label smoothing, as in the official recipes.
        label_smoothing: smoothing for plain cross entropy when ``mixup`` is ``None``.
        views: evaluation batches carry a view axis, ``(B, V, ...)`` (multi-view video testing, e.g. 4 clips x
            3 crops): each sample's score is the mean of its V views' softmax probabilities (the official
            ``average_clips='prob'``), and its loss the cross entropy of that mean. Default: :attr:`multi_view`.
    """

    Config = ClassificationConfig
    data_kinds = ("image",)
    metric_names = ("val_loss", "val_top1", "val_top5")
    best_metric = ("val_top1", "max")
    multi_view: ClassVar[bool] = False
    """Whether evaluation batches carry a view axis unless ``views`` says otherwise."""

    def __init__(
        self,
        mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        label_smoothing: float = 0.0,
        views: bool | None = None,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.mixup = mixup
        self.label_smoothing = label_smoothing
        self.views = self.multi_view if views is None else views

    @classmethod
    def from_config(cls, config: ClassificationConfig, data: DataBundle) -> ClassificationTask:
        if config.mixup <= 0 and config.cutmix <= 0:
            return cls(label_smoothing=config.label_smoothing)
        from swinlab.data.mixup import Mixup

        mixup = Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            prob=config.mixup_prob,
            switch_prob=config.mixup_switch_prob,
            label_smoothing=config.label_smoothing,
            num_classes=data.num_classes,
        )
        return cls(mixup=mixup, label_smoothing=config.label_smoothing)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        images, labels = move_to(batch, model_device(model))
        if self.mixup is not None:
            images, soft = self.mixup(images, labels)
            logits = model(images)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        device = model_device(model)
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in _EVAL_SUMS}
        for batch in loader:
            images, labels = move_to(batch, device)
            logits = self._eval_scores(model, images)
            ks = (1, 5) if logits.shape[1] >= 5 else (1,)
            correct = topk_correct(logits, labels, ks).double()
            sums["loss"] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums["count"] += labels.shape[0]
            sums["correct1"] += correct[0]
            if len(ks) == 2:
                sums["correct5"] += correct[1]
                sums["count5"] += labels.shape[0]
        return sums

    def _eval_scores(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """Logits, or with views the log of the view-averaged probabilities (a valid input to cross entropy and
        top-k, since log-probabilities are logits of themselves)."""
        if not self.views:
            return model(inputs).float()
        if inputs.ndim < 3:
            raise ValueError(f"multi-view evaluation expects (B, V, ...) batches, got shape {tuple(inputs.shape)}")
        b, v = inputs.shape[:2]
        probs = model(inputs.flatten(0, 1)).float().softmax(-1).view(b, v, -1).mean(1)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        count = sums["count"]
        if count == 0:
            return {}
        metrics = {"val_loss": sums["loss"] / count, "val_top1": 100.0 * sums["correct1"] / count}
        if sums["count5"] > 0:  # top-5 means nothing with fewer than 5 classes
            metrics["val_top5"] = 100.0 * sums["correct5"] / sums["count5"]
        return metrics

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        lines = []
        if "val_top1" in metrics:
            top5 = f", top-5 {metrics['val_top5']:.2f}%" if "val_top5" in metrics else ""
            lines.append(f"validation top-1 {metrics['val_top1']:.2f}%{top5}, loss {metrics['val_loss']:.4f}")
        if best is not None:
            lines.append(f"best top-1       {best:.2f}% after {epochs} epochs")
        return lines


class VideoClassificationTask(ClassificationTask):
    """Action recognition: training clips ``(B, C, T, H, W)``; evaluation batches ``(B, views, C, T, H, W)``
    (clips x crops per video), scored by the mean of the views' probabilities."""

    Config = VideoClassificationConfig
    data_kinds = ("video",)
    multi_view = True
