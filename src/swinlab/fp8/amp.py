"""``initialize(model, optimizer, opt_level)``: FP8-LM's levels on any ``nn.Module``.

Layers are swapped in place and share their parameters, so the optimizer built before the call still names the
same tensors; it is then rebuilt as an FP8 optimizer (:mod:`swinlab.fp8.optim`) with the level's storage:

=====  ============  ============  ============  ============  ========================
level  FP8 weight    weight grad   1st moment    2nd moment    bytes/param (FP8 layers)
=====  ============  ============  ============  ============  ========================
O1     FP16 + scale  E4M3 + scale  FP32          FP32          2 + 1 + 4 + 4 = 11
O2     FP16 + scale  E4M3 + scale  E4M3 + scale  FP16 + scale  2 + 1 + 1 + 2 = 6
O3     as O2, each of the four sharded over N ranks            6 / N per rank
=====  ============  ============  ============  ============  ========================

The FP16 weight is the master (as in MS-AMP): no FP32 copy persists beside it. O3 (:mod:`swinlab.fp8.shard`)
needs an initialised process group (torchrun) and replaces each FP8Linear by a ShardedFP8Linear.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from swinlab.fp8.formats import E5M2, SCALING_POLICIES, FP8Format, get_format
from swinlab.fp8.linear import ALIGN, FP8Linear, require_fp8_gemm
from swinlab.fp8.optim import check_convertible, convert_optimizer
from swinlab.fp8.shard import require_process_group, shard_fp8_linears
from swinlab.layers.linear import Linear

ModuleFilter = Callable[[nn.Module, str], bool]

OPT_LEVELS = ("O1", "O2", "O3")
LEVEL_DTYPES: dict[str, dict[str, torch.dtype]] = {
    "O1": {"master_dtype": torch.float16, "m1_dtype": torch.float32, "m2_dtype": torch.float32},
    "O2": {"master_dtype": torch.float16, "m1_dtype": torch.float8_e4m3fn, "m2_dtype": torch.float16},
}
LEVEL_DTYPES["O3"] = LEVEL_DTYPES["O2"]  # O3 = O2's storage, sharded across ranks (swinlab.fp8.shard)
"""Storage of FP8 weights (``master_dtype``) and of their optimizer moments per level (see the table above)."""
HEAD_NAMES = frozenset({"head", "fc", "classifier", "lm_head"})
MIN_NUMEL = 64 * 64


def default_filter(module: nn.Module, fqn: str) -> bool:
    """FP8 for a linear unless it is a classifier head or too small/odd-shaped to gain anything.

    Kept in high precision: modules named like a head (``head``, ``fc``, ``classifier``, ``lm_head`` as the last
    or second-to-last path component, e.g. ``head`` or ``head.fc``), linears with fewer than 64x64 weights or
    a dim below 16 (e.g. SwinV2's continuous position bias MLP, 512 -> heads), and linears whose dims are not
    multiples of 16 (these are named in a warning by :func:`convert_linears`).
    """
    return _kept_because(module, fqn) is None


def _kept_because(module: nn.Module, fqn: str) -> str | None:
    """Why :func:`default_filter` keeps ``module`` in high precision (``None``: it becomes FP8)."""
    if not isinstance(module, nn.Linear):
        return "not a linear"
    if HEAD_NAMES.intersection(fqn.split(".")[-2:]):
        return "head"
    if module.in_features * module.out_features < MIN_NUMEL or min(module.in_features, module.out_features) < ALIGN:
        return "small"
    if module.in_features % ALIGN or module.out_features % ALIGN:
        return "unaligned"
    return None


def model_high_precision(model: nn.Module) -> tuple[str, ...]:
    """The modules a model keeps out of FP8 by its own measured policy: ``model.fp8_high_precision()``, if any.

    Like ``no_weight_decay()`` for weight decay: the model's authors know which of its GEMMs FP8 rounding hurts
    (GPT: its first block, see :meth:`swinlab.models.gpt.GPT.fp8_high_precision`).
    """
    names = getattr(model, "fp8_high_precision", None)
    return tuple(names()) if callable(names) else ()


def _under(fqn: str, prefixes: Sequence[str]) -> bool:
    return any(fqn == p or fqn.startswith(p + ".") for p in prefixes)


def fp8_candidates(
    model: nn.Module, module_filter: ModuleFilter = default_filter, keep: Sequence[str] = ()
) -> list[tuple[str, nn.Linear]]:
    """The ``(fqn, linear)`` pairs :func:`convert_linears` would turn into FP8 (nothing is changed).

    ``keep``: module names (a module and everything in it) left in high precision whatever the filter says; a
    name that is no module of ``model`` is refused. With the default filter, linears kept out only because
    ``_scaled_mm`` needs dims that are multiples of 16 are named in a warning: a model whose big layers silently
    stayed FP32 would neither save memory nor say why.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in keep if name not in modules]
    if unknown:
        raise ValueError(f"FP8: no module named {', '.join(map(repr, unknown))} to keep in high precision")
    linears = [
        (fqn, module)
        for fqn, module in modules.items()
        if type(module) in (nn.Linear, Linear) and fqn and not _under(fqn, keep)
    ]
    if module_filter is default_filter:
        unaligned = [
            f"{fqn} ({module.in_features}->{module.out_features})"
            for fqn, module in linears
            if _kept_because(module, fqn) == "unaligned"
        ]
        if unaligned:
            warnings.warn(
                f"FP8: kept {len(unaligned)} linear(s) in high precision because FP8 GEMMs need in/out features "
                f"that are multiples of {ALIGN}: {', '.join(unaligned)}; a module_filter that accepts them runs "
                "them in FP8 with zero padding",
                stacklevel=3,
            )
    return [(fqn, module) for fqn, module in linears if module_filter(module, fqn)]


