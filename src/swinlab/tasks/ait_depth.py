"""Training AiT's task-solver on depth as a task (``task: ait_depth``): a :class:`~swinlab.ait.TaskSolver` learns to
predict the codes a trained, frozen depth tokenizer gives each ground-truth map, through the one engine.

The tokenizer comes from ``task.tokenizer`` (a run folder of ``task: ait_tokenizer`` or its checkpoint) and is a
frozen helper of the task (:class:`~swinlab.tasks.base.FrozenModule`): eval mode, no gradients, in no optimizer and
not in the solver's checkpoint (which records its path and SHA-256 instead). A training step: the tokenizer's hard
codes of the depth map are the targets; the loss is the mean cross-entropy over the vocabulary (official) plus
``aux_weight`` × SILog of the soft-decoded logits against the map (AiT's auxiliary decoder loss).

Evaluation decodes each validation image greedily (autoregressive with a key/value cache, or in one pass for an
AiT-P solver; ``soft_input``: next input = softmax mix of the code embeddings), turns the tokens into depth through
the tokenizer (``soft_decode``: the soft decode with ``tau``; else the arg-max ids), clips at ``min_depth`` and scores
AiT's depth metrics per image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import torch
from torch import nn

from swinlab.ait import SoftVQVAE, TaskSolver, aux_loss, freeze_tokenizer
from swinlab.config import NonNegativeInt, Positive, Range, TaskConfig
from swinlab.metrics.depth import DEPTH_METRICS, depth_metrics
from swinlab.tasks.ait_tokenizer import EVAL_CROPS, depth_line, depth_pictures, load_run_tokenizer
from swinlab.tasks.base import Batch, FrozenModule, Logs, Task, model_device
from swinlab.tasks.simmim import save_picture_grid

if TYPE_CHECKING:
    from swinlab.data.build import DataBundle

TASK = "depth"


@dataclass(frozen=True, kw_only=True)
class AitDepthConfig(TaskConfig):
    name: str = "ait_depth"
    tokenizer: str | None = None
    """Run folder of a ``task: ait_tokenizer`` run (its ``checkpoint.pt``) or such a checkpoint file. Required."""
    aux_weight: Annotated[float, Range(ge=0)] = 1.0
    """Weight of the SILog loss through the frozen decoder (official ``decoder_loss_weight``; 0: off)."""
    tau: Positive = 0.8
    """Multiplier of the code logits in the soft decode (an inverse temperature), for the auxiliary loss and
    evaluation (official 0.8)."""
    soft_decode: bool = True
    """Evaluation turns the code logits into depth by the soft decode (official ``soft_vae``); else the arg-max ids."""
    soft_input: bool = True
    """Autoregressive decoding feeds the softmax mix of the code embeddings (official ``soft_transformer``)."""
    eval_crop: str | None = None
    """``eigen``: score only the (scaled) Eigen crop; ``null``: the whole map."""
    min_depth: Positive = 1e-3
    """Ground truth must be above this to count, and predictions are clipped to at least this (metres)."""
    max_depth: Positive = 10.0
    """Ground truth must be below this to count (metres)."""
    depth_images: NonNegativeInt = 6
    """Validation maps drawn in ``depth_epoch<N>.png`` (rows: ground truth, prediction); 0: no pictures."""


def load_tokenizer(source: str | None) -> tuple[SoftVQVAE, Path]:
    """The depth tokenizer of a ``task: ait_tokenizer`` run folder or checkpoint, frozen; errors name the key."""
    return load_run_tokenizer(source, TASK, "ait_depth", "ait_tokenizer")


class AitDepthTask(Task):
    """Depth as tokens: cross-entropy on the tokenizer's codes (+ auxiliary SILog); best checkpoint by RMSE."""

    Config = AitDepthConfig
    data_kinds = ("depth",)
    metric_names = ("val_loss", *(f"val_{m}" for m in DEPTH_METRICS))
    best_metric = ("val_rmse", "min")

    def __init__(self, config: AitDepthConfig, tokenizer: SoftVQVAE, source: Path | None = None) -> None:
        self.config = config
        if config.eval_crop not in EVAL_CROPS:
            raise ValueError(f"task.eval_crop must be null or 'eigen', got {config.eval_crop!r}")
        if config.min_depth >= config.max_depth:
            raise ValueError(f"task.min_depth {config.min_depth} must be below task.max_depth")
        self.tokenizer, self.source = freeze_tokenizer(tokenizer), source
        self._shown: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: AitDepthConfig, data: DataBundle) -> AitDepthTask:
        tokenizer, path = load_tokenizer(config.tokenizer)
        return cls(config, tokenizer, path)

    def prepare_model(self, model: nn.Module) -> TaskSolver:
        """The recipe's solver, checked against the tokenizer: its vocabulary's depth codes and its prompts."""
        if not isinstance(model, TaskSolver):
            raise TypeError(
                f"task ait_depth trains a TaskSolver (model.name: ait_task_solver), got {type(model).__name__}"
            )
        if TASK not in model.vocabulary.tasks or model.vocabulary.num_codes(TASK) != self.tokenizer.num_codes:
            have = model.vocabulary.num_codes(TASK) if TASK in model.vocabulary.tasks else 0
            raise ValueError(
                f"the solver's vocabulary has {have} depth codes but the tokenizer has {self.tokenizer.num_codes}: "
                f"set model.kwargs.codes.depth: {self.tokenizer.num_codes}"
            )
        if TASK not in model.prompts:
            raise ValueError(
                f"the solver has no depth prompt: add 'depth' to model.kwargs.prompts {list(model.prompts)}"
            )
        return model

    # -- what a batch means ----------------------------------------------------------------------------------
    def _targets(self, solver: TaskSolver, depth: torch.Tensor) -> torch.Tensor:
        return solver.vocabulary.from_codes(TASK, self.tokenizer.encode(depth).flatten(1))

    def _loss(self, model: nn.Module, images: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, Logs]:
        solver = getattr(model, "module", model)  # under DDP, the forward goes through the wrapper
        targets = self._targets(solver, depth)
        logits = model(images, TASK, targets)
        ce = solver.loss(logits, targets, TASK)
        logs = {"ce": ce.detach()}
        loss = ce
        if self.config.aux_weight > 0:
            aux = aux_loss(self.tokenizer, solver.code_logits(logits, TASK), depth, self.config.tau)
            loss = ce + self.config.aux_weight * aux
            logs["aux_silog"] = aux.detach()
        return loss, {"loss": loss.detach(), **logs}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        device = model_device(model)
        return self._loss(model, batch[0].to(device), batch[1].to(device))

    def predict(self, solver: TaskSolver, images: torch.Tensor) -> torch.Tensor:
        """Depth maps ``(B, 1, H, W)`` of images: greedy tokens through the tokenizer, clipped at ``min_depth``."""
        c = self.config
        h, w = (s // self.tokenizer.downsample for s in images.shape[-2:])
        code_logits, codes = solver.generate(images, TASK, h * w, soft_input=c.soft_input)
        if c.soft_decode:
            depth = self.tokenizer.decode_soft(code_logits, c.tau)
        else:
            depth = self.tokenizer.decode_ids(codes.view(-1, h, w))
        return depth.clamp_min(c.min_depth)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Per-image sums of the depth metrics of the decoded predictions and of the teacher-forced loss."""
        c = self.config
        device = model_device(model)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = {k: zero.clone() for k in ("count", "loss", *DEPTH_METRICS)}
        self._shown = None
        for batch in loader:
            images, depth = batch[0].to(device), batch[1].to(device)
            n = depth.shape[0]
            if n == 0:
                continue
            sums["loss"] += self._loss(model, images, depth)[0].double() * n
            pred = self.predict(model, images)
            scores = depth_metrics(pred, depth, min_depth=c.min_depth, max_depth=c.max_depth, crop=c.eval_crop)
            for name, values in scores.items():
                sums[name] += values.double().sum()
            sums["count"] += n
            if self._shown is None and c.depth_images:
                self._shown = torch.stack([depth[: c.depth_images], pred[: c.depth_images]]).cpu()
        return sums

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums["count"]
        return {f"val_{k}": sums[k] / n for k in ("loss", *DEPTH_METRICS)} if n else {}

    # -- what it keeps and leaves behind ---------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, FrozenModule]:
        return {"tokenizer": FrozenModule(self.tokenizer, None if self.source is None else str(self.source))}

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        """``depth_epoch<N>.png`` after every evaluation: ground truth above, prediction below."""
        if metrics and self._shown is not None:
            save_picture_grid(list(depth_pictures(*self._shown)), run_dir / f"depth_epoch{epoch}.png")

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        if "val_rmse" not in metrics:
            return []
        m = metrics
        decode = f"soft, tau {self.config.tau:g}" if self.config.soft_decode else "hard"
        lines = [f"{depth_line('depth', m)} (decode: {decode})"]
        if best is not None:
            lines.append(f"best depth RMSE {best:.4f} m after {epochs} epochs")
        return lines
