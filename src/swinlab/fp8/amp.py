"""``initialize(model, optimizer, opt_level)``: turn a model's linears into FP8 linears (FP8-LM's levels).

Only O1 exists so far. Layers are swapped in place (parameters are shared, so an optimizer built before the
call keeps training the same tensors), which also makes it work on any ``nn.Module``, not just swinlab models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from swinlab.fp8.linear import ALIGN, FP8Linear

ModuleFilter = Callable[[nn.Module, str], bool]

OPT_LEVELS = ("O1", "O2", "O3")
HEAD_NAMES = frozenset({"head", "fc", "classifier", "lm_head"})
MIN_NUMEL = 64 * 64


def default_filter(module: nn.Module, fqn: str) -> bool:
    """FP8 for a linear unless it is a classifier head or too small/odd-shaped to gain anything.

    Kept in high precision: modules named like a head (``head``, ``fc``, ``classifier``, ``lm_head`` as the last
    or second-to-last path component, e.g. ``head`` or ``head.fc``), linears with fewer than 64x64 weights
    (e.g. SwinV2's continuous position bias MLP), and linears whose dims are not multiples of 16.
    """
    if not isinstance(module, nn.Linear):
        return False
    parts = fqn.split(".")
    if HEAD_NAMES.intersection(parts[-2:]):
        return False
    if module.in_features * module.out_features < MIN_NUMEL:
        return False
    return module.in_features % ALIGN == 0 and module.out_features % ALIGN == 0


def convert_linears(model: nn.Module, module_filter: ModuleFilter = default_filter, **kwargs) -> list[str]:
    """Replace every ``nn.Linear`` accepted by ``module_filter(module, fqn)`` by an FP8Linear; returns their fqns.

    ``kwargs`` go to :meth:`FP8Linear.from_linear`. Layers that already are FP8Linear are left alone.
    """
    chosen = [
        (fqn, module)
        for fqn, module in model.named_modules()
        if type(module) is nn.Linear and fqn and module_filter(module, fqn)
    ]
    for fqn, module in chosen:
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, FP8Linear.from_linear(module, **kwargs))
    return [fqn for fqn, _ in chosen]


def fp8_layers(model: nn.Module) -> list[FP8Linear]:
    return [m for m in model.modules() if isinstance(m, FP8Linear)]


def found_nonfinite(model: nn.Module) -> torch.Tensor:
    """True if any FP8 cast in ``model`` saw Inf/NaN since the last :func:`clear_flags` (bool tensor, no sync).

    The step-skip signal when weight gradients live in ``weight.fp8_grad`` (the engine's own non-finite check
    sees ``.grad`` only, which is enough in ``"dequantized"`` mode: FP8Linear NaN-fills results of bad sources).
    """
    flags = [layer.found_nonfinite() for layer in fp8_layers(model)]
    return torch.stack(flags).any() if flags else torch.zeros((), dtype=torch.bool)


def clear_flags(model: nn.Module) -> None:
    for layer in fp8_layers(model):
        layer.clear_flags()


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    opt_level: str = "O1",
    *,
    module_filter: ModuleFilter | None = None,
    grad_mode: str = "dequantized",
    history_len: int = 16,
    margin: int = 0,
) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """Prepare ``model`` (and ``optimizer``) for FP8 training at ``opt_level``; returns ``(model, optimizer)``.

    Call once, after model and optimizer exist and before DistributedDataParallel. O1: the accepted linears
    (``module_filter``, default :func:`default_filter`) become :class:`FP8Linear`; the optimizer is returned
    unchanged because parameters are shared. ``grad_mode="dequantized"`` (default) hands autograd the
    FP8-quantised weight gradient dequantised, so stock optimizers, gradient clipping, DDP and the engine's
    non-finite check work; ``"fp8"`` keeps it as E4M3 in ``weight.fp8_grad`` for an FP8-aware optimizer.
    """
    level = str(opt_level).upper()
    if level not in OPT_LEVELS:
        raise ValueError(f"unknown opt_level {opt_level!r} (choose one of {', '.join(OPT_LEVELS)})")
    if level != "O1":
        raise NotImplementedError(
            f"FP8 opt_level {level} (FP8 optimizer states{' + sharding' if level == 'O3' else ''}) is not "
            "implemented yet (issue 3, section 2); use O1"
        )
    convert_linears(
        model, module_filter or default_filter, grad_mode=grad_mode, history_len=history_len, margin=margin
    )
    return model, optimizer
