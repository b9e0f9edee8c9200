"""The precision seam: one place that turns ``cfg.precision`` into a prepared model/optimizer and an autocast.

``fp32`` and ``bf16`` (autocast on the model's device type) need nothing else. The FP8 levels (FP8-LM's
O1/O2/O3) hand model and optimizer to ``swinlab.fp8.initialize``, which swaps the linears for FP8 ones and the
optimizer for its FP8 twin (FP8 weight gradients; at O2 FP8/FP16 moments and FP16 master weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
from torch import nn

from swinlab import fp8
from swinlab.config import FP8Config
from swinlab.fp8.shard import load_optimizer_state_dict as _load_sharded
from swinlab.fp8.shard import optimizer_state_dict as _gather_sharded

AutocastFactory = Callable[[], AbstractContextManager[object]]

PRECISIONS = ("fp32", "bf16", "fp8-o1", "fp8-o2", "fp8-o3")

Optimizers = TypeVar("Optimizers", torch.optim.Optimizer, Mapping[str, torch.optim.Optimizer], None)


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def wrap(
    model: nn.Module,
    optimizers: Optimizers,
    precision: str,
    fp8_recipe: FP8Config | None = None,
) -> tuple[nn.Module, Optimizers, AutocastFactory]:
    """Prepare ``model`` and its optimizer(s) for ``precision`` (see :data:`PRECISIONS`).

    Call it on the plain model, after the optimizers are built and before DistributedDataParallel, so FP8 layer
    swaps are seen by all of them. ``optimizers`` is one optimizer, a mapping of a task's named optimizers, or
    ``None`` for evaluation; it comes back in the same form (FP8 may replace optimizers by their FP8 twins), with
    the (possibly replaced) model and a zero-argument factory of the context manager to run forward passes and
    losses under. ``fp8_recipe`` (the config's ``fp8`` section: gradient format, amax history, margin) applies to
    the FP8 levels; evaluation must get the training run's, since the amax-history length shapes the checkpoint's
    buffers.
    """
    key = precision.lower()
    if key == "fp32":
        return model, optimizers, contextlib.nullcontext
    if key == "bf16":
        device_type = _device_type(model)
        return model, optimizers, lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    if key in ("fp8-o1", "fp8-o2", "fp8-o3"):
        options = dataclasses.asdict(fp8_recipe or FP8Config())
        level = key[-2:].upper()
        if isinstance(optimizers, Mapping):
            model, converted = fp8.initialize(model, list(optimizers.values()), opt_level=level, **options)
            return model, dict(zip(optimizers, converted, strict=True)), contextlib.nullcontext
        model, optimizer = fp8.initialize(model, optimizers, opt_level=level, **options)
        return model, optimizer, contextlib.nullcontext
    raise ValueError(f"unknown precision {precision!r} (choose one of {', '.join(PRECISIONS)})")


_FP8_GRAD = "fp8_grad"
"""Where an FP8 weight keeps its E4M3 gradient instead of ``.grad`` (``swinlab.fp8``)."""


def stash_grads(params: Sequence[torch.Tensor]) -> list[tuple[Any, Any]]:
    """Take the gradients of ``params`` (``.grad`` and an FP8 weight's E4M3 one) out of them, leaving none."""
    saved = []
    for param in params:
        saved.append((param.grad, getattr(param, _FP8_GRAD, None)))
        param.grad = None
        if hasattr(param, _FP8_GRAD):
            setattr(param, _FP8_GRAD, None)
    return saved


def restore_grads(params: Sequence[torch.Tensor], saved: Sequence[tuple[Any, Any]]) -> None:
    """Put back what :func:`stash_grads` took, discarding whatever gradients arrived in between."""
    for param, (grad, fp8_grad) in zip(params, saved, strict=True):
        param.grad = grad
        if fp8_grad is not None or hasattr(param, _FP8_GRAD):
            setattr(param, _FP8_GRAD, fp8_grad)


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """What a checkpoint stores for ``optimizer``; call it on every rank (FP8 O3 gathers the ranks' shards)."""
    return _gather_sharded(optimizer)


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state_dict` (each FP8 O3 rank takes its own shard back)."""
    _load_sharded(optimizer, state)
