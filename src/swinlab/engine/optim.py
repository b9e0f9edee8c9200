"""Optimizers with the official Swin weight-decay split and layer-wise learning-rate decay.

Norm weights, biases, position-bias tables, the continuous-position-bias MLP and the cosine-attention
``logit_scale`` are excluded from weight decay: decaying them pulls scales and biases towards zero for no
regularisation benefit. ``logit_scale`` has shape ``(heads, 1, 1)``, so the ``ndim <= 1`` rule alone misses
it; the model's ``no_weight_decay_keywords()`` catches it by name.

Layer-wise learning-rate decay (``optim.layer_decay``, SimMIM / BEiT fine-tuning): a pre-trained encoder's early
blocks hold generic features worth keeping, so each parameter's rate is scaled by ``decay ** (last_id - id)``
with ``id`` its depth in the network, counted per block as the official SimMIM code (:func:`swin_layer_ids`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from swinlab.config import OptimConfig
from swinlab.models.swin import SwinStage
from swinlab.tasks.base import Task


def _model_names(model: nn.Module, method: str) -> set[str]:
    fn = getattr(model, method, None)
    return set(fn()) if callable(fn) else set()


def _swin_stacks(model: nn.Module) -> list[tuple[str, list[int]]]:
    """``(prefix, depths)`` of every stack of Swin stages in ``model`` (``prefix`` ends with ``.`` or is empty)."""
    return [
        (f"{name}." if name else "", [len(stage.blocks) for stage in module.layers])
        for name, module in model.named_modules()
        if isinstance(getattr(module, "layers", None), nn.ModuleList)
        and len(module.layers) > 0
        and all(isinstance(stage, SwinStage) for stage in module.layers)
    ]


def swin_layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """The official SimMIM layer id of every parameter of a Swin model (2D or video; a SimMIM wrapper's ``encoder``
    too) and the largest id, ``sum(depths) + 1``.

    Relative to the Swin module (the one holding ``patch_embed`` and the ``layers`` stages): ``patch_embed.*`` and
    ``mask_token`` are 0; block ``j`` of stage ``i`` is its 1-based index over all blocks, ``sum(depths[:i]) + j +
    1`` (an extra norm after it shares its id); stage ``i``'s ``downsample`` that of the stage's last block,
    ``sum(depths[:i + 1])``; everything else (``absolute_pos_embed``, the final ``norm``, heads, a decoder outside
    the Swin module) the largest id, so it keeps the full rate.
    """
    stacks = _swin_stacks(model)
    if len(stacks) != 1:
        found = "no Swin stages" if not stacks else f"{len(stacks)} stacks of Swin stages"
        raise ValueError(
            f"optim.layer_decay needs per-block layer ids, which swinlab defines for Swin models (2D, video, and the "
            f"SimMIM encoder); {type(model).__name__} has {found}: set optim.layer_decay=1"
        )
    prefix, depths = stacks[0]
    last = sum(depths) + 1
    starts = [sum(depths[:i]) for i in range(len(depths))]
    pattern = re.compile(r"layers\.(\d+)\.(blocks|extra_norms|downsample)\.(\d+)?")
    ids = {}
    for name, _ in model.named_parameters():
        local = name[len(prefix) :] if name.startswith(prefix) else None
        if local is None:
            ids[name] = last
        elif local.startswith("patch_embed.") or local == "mask_token":
            ids[name] = 0
        elif match := pattern.match(local):
            stage, part, index = int(match[1]), match[2], match[3]
            ids[name] = starts[stage] + depths[stage] if part == "downsample" else starts[stage] + int(index) + 1
        else:
            ids[name] = last
    return ids, last


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_mult: Mapping[str, float] | None = None,
    select: Callable[[str], bool] | None = None,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Split trainable parameters by weight decay and learning-rate multiplier (empty groups dropped).

    No decay for: ``ndim <= 1`` (norms, biases, ``q_bias``/``v_bias``), parameters flagged
    ``param.no_weight_decay = True`` by their layer (GMConv's sigma, whatever model hosts it), exact names in
    ``model.no_weight_decay()``, names containing any of ``model.no_weight_decay_keywords()``.
    Models without those methods just get the ``ndim`` rule. ``lr_mult`` maps a name substring to a factor on
    the scheduled learning rate (e.g. ``{"log_sigma": 10}`` for GMConv's sigmas, which barely move at the base
    rate); each group carries it as ``lr_scale``, which the loop applies at every step. ``select``: only the
    parameters whose names it accepts (one of a task's several optimizers). ``layer_decay`` < 1 multiplies each
    parameter's scale by ``layer_decay ** (largest id - its id)`` (:func:`swin_layer_ids`).
    """
    lr_mult = dict(lr_mult or {})
    for key, factor in lr_mult.items():
        if factor <= 0:
            raise ValueError(f"optim.lr_mult[{key!r}] must be positive, got {factor}")
    if not 0 < layer_decay <= 1:
        raise ValueError(f"optim.layer_decay must be in (0, 1], got {layer_decay}")
    layer_ids, last = swin_layer_ids(model) if layer_decay != 1 else ({}, 0)
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
        scale *= layer_decay ** (last - layer_ids.get(name, last))
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
    groups = param_groups(model, cfg.weight_decay, cfg.lr_mult, select, cfg.layer_decay)
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
