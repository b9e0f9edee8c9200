"""A toy bilevel task (DARTS's shape in miniature) for the engine tests, run through ``swinlab train`` by import path.

Weights ``w`` (two branches and a head) learn on the training split; architecture logits ``alpha`` (the softmax
mix of the branches) learn on the ``heldout`` split, with their own optimizer and schedule. ``order: 1`` is the
first-order step (``alpha`` against the held-out loss at the current weights); ``order: 2`` the exact
second-order one: the held-out loss at the weights after one unrolled SGD step on the training batch,
differentiated through that step with ``torch.func.functional_call``. ``BILEVEL_KILL_AT_STEP=k`` makes every
rank SIGKILL itself at the start of optimizer step ``k`` (a crash at a known point, for the resume tests).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.func import functional_call

from swinlab.config import OptimConfig, TaskConfig, apply_overrides
from swinlab.models.registry import register_model
from swinlab.tasks import OptimizerSpec, Step, Task, model_device, move_to

TASK = "_bilevel_task:BilevelTask"


class MixedMLP(nn.Module):
    """Two candidate branches mixed by ``softmax(alpha)`` (a one-edge DARTS cell), then a linear head."""

    def __init__(self, num_classes: int, in_chans: int, img_size: int, hidden: int = 16) -> None:
        super().__init__()
        features = in_chans * img_size * img_size
        self.linear = nn.Linear(features, hidden)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)
        self.alpha = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        mix = self.alpha.softmax(0)
        return self.head(torch.relu(mix[0] * self.linear(x) + mix[1] * self.mlp(x)))


@register_model
def toy_bilevel_mlp(num_classes: int = 10, in_chans: int = 1, img_size: int = 8, **kwargs) -> MixedMLP:
    return MixedMLP(num_classes, in_chans, img_size, **kwargs)


def _arch_optim() -> OptimConfig:
    return OptimConfig(name="adamw", lr=3e-2, betas=(0.5, 0.999), weight_decay=1e-3, warmup_epochs=0.0,
                       schedule="constant")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class BilevelConfig(TaskConfig):
    name: str = TASK
    order: int = 1
    """1: first-order architecture step; 2: exact second-order (through one unrolled weight step)."""
    arch_optim: OptimConfig = field(default_factory=_arch_optim)


class BilevelTask(Task):
    Config = BilevelConfig
    data_kinds = ("image",)
    metric_names = ("val_loss", "val_top1")
    best_metric = ("val_loss", "min")
    loaders = ("heldout",)

    def __init__(self, config: BilevelConfig) -> None:
        if config.order not in (1, 2):
            raise ValueError(f"task.order must be 1 or 2, got {config.order}")
        self.config = config
        self.arch_updates = 0
        """Task state: architecture steps taken (checkpointed, so a resumed run counts on)."""

    @classmethod
    def from_config(cls, config: BilevelConfig, data) -> BilevelTask:
        return cls(config)

    def optimizers(self, model: nn.Module) -> dict[str, OptimizerSpec]:
        return {
            "weights": OptimizerSpec(lambda name: name != "alpha"),
            "arch": OptimizerSpec(lambda name: name == "alpha", self.config.arch_optim),
        }

    def train_step(self, step: Step, batch) -> dict[str, torch.Tensor]:
        if os.environ.get("BILEVEL_KILL_AT_STEP") == str(step.step):
            os.kill(os.getpid(), signal.SIGKILL)
        heldout = step.batch("heldout")
        with step.update("arch"):
            if self.config.order == 1:
                arch_loss = self._first_order(step, heldout)
            else:
                arch_loss = self._unrolled(step, batch, heldout)
        with step.update("weights"):
            images, labels = move_to(batch, model_device(step.module))
            loss = F.cross_entropy(step.model(images).float(), labels)
            step.backward(loss)
        self.arch_updates += 1
        mix = step.module.alpha.detach().softmax(0)
        return {"loss": loss.detach(), "arch_loss": arch_loss.detach(), "alpha_entropy": -(mix * mix.log()).sum()}

    def _first_order(self, step: Step, heldout) -> torch.Tensor:
        images, labels = move_to(heldout, model_device(step.module))
        loss = F.cross_entropy(step.model(images).float(), labels)
        step.backward(loss)
        return loss

    def _unrolled(self, step: Step, batch, heldout) -> torch.Tensor:
        module = step.module
        params = dict(module.named_parameters())
        weights = {n: p for n, p in params.items() if n != "alpha"}
        images, labels = move_to(batch, model_device(module))
        train_loss = F.cross_entropy(functional_call(module, params, (images,)).float(), labels)
        grads = torch.autograd.grad(train_loss, list(weights.values()), create_graph=True)
        eta = step.lr("weights")
        unrolled = {n: w - eta * g for (n, w), g in zip(weights.items(), grads, strict=True)}
        images, labels = move_to(heldout, model_device(module))
        logits = functional_call(module, {**unrolled, "alpha": params["alpha"]}, (images,))
        loss = F.cross_entropy(logits.float(), labels)
        (grad_alpha,) = torch.autograd.grad(loss, [params["alpha"]])
        step.add_grads([params["alpha"]], [grad_alpha])
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, torch.Tensor]:
        device = model_device(model)
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "correct", "count")}
        for batch in loader:
            images, labels = move_to(batch, device)
            logits = model(images).float()
            sums["loss"] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums["correct"] += (logits.argmax(1) == labels).sum()
            sums["count"] += labels.numel()
        return sums

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        if not sums["count"]:
            return {}
        return {"val_loss": sums["loss"] / sums["count"], "val_top1": 100.0 * sums["correct"] / sums["count"]}

    def state_dict(self) -> dict[str, int]:
        return {"arch_updates": self.arch_updates}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.arch_updates = int(state["arch_updates"])

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        mix = model.alpha.detach().softmax(0).tolist()
        record = {"epoch": epoch, "mix": mix, "arch_updates": self.arch_updates}
        (run_dir / f"alpha_epoch{epoch}.json").write_text(json.dumps(record))


def write_recipe(path: Path, output_dir: Path, **overrides: object) -> Path:
    """A YAML recipe of a small bilevel run on the embedded Fashion-MNIST (6 steps an epoch, 3 epochs)."""
    values = {
        "task.name": TASK, "model.name": "toy_bilevel_mlp", "data.name": "fashion_mnist_embedded",
        "data.img_size": 8, "data.augment": "none", "data.train_limit": 96, "data.heldout_fraction": 0.5,
        "data.val_limit": 64, "data.batch_size": 8, "epochs": 3, "threads": 1, "clip_grad": 5.0,
        "optim.lr": 0.05, "optim.warmup_epochs": 0.5, "output_dir": str(output_dir), "log_every": 1, **overrides,
    }  # fmt: skip
    recipe = apply_overrides({}, [f"{key}={value}" for key, value in values.items()])
    path.write_text(yaml.safe_dump(recipe))
    return path
