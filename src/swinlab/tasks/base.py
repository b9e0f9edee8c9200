"""The task seam: what a workload means (its losses, metrics, optimizers, state), apart from the loop that runs it.

Every workload — classification, video, language modelling, SimMIM, architecture search, AiT — is a :class:`Task`
subclass run by :func:`swinlab.engine.fit`. The engine owns devices, DDP, precision, the backward pass, gradient
accumulation, clipping, non-finite skips, checkpoints and logs; a task owns the meaning of a batch. A task that
defines only :meth:`Task.loss` gets the default step (one optimizer, one loader); one that needs more (several
optimizers, a second loader, an unrolled second-order update) overrides :meth:`Task.train_step` and runs its
updates through the :class:`Step` the engine lends it, so the engine's precision and safety rules still apply.

Evaluation returns *sums* (not means) so the engine can all-reduce every rank's shard before :meth:`Task.finalize`
divides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from swinlab.config import OptimConfig, TaskConfig

if TYPE_CHECKING:
    from swinlab.data.build import DataBundle

Batch = Any
"""Whatever the loader yields; tensors inside tuples, lists and dicts are moved to the model's device."""
Logs = dict[str, torch.Tensor]
"""Scalar tensors a training step reports; each becomes an epoch-mean ``train_<key>`` column (first: the headline)."""


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


def _every_parameter(name: str) -> bool:
    return True


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer a task trains with: the parameters it updates, chosen by name, and its recipe.

    The engine builds it with the same weight-decay and ``lr_mult`` rules as the main optimizer and gives it its
    own learning-rate schedule; ``config=None`` takes the run's ``optim`` section.
    """

    params: Callable[[str], bool] = _every_parameter
    config: OptimConfig | None = None


@dataclass(frozen=True)
class FrozenModule:
    """A trained module a task uses but does not train (e.g. a tokenizer): the engine moves it to the device,
    keeps it out of optimizers, DDP and FP8 conversion, and records ``source`` and its SHA-256 in checkpoints
    so a resumed run can tell whether the file changed under it."""

    module: nn.Module
    source: str | None = None

    def place(self, device: torch.device) -> nn.Module:
        """On ``device``, in eval mode, without gradients: how every run holds it."""
        return self.module.to(device).eval().requires_grad_(False)

    def fingerprint(self) -> dict[str, str | None]:
        if self.source is None or not Path(self.source).is_file():
            return {"source": self.source, "sha256": None}
        digest = hashlib.sha256()
        with open(self.source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return {"source": self.source, "sha256": digest.hexdigest()}


class Step(Protocol):
    """What the engine lends :meth:`Task.train_step` for one micro-batch.

    Run every update inside ``with step.update(name):``; in it, ``step.backward(loss)`` for losses computed through
    ``step.model`` (DDP averages their gradients), ``step.add_grads(params, grads)`` for gradients computed
    another way (e.g. through an unrolled copy of the weights: averaged over ranks by the engine). On the last
    micro-batch of an accumulation group the block's exit clips, checks for non-finite values on every rank,
    steps or skips the optimizer and clears its gradients; before that it only accumulates. Gradients a block
    leaves on another optimizer's parameters are discarded, so updates never leak into each other.
    """

    model: nn.Module
    """The model to run forward passes through (wrapped in DDP when distributed)."""
    module: nn.Module
    """The plain model under any wrapper (for parameters, ``torch.func.functional_call``, state)."""
    step: int
    """0-based index of the optimizer step this micro-batch belongs to."""

    def update(self, name: str | None = None) -> AbstractContextManager[None]:
        """Accumulate into optimizer ``name`` (default: the task's first) under the run's autocast."""
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def add_grads(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None: ...

    def lr(self, name: str | None = None) -> float:
        """The scheduled learning rate of optimizer ``name`` at this step."""
        ...

    def optimizer(self, name: str | None = None) -> torch.optim.Optimizer: ...

    def batch(self, loader: str) -> Batch:
        """The next batch of an extra loader the task declared (cycled; reshuffled each epoch)."""
        ...


class Task:
    """Base of every task. Subclasses set the class attributes and define :meth:`loss`, :meth:`evaluate`,
    :meth:`finalize`; everything else has a default that gives today's one-optimizer, one-loader behaviour.
    """

    Config: ClassVar[type[TaskConfig]] = TaskConfig
    """The task's config section (``task:`` in a recipe), a frozen dataclass subclassing TaskConfig."""
    data_kinds: ClassVar[tuple[str, ...]] = ()
    """Batch kinds (``DataBundle.kind``) the task understands; empty: any."""
    metric_names: ClassVar[tuple[str, ...]] = ()
    """Keys :meth:`finalize` returns (the metrics.csv columns of this task)."""
    best_metric: ClassVar[tuple[str, str]] = ("val_loss", "min")
    """``(metric name, "max" | "min")`` that decides when ``best.pt`` is written."""
    loaders: ClassVar[tuple[str, ...]] = ()
    """Extra loaders :meth:`Step.batch` may draw from (e.g. ``"heldout"`` from ``data.heldout_fraction``)."""

    @classmethod
    def from_config(cls, config: TaskConfig, data: DataBundle) -> Task:
        """The task of a run: its config section and the data it will see (class count, kind)."""
        return cls()

    # -- what a batch means ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        """Scalar training loss (mean over the batch) and detached scalars worth logging."""
        raise NotImplementedError(f"{type(self).__name__} defines neither loss() nor train_step()")

    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Summed statistics over ``loader`` (same keys on every rank, even for an empty shard)."""
        raise NotImplementedError

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Turn all-reduced sums into the metrics named in :attr:`metric_names`."""
        raise NotImplementedError

    # -- how it trains ---------------------------------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The module the run trains, evaluates and checkpoints, built around the recipe's model (default: that
        model). A task that trains parts of its own with it (SimMIM's decoder and mask token) returns a module
        holding them, so optimizers, DDP, precision and checkpoints see them as the model's."""
        return model

    def optimizers(self, model: nn.Module) -> dict[str, OptimizerSpec]:
        """The optimizers to build, by name (the first is the main one: its rate is the ``lr`` column). Every
        trainable parameter must belong to exactly one."""
        return {"model": OptimizerSpec()}

    def train_step(self, step: Step, batch: Batch) -> Logs:
        """One micro-batch: the loss, its backward and (on the group's last micro-batch) the update."""
        with step.update():
            loss, logs = self.loss(step.model, batch)
            step.backward(loss)
        return logs

    # -- what it keeps and leaves behind ---------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, FrozenModule]:
        """Trained helpers the task runs but does not train (moved to the device by the engine)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Task state beyond model and optimizers that a resumed run needs (counters, histories)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        """Write pictures and files of this epoch into ``run_dir`` (main rank only, after evaluation)."""

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        """The lines a user reads at the end of a run (``best`` is the :attr:`best_metric` value or ``None``)."""
        shown = [f"{k} {metrics[k]:.4g}" for k in self.metric_names if k in metrics]
        lines = [f"validation {', '.join(shown)}"] if shown else []
        if best is not None:
            lines.append(f"best {self.best_metric[0]} {best:.4g} after {epochs} epochs")
        return lines
