"""Optimizers with the official Swin weight-decay split.

Norm weights, biases, position-bias tables, the continuous-position-bias MLP and the cosine-attention
``logit_scale`` are excluded from weight decay: decaying them pulls scales and biases towards zero for no
regularisation benefit. ``logit_scale`` has shape ``(heads, 1, 1)``, so the ``ndim <= 1`` rule alone misses
it; the model's ``no_weight_decay_keywords()`` catches it by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from swinlab.config import OptimConfig
from swinlab.tasks.base import Task


def _model_names(model: nn.Module, method: str) -> set[str]:
    fn = getattr(model, method, None)
    return set(fn()) if callable(fn) else set()


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_mult: Mapping[str, float] | None = None,
    select: Callable[[str], bool] | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters by weight decay and learning-rate multiplier (empty groups dropped).

    No decay for: ``ndim <= 1`` (norms, biases, ``q_bias``/``v_bias``), parameters flagged
    ``param.no_weight_decay = True`` by their layer (GMConv's sigma, whatever model hosts it), exact names in
    ``model.no_weight_decay()``, names containing any of ``model.no_weight_decay_keywords()``.
    Models without those methods just get the ``ndim`` rule. ``lr_mult`` maps a name substring to a factor on
    the scheduled learning rate (e.g. ``{"log_sigma": 10}`` for GMConv's sigmas, which barely move at the base
    rate); each group carries it as ``lr_scale``, which the loop applies at every step. ``select``: only the
    parameters whose names it accepts (one of a task's several optimizers).
    """
    lr_mult = dict(lr_mult or {})
    for key, factor in lr_mult.items():
        if factor <= 0:
            raise ValueError(f"optim.lr_mult[{key!r}] must be positive, got {factor}")
    skip_names = _model_names(model, "no_weight_decay")
    skip_keywords = _model_names(model, "no_weight_decay_keywords")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or (select is not None and not select(name)):
            continue
        exempt = (
            param.ndim <= 1
            or getattr(param, "no_weight_decay", False)
            or name in skip_names
            or any(kw in name for kw in skip_keywords)
        )
        scale = next((factor for key, factor in lr_mult.items() if key in name), 1.0)
        groups.setdefault((exempt, scale), []).append(param)
    return [
        {"params": params, "weight_decay": 0.0 if exempt else weight_decay, "lr_scale": scale}
        for (exempt, scale), params in sorted(groups.items())
    ]


_FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _fused_adamw_applies(groups: list[dict[str, Any]]) -> bool:
    """The fused AdamW kernel updates all parameters in one pass (on CPU ~5x faster than torch's default
    per-parameter loop for a 28M-parameter Swin); it needs floating-point parameters on a supported device."""
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in _FUSED_ADAMW_DEVICES for p in params)


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, select: Callable[[str], bool] | None = None
) -> torch.optim.Optimizer:
    """AdamW, or SGD with Nesterov momentum as the official recipes, over :func:`param_groups`.

    The learning rate given here is only a placeholder: the schedule sets it before every step.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.lr_mult, select)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    name = cfg.name.lower()
    if name == "adamw":
        fused = _fused_adamw_applies(groups)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    raise ValueError(f"unknown optimizer {cfg.name!r} (choose 'adamw' or 'sgd')")


def build_optimizers(model: nn.Module, task: Task, default: OptimConfig) -> dict[str, torch.optim.Optimizer]:
    """The optimizers ``task`` declares (:meth:`~swinlab.tasks.Task.optimizers`), each over its parameters with
    its own recipe (``default``, the run's ``optim`` section, where the task gives none).

    Every trainable parameter must fall to exactly one optimizer: one left out would silently never train, one
    in two would be updated twice.
    """
    specs = task.optimizers(model)
    if not specs:
        raise ValueError(f"{type(task).__name__}.optimizers() declares no optimizer")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    owners = {name: [key for key, spec in specs.items() if spec.params(name)] for name in trainable}
    orphans = [name for name, keys in owners.items() if not keys]
    shared = [f"{name} ({', '.join(keys)})" for name, keys in owners.items() if len(keys) > 1]
    if orphans or shared:
        problems = ([f"in no optimizer: {', '.join(orphans[:5])}"] if orphans else []) + (
            [f"in several: {', '.join(shared[:5])}"] if shared else []
        )
        raise ValueError(f"{type(task).__name__}.optimizers(): trainable parameters {'; '.join(problems)}")
    empty = [key for key, spec in specs.items() if not any(spec.params(name) for name in trainable)]
    if empty:
        names = ", ".join(map(repr, empty))
        raise ValueError(f"{type(task).__name__}.optimizers(): {names} selects no trainable parameter")
    return {key: build_optimizer(model, spec.config or default, spec.params) for key, spec in specs.items()}