def convert_linears(
    model: nn.Module, module_filter: ModuleFilter = default_filter, keep: Sequence[str] = (), **kwargs
) -> list[str]:
    """Replace every ``nn.Linear`` :func:`fp8_candidates` chooses by an FP8Linear; returns their fqns.

    ``kwargs`` go to :meth:`FP8Linear.from_linear`. Layers that already are FP8Linear are left alone.
    """
    return _swap_linears(model, fp8_candidates(model, module_filter, keep), **kwargs)


def _swap_linears(model: nn.Module, chosen: Sequence[tuple[str, nn.Linear]], **kwargs) -> list[str]:
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


def check_untied(model: nn.Module) -> None:
    """Refuse an FP8 weight that another kind of module also uses (e.g. a tied embedding): the FP8 optimizer
    stores it as a scaled FP16 payload, which only FP8Linear knows how to read."""
    owners = {id(layer.weight): name for name, layer in model.named_modules() if isinstance(layer, FP8Linear)}
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in owners:
                raise ValueError(
                    f"{name}.{param_name} is tied to the weight of FP8 layer {owners[id(param)]!r}, which FP8 "
                    "O1/O2 store as a scaled FP16 master; keep that layer out of FP8 with module_filter"
                )


def clear_flags(model: nn.Module) -> None:
    for layer in fp8_layers(model):
        layer.clear_flags()


