"""Task objects: what a batch means (loss, evaluation sums) kept apart from the loop that runs it.

Every workload (classification, video, SimMIM, NAS, AiT, LM) plugs into :func:`swinlab.engine.fit` through
an object with this small protocol instead of carrying its own copy of the loop. Evaluation returns *sums*
(not means) so the engine can all-reduce the shards of every rank before :meth:`Task.finalize` divides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.metrics import topk_correct

Batch = Any
"""Whatever the loader yields; tensors inside tuples, lists and dicts are moved to the model's device."""


class Task(Protocol):
    metric_names: tuple[str, ...]
    """Keys :meth:`finalize` returns (the metrics.csv columns of this task)."""
    best_metric: tuple[str, str]
    """``(metric name, "max" | "min")`` that decides when ``best.pt`` is written."""

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar training loss (mean over the batch) and detached tensors worth logging."""
        ...

    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Summed statistics over ``loader`` (same keys on every rank, even for an empty shard)."""
        ...

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Turn all-reduced sums into the metrics named in :attr:`metric_names`."""
        ...


def move_to(batch: Batch, device: torch.device) -> Batch:
    """Copy the tensors of a (nested) batch to ``device``; other leaves are left alone."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def batch_len(batch: Batch) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, Mapping) else batch
    for item in items:
        return batch_len(item)
    raise TypeError(f"cannot tell the number of samples of an empty batch {batch!r}")


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


_EVAL_SUMS = ("loss", "count", "correct1", "correct5", "count5")


class ClassificationTask:
    """Image/video classification: cross entropy (soft targets under mixup/smoothing), top-1/top-5 eval.

    Args:
        mixup: a callable ``(x, y) -> (x_mixed, soft_targets)`` (``swinlab.data.mixup.Mixup``) or ``None``.
            When given it owns label smoothing, as in the official recipes.
        label_smoothing: smoothing for plain cross entropy when ``mixup`` is ``None``.
        views: evaluation batches carry a view axis, ``(B, V, ...)`` (multi-view video testing, e.g. 4 clips x
            3 crops): each sample's score is the mean of its V views' softmax probabilities (the official
            ``average_clips='prob'``), and its loss the cross entropy of that mean.
    """

    metric_names = ("val_loss", "val_top1", "val_top5")
    best_metric = ("val_top1", "max")

    def __init__(
        self,
        mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        label_smoothing: float = 0.0,
        views: bool = False,
    ) -> None:
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.mixup = mixup
        self.label_smoothing = label_smoothing
        self.views = views

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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


class LanguageModelingTask:
    """Next-token prediction: batches are ``(inputs, targets)`` token ids ``(B, T)`` with targets shifted by one;
    the loss is the cross entropy averaged over every position of the batch.

    Evaluation reports ``val_loss`` (nats per token), ``val_ppl`` (perplexity, ``exp(val_loss)``) and ``val_bpb``
    (bits per byte, ``val_loss / ln 2``: swinlab's text tokens are bytes, so bits per token are bits per byte,
    the unit that compares models across tokenizers).
    """

    metric_names = ("val_loss", "val_ppl", "val_bpb")
    best_metric = ("val_loss", "min")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, targets = move_to(batch, model_device(model))
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        device = model_device(model)
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "tokens")}
        for batch in loader:
            inputs, targets = move_to(batch, device)
            logits = model(inputs).float()
            sums["loss"] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
            sums["tokens"] += targets.numel()
        return sums

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        if sums["tokens"] == 0:
            return {}
        loss = sums["loss"] / sums["tokens"]
        ppl = math.exp(loss) if loss < 700 else math.inf  # a diverged run must still log, not overflow
        return {"val_loss": loss, "val_ppl": ppl, "val_bpb": loss / math.log(2)}
