"""The precision seam: one place that turns ``cfg.precision`` into a prepared model/optimizer and an autocast.

``fp32`` and ``bf16`` (autocast on the model's device type) need nothing else. The FP8 levels (FP8-LM's
O1/O2/O3) hand model and optimizer to ``swinlab.fp8.initialize``, which swaps the linears for FP8 ones and the
optimizer for its FP8 twin (FP8 weight gradients; at O2 FP8/FP16 moments and FP16 master weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from swinlab.config import FP8Config

AutocastFactory = Callable[[], AbstractContextManager[object]]

PRECISIONS = ("fp32", "bf16", "fp8-o1", "fp8-o2", "fp8-o3")


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def wrap(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    precision: str,
    fp8_recipe: FP8Config | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer | None, AutocastFactory]:
    """Prepare ``model``/``optimizer`` for ``precision`` (see :data:`PRECISIONS`).

    Call it on the plain model, after the optimizer is built and before DistributedDataParallel, so FP8 layer
    swaps are seen by both. Returns the (possibly replaced) model and optimizer and a zero-argument factory of
    the context manager to run forward passes and losses under. ``optimizer`` is ``None`` for evaluation.
    ``fp8_recipe`` (the config's ``fp8`` section: gradient format, amax history, margin) applies to the FP8 levels;
    evaluation must get the training run's, since the amax-history length shapes the checkpoint's buffers.
    """
    key = precision.lower()
    if key == "fp32":
        return model, optimizer, contextlib.nullcontext
    if key == "bf16":
        device_type = _device_type(model)
        return model, optimizer, lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    if key in ("fp8-o1", "fp8-o2", "fp8-o3"):
        from swinlab import fp8  # imported on use: fp32/bf16 runs do not load the FP8 package

        options = dataclasses.asdict(fp8_recipe or FP8Config())
        model, optimizer = fp8.initialize(model, optimizer, opt_level=key[-2:].upper(), **options)
        return model, optimizer, contextlib.nullcontext
    raise ValueError(f"unknown precision {precision!r} (choose one of {', '.join(PRECISIONS)})")


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """What a checkpoint stores for ``optimizer``; call it on every rank (FP8 O3 gathers the ranks' shards)."""
    from swinlab.fp8.shard import optimizer_state_dict as gather

    return gather(optimizer)


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state_dict` (each FP8 O3 rank takes its own shard back)."""
    from swinlab.fp8.shard import load_optimizer_state_dict as load

    load(optimizer, state)
