"""Next-token prediction on ``(inputs, targets)`` token windows, reported in nats, perplexity and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.tasks.base import Batch, Logs, Task, model_device, move_to


class LanguageModelTask(Task):
    """Batches are ``(inputs, targets)`` token ids ``(B, T)`` with targets shifted by one; the loss is the cross
    entropy averaged over every position of the batch.

    Evaluation reports ``val_loss`` (nats per token), ``val_ppl`` (perplexity, ``exp(val_loss)``) and ``val_bpb``
    (bits per byte, ``val_loss / ln 2``: swinlab's text tokens are bytes, so bits per token are bits per byte,
    the unit that compares models across tokenizers).
    """

    data_kinds = ("text",)
    metric_names = ("val_loss", "val_ppl", "val_bpb")
    best_metric = ("val_loss", "min")

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
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

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        lines = []
        if "val_loss" in metrics:
            lines.append(
                f"validation loss  {metrics['val_loss']:.4f} nats/token, perplexity {metrics['val_ppl']:.3f}, "
                f"{metrics['val_bpb']:.4f} bits/byte"
            )
        if best is not None:
            lines.append(f"best val loss    {best:.4f} after {epochs} epochs")
        return lines
