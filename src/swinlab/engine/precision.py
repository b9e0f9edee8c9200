"""The precision seam: one place that turns ``cfg.precision`` into a prepared model/optimizer and an autocast.

``fp32`` and ``bf16`` (autocast on the model's device type) need nothing else. The FP8 levels (FP8-LM's
O1/O2/O3) hand model and optimizer to ``swinlab.fp8.initialize``, which swaps layers/optimizer state; until
that package exists (issue 3) they fail loudly instead of silently training in another precision.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

AutocastFactory = Callable[[], AbstractContextManager[object]]

PRECISIONS = ("fp32", "bf16", "fp8-o1", "fp8-o2", "fp8-o3")


def _device_type(model: nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


def _fp8_initialize(model: nn.Module, optimizer: torch.optim.Optimizer | None, level: str):
    try:
        fp8 = importlib.import_module("swinlab.fp8")
    except ImportError as e:
        if e.name not in ("swinlab.fp8", "swinlab"):
            raise
        raise NotImplementedError(
            f"precision 'fp8-{level.lower()}' needs swinlab.fp8 (FP8-LM O1/O2/O3), which is planned "
            "(issue 3) but not implemented yet; use precision 'bf16' or 'fp32'"
        ) from None
    return fp8.initialize(model, optimizer, opt_level=level)


def wrap(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, precision: str
) -> tuple[nn.Module, torch.optim.Optimizer | None, AutocastFactory]:
    """Prepare ``model``/``optimizer`` for ``precision`` (see :data:`PRECISIONS`).

    Call it on the plain model, after the optimizer is built and before DistributedDataParallel, so FP8 layer
    swaps are seen by both. Returns the (possibly replaced) model and optimizer and a zero-argument factory of
    the context manager to run forward passes and losses under. ``optimizer`` is ``None`` for evaluation.
    """
    key = precision.lower()
    if key == "fp32":
        return model, optimizer, contextlib.nullcontext
    if key == "bf16":
        device_type = _device_type(model)
        return model, optimizer, lambda: torch.autocast(device_type, dtype=torch.bfloat16)
    if key in ("fp8-o1", "fp8-o2", "fp8-o3"):
        model, optimizer = _fp8_initialize(model, optimizer, key[-2:].upper())
        return model, optimizer, contextlib.nullcontext
    raise ValueError(f"unknown precision {precision!r} (choose one of {', '.join(PRECISIONS)})")