def initialize(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    opt_level: str = "O1",
    *,
    module_filter: ModuleFilter | None = None,
    grad_mode: str = "fp8",
    history_len: int = 16,
    margin: int = 0,
    grad_format: FP8Format | str = E5M2,
    scaling: str = "delayed",
    high_precision: Sequence[str] | None = None,
    master_dtype: torch.dtype | None = None,
    m1_dtype: torch.dtype | None = None,
    m2_dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Prepare ``model`` and ``optimizer`` for FP8 training at ``opt_level``; returns ``(model, optimizer)``.

    Call once, after model and optimizer exist and the model is on its device, before any wrapper (DDP,
    compile). The linears accepted by
    ``module_filter`` (default :func:`default_filter`) become :class:`FP8Linear`; a ``torch.optim.AdamW`` or
    ``torch.optim.SGD`` is replaced by its FP8 twin (same groups and hyper-parameters) storing FP8 weights and
    moments as :data:`LEVEL_DTYPES` says. ``optimizer`` may also be a list (a task that trains parameter sets with
    several optimizers, e.g. architecture search): each one holding weights of FP8 layers becomes an FP8 twin, the
    others stay as they are (their parameters are not FP8, so FP8-LM's levels change nothing for them); the list
    comes back in the same order. ``master_dtype`` / ``m1_dtype`` / ``m2_dtype`` override the level's
    choice (the precision-decoupling ablations: e.g. ``master_dtype=torch.float8_e4m3fn``). Without an optimizer
    (evaluation) only the layers are swapped. ``grad_format`` is the output gradients' format: E5M2 (FP8-LM,
    range first) or ``"e4m3"`` (its 3 mantissa bits keep the gradient GEMMs within 5 % of FP32, where E5M2's
    rounding alone costs ~5.3 %; ``benchmarks/bench_fp8_gemm.py``). ``grad_mode="fp8"`` leaves weight
    gradients as E4M3 in ``weight.fp8_grad`` (1 B/param); ``"dequantized"`` hands the same quantised values to
    autograd as an FP32 ``.grad`` (4 B/param), for code that only knows ``.grad``. ``scaling`` is the
    activations' and output gradients' scaling policy, ``"delayed"`` (``history_len`` amaxes, FP8-LM) or
    ``"current"`` (see :class:`FP8Linear`). ``high_precision``: module names whose linears stay out of FP8 on top
    of the filter; ``None`` takes the model's own policy (:func:`model_high_precision`: GPT keeps its first
    block, as Megatron-LM's ``first_last_layers_bf16`` does), ``()`` converts every linear the filter accepts.
    """
    level = str(opt_level).upper()
    if level not in OPT_LEVELS:
        raise ValueError(f"unknown opt_level {opt_level!r} (choose one of {', '.join(OPT_LEVELS)})")
    single = optimizer is None or isinstance(optimizer, torch.optim.Optimizer)
    optimizers = ([] if optimizer is None else [optimizer]) if single else list(optimizer)
    sharded = level == "O3" and bool(optimizers)  # evaluation (no optimizer) needs no sharding
    if sharded:
        require_process_group()
        if grad_mode != "fp8":
            raise ValueError("FP8 O3 keeps weight gradients as E4M3 shards: use grad_mode='fp8'")
    overrides = {"master_dtype": master_dtype, "m1_dtype": m1_dtype, "m2_dtype": m2_dtype}
    dtypes = {**LEVEL_DTYPES[level], **{k: v for k, v in overrides.items() if v is not None}}
    if single and optimizers:
        check_convertible(optimizers[0])  # before touching the model, so a refused optimizer leaves it as it was
    grad_format = get_format(grad_format)  # an unknown name fails here, before the model is touched
    if scaling not in SCALING_POLICIES:
        raise ValueError(f"unknown scaling policy {scaling!r} (choose one of {', '.join(SCALING_POLICIES)})")
    for device in {p.device for p in model.parameters()}:
        require_fp8_gemm(device)
    keep = model_high_precision(model) if high_precision is None else tuple(high_precision)
    chosen = fp8_candidates(model, module_filter or default_filter, keep)
    fp8_weights = {id(module.weight) for _, module in chosen}
    # One optimizer is always converted; of several, those that hold FP8 weights (checked, too, before the model
    # is touched).
    convert = [single or any(id(p) in fp8_weights for g in o.param_groups for p in g["params"]) for o in optimizers]
    for opt, yes in zip(optimizers, convert, strict=True):
        if yes and not single:
            check_convertible(opt)
    converted = _swap_linears(
        model,
        chosen,
        grad_mode=grad_mode,
        history_len=history_len,
        margin=margin,
        grad_format=grad_format,
        scaling=scaling,
    )
    if not converted:
        warnings.warn(
            f"FP8 {level}: no linear of the model became FP8 (filter, high_precision={keep}); it trains in high "
            "precision",
            stacklevel=2,
        )
    if optimizers:
        check_untied(model)
        if sharded:
            shard_fp8_linears(model, optimizers)
        optimizers = [convert_optimizer(o, **dtypes) if yes else o for o, yes in zip(optimizers, convert, strict=True)]
    if single:
        return model, (optimizers[0] if optimizers else None)
    return model, optimizers
