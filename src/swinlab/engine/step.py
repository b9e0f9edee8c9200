"""The engine's side of a training step: what :meth:`swinlab.tasks.Task.train_step` runs its updates through.

:class:`Stepper` implements the :class:`swinlab.tasks.Step` protocol. It owns, for every optimizer of the task,
the learning-rate schedule, gradient accumulation over micro-batches, DDP's ``no_sync`` on all but a group's last
micro-batch, clipping, the all-rank non-finite check and the skip, so a task with two optimizers and an unrolled
second-order update gets the same precision and safety rules as plain classification.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from swinlab.engine import precision
from swinlab.engine.distributed import DistEnv, all_ranks_true
from swinlab.engine.precision import AutocastFactory
from swinlab.engine.schedule import LRSchedule


@dataclass
class OptimizerSlot:
    """One optimizer of the run with its schedule and what the current accumulation group has collected."""

    name: str
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    others: list[nn.Parameter]
    """Trainable parameters of the other optimizers: their gradients are set aside during this one's updates."""
    finite: torch.Tensor
    pending: bool = False
    """Gradients were accumulated in this group and not yet applied."""
    norms: list[float] = field(default_factory=list)
    skipped: int = 0

    def params(self) -> Iterator[torch.Tensor]:
        return (p for g in self.optimizer.param_groups for p in g["params"])

    def set_lr(self, step: int) -> float:
        lr = self.schedule.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr


class CycledLoader:
    """Endless batches of a loader, restarted when it runs out (an extra loader may be shorter than the main one;
    a restart within an epoch repeats that epoch's order, so a resumed epoch sees the same batches)."""

    def __init__(self, name: str, loader: Iterable[Any]) -> None:
        self.name, self.loader = name, loader
        self._iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._iterator is not None:
            try:
                return next(self._iterator)
            except StopIteration:
                pass
        self._iterator = iter(self.loader)
        try:
            return next(self._iterator)
        except StopIteration:
            raise ValueError(f"the {self.name!r} loader yielded no batch (is its split empty?)") from None


class Stepper:
    """The :class:`swinlab.tasks.Step` of a run; the loop calls :meth:`begin` before each micro-batch and
    :meth:`finish_group` after a group's last one."""

    def __init__(
        self,
        model: nn.Module,
        module: nn.Module,
        slots: Mapping[str, OptimizerSlot],
        *,
        clip_grad: float | None,
        env: DistEnv,
        autocast: AutocastFactory,
    ) -> None:
        self.model, self.module, self.slots = model, module, dict(slots)
        self.main = next(iter(self.slots))
        self.clip_grad, self.env, self.autocast = clip_grad, env, autocast
        self.loaders: dict[str, CycledLoader] = {}
        self.step, self.group, self.last = 0, 1, True
        self._active: OptimizerSlot | None = None

    # -- driven by the loop ----------------------------------------------------------------------------------
    def begin(self, step: int, group: int, *, first: bool, last: bool) -> None:
        """Micro-batch of optimizer step ``step`` in a group of ``group`` micro-batches."""
        self.step, self.group, self.last = step, group, last
        if first:
            for slot in self.slots.values():
                slot.set_lr(step)

    def finish_group(self) -> None:
        """Apply what a group accumulated but did not apply (its last micro-batch had no sample to run)."""
        for slot in self.slots.values():
            if slot.pending:
                self._apply(slot)

    # -- the Step protocol -----------------------------------------------------------------------------------
    def _slot(self, name: str | None) -> OptimizerSlot:
        key = self.main if name is None else name
        if key not in self.slots:
            raise KeyError(f"no optimizer named {key!r} (the task declared {', '.join(self.slots)})")
        return self.slots[key]

    @contextlib.contextmanager
    def update(self, name: str | None = None) -> Iterator[None]:
        slot = self._slot(name)
        if self._active is not None:
            raise RuntimeError(f"update({slot.name!r}) inside update({self._active.name!r}): blocks do not nest")
        set_aside = precision.stash_grads(slot.others)
        no_sync = isinstance(self.model, DistributedDataParallel) and not self.last
        self._active = slot
        try:
            with self.model.no_sync() if no_sync else contextlib.nullcontext(), self.autocast():
                yield
        finally:
            self._active = None
            precision.restore_grads(slot.others, set_aside)  # drops what this block left on them
        slot.pending = True
        if self.last:
            self._apply(slot)

    def _require_active(self, what: str) -> OptimizerSlot:
        if self._active is None:
            raise RuntimeError(f"step.{what}() belongs inside a `with step.update(...)` block")
        return self._active

    def backward(self, loss: torch.Tensor) -> None:
        slot = self._require_active("backward")
        slot.finite &= torch.isfinite(loss.detach()).all()
        # Outside autocast, as the backward of a plain loop: autocast would also cast the backward's own GEMMs.
        with torch.autocast(loss.device.type, enabled=False):
            (loss / self.group).backward()

    def add_grads(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        slot = self._require_active("add_grads")
        owned = {id(p) for p in slot.params()}
        if len(params) != len(grads) or any(id(p) not in owned for p in params):
            raise ValueError(f"add_grads: give one gradient per parameter of the {slot.name!r} optimizer")
        for param, grad in zip(params, grads, strict=True):
            grad = grad.detach() / self.group  # a new tensor: reduced in place below
            if self.env.distributed:  # computed outside DDP: average over ranks here
                dist.all_reduce(grad, op=dist.ReduceOp.SUM)
                grad /= self.env.world_size
            param.grad = grad if param.grad is None else param.grad + grad

    def lr(self, name: str | None = None) -> float:
        return self._slot(name).schedule.lr_at(self.step)

    def optimizer(self, name: str | None = None) -> torch.optim.Optimizer:
        return self._slot(name).optimizer

    def batch(self, loader: str) -> Any:
        if loader not in self.loaders:
            declared = ", ".join(self.loaders) or "none"
            raise KeyError(f"no extra loader {loader!r}: a task declares the ones it draws from (now: {declared})")
        return next(self.loaders[loader])

    # -- the update ------------------------------------------------------------------------------------------
    def _apply(self, slot: OptimizerSlot) -> None:
        """Clip and step, unless the loss or gradient is non-finite on any rank: then drop the gradients."""
        params = [p for p in slot.params() if p.grad is not None]
        max_norm = self.clip_grad if self.clip_grad else math.inf
        if not params:  # e.g. every parameter frozen for this step
            params = [torch.zeros((), device=slot.finite.device, requires_grad=True)]
        fp8_clip = getattr(slot.optimizer, "clip_grad_norm_", None)
        # An FP8 optimizer's own clip also covers the E4M3 weight gradients, which live outside `.grad`.
        norm = fp8_clip(max_norm) if fp8_clip else torch.nn.utils.clip_grad_norm_(params, max_norm)
        if all_ranks_true(bool(slot.finite & torch.isfinite(norm)), self.env):
            slot.optimizer.step()
            slot.norms.append(float(norm))
        else:
            slot.skipped += 1
            if self.env.is_main:
                warnings.warn(
                    f"non-finite loss or gradient at step {self.step}: update of {slot.name!r} skipped",
                    RuntimeWarning,
                    stacklevel=3,
                )
        slot.optimizer.zero_grad(set_to_none=True)
        slot.finite.fill_(True)
        slot.pending = False
