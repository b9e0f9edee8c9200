"""FP8-LM's low-precision optimizers (O1/O2): AdamW and SGD-momentum with scaled FP8/FP16 states and masters.

Precision decoupling (FP8-LM §3.2, MS-AMP's ``LBAdamW``): each variable of the update gets the cheapest format
that does not hurt it. At O2 the first moment is E4M3 with a per-tensor scale (it only sets a direction), the
second moment FP16 with a per-tensor scale (it divides, so it needs range and mantissa), and the master weights
FP16 with a per-tensor scale (updates smaller than E4M3's spacing would be lost). O1 keeps both moments in FP32.

Which parameters get these formats: the ones an FP8 GEMM reads (:class:`~swinlab.fp8.FP8Linear` weights,
marked ``param.fp8_weight``). Their ``.data`` *becomes* the master payload (``values * param.master_scale``), as
in MS-AMP, so no FP32 copy survives beside it; the layer rescales the payload straight to FP8. Every other
parameter keeps FP32 math and FP32 moments; one held in BF16/FP16 (a mixed-precision model) gets an FP32 master
copy in the state (``"master"``), the classic mixed-precision optimizer.

A step reads the gradient from ``param.fp8_grad`` (the E4M3 :class:`ScaledFP8` an FP8Linear leaves with
``grad_mode="fp8"``) or ``param.grad``, does the update in FP32 with the same operations as
``torch.optim.AdamW`` / ``torch.optim.SGD`` (so an all-FP32 configuration matches them), and stores every state
again with a *current* power-of-two scale from its new amax (margin 0; MS-AMP's two-pass kernel computes the same).
Before anything is written all gradients are checked: one Inf/NaN (an FP8 gradient's poisoned scale included)
skips the whole step, so states, scales and weights never see a non-finite value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from swinlab.fp8.formats import amax, storage_format
from swinlab.fp8.tensor import ScaledFP8, quantize_current

ROLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2)


def _check_dtype(role: str, dtype: torch.dtype) -> torch.dtype:
    if dtype not in ROLE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in ROLE_DTYPES)
        raise TypeError(f"{role} must be one of {names}; got {dtype!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fp8_grad(param: torch.Tensor) -> ScaledFP8 | None:
    return getattr(param, "fp8_grad", None)


def _has_grad(param: torch.Tensor) -> bool:
    return _fp8_grad(param) is not None or param.grad is not None


def _grad_values(param: torch.Tensor) -> torch.Tensor:
    """The gradient in FP32: the dequantised FP8 gradient if the layer left one, else ``.grad``."""
    fp8 = _fp8_grad(param)
    if fp8 is not None:
        return fp8.dequantize()
    return param.grad if param.grad.dtype == torch.float32 else param.grad.float()


def _read(state: dict[str, Any], key: str) -> torch.Tensor:
    """A state slot's values in FP32; an FP32 slot is returned itself so the update runs in place on it."""
    payload = state[key]
    fmt = storage_format(payload.dtype)
    if fmt is not None:
        return ScaledFP8(payload, state[key + "_scale"], fmt).dequantize()
    return payload if payload.dtype == torch.float32 else payload.float()


def _write(state: dict[str, Any], key: str, values: torch.Tensor) -> None:
    """Store ``values`` back into a slot in its dtype (scaled formats re-derive their scale from the new amax)."""
    payload = state[key]
    if values is payload:
        return
    fmt = storage_format(payload.dtype)
    if fmt is None:
        payload.copy_(values)
        return
    q = quantize_current(values, fmt, state[key + "_scale"])
    state[key], state[key + "_scale"] = q.data, q.scale


def _new_slot(state: dict[str, Any], key: str, values: torch.Tensor, dtype: torch.dtype) -> None:
    """Create a slot holding ``values`` (FP32) in ``dtype``, with a scale if ``dtype`` needs one."""
    fmt = storage_format(dtype)
    if fmt is None:
        state[key] = values.to(dtype, copy=True)
        return
    q = quantize_current(values, fmt)
    state[key], state[key + "_scale"] = q.data, q.scale


def _total_norm(params: list[torch.Tensor], norms: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients. A parameter that is one rank's shard of a weight (``param.fp8_shard``, set by FP8
    O3) adds its squared norm summed over the shard's process group, so every rank clips by the same global norm."""
    sharded = [getattr(p, "fp8_shard", None) for p in params]
    groups = {id(spec.group): spec.group for spec in sharded if spec is not None}
    if not groups:
        return torch.linalg.vector_norm(torch.stack(norms))  # torch.nn.utils.clip_grad_norm_'s formula
    squares = torch.stack(norms).square()
    if len(groups) > 1:
        raise ValueError("clip_grad_norm_: sharded parameters from more than one process group")
    mask = torch.tensor([spec is not None for spec in sharded], device=squares.device)
    shard_sum = squares[mask].sum()
    torch.distributed.all_reduce(shard_sum, group=next(iter(groups.values())))
    return (shard_sum + squares[~mask].sum()).sqrt()


class LowPrecisionOptimizer(torch.optim.Optimizer):
    """What FP8AdamW and FP8SGD share: master weights, gradient intake, the finite check, clipping, state dicts.

    ``master_dtype`` is the storage of FP8 weights (``param.fp8_weight``); ``state_dtypes`` maps each moment's
    state key to its dtype for those weights (other parameters keep FP32 moments).
    """

    HYPERPARAMETERS: tuple[str, ...] = ()
    """The group keys the subclass's update reads (what :func:`convert_optimizer` keeps from torch's groups)."""
    MOMENTS_AT_INIT: tuple[str, ...] = ()
    """State slots created (zero) at a parameter's first step."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        master_dtype: torch.dtype,
        state_dtypes: dict[str, torch.dtype],
    ) -> None:
        super().__init__(params, defaults)
        self.master_dtype = _check_dtype("master_dtype", master_dtype)
        self.state_dtypes = {key: _check_dtype(key, dtype) for key, dtype in state_dtypes.items()}
        self.skipped_steps = 0
        for param in self._params():
            if getattr(param, "fp8_weight", False):
                self._make_master(param)

    def _params(self) -> Iterable[torch.Tensor]:
        return chain.from_iterable(group["params"] for group in self.param_groups)

    # -- master weights ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _make_master(self, param: torch.Tensor) -> None:
        """Turn an FP8 weight's data into the master payload (``values * master_scale`` when scaled)."""
        if param.grad is not None or _fp8_grad(param) is not None:
            raise ValueError("build the FP8 optimizer before the first backward (a weight already has a gradient)")
        values = self._master_values(param, {})
        fmt = storage_format(self.master_dtype)
        if fmt is None:
            param.data = values.to(self.master_dtype)
            if hasattr(param, "master_scale"):
                del param.master_scale
        else:
            q = quantize_current(values, fmt)
            param.data, param.master_scale = q.data, q.scale
        # An autograd gradient (FP8Linear's grad_mode="dequantized") stays FP32 whatever the master's dtype.
        param.grad_dtype = torch.float32

    def _master_values(self, param: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """The weight's values in FP32 (the parameter itself when it is FP32, so the update runs in place)."""
        scale = getattr(param, "master_scale", None)
        if scale is not None:
            return ScaledFP8(param.data, scale, storage_format(param.dtype)).dequantize()
        if "master" in state:
            return state["master"]
        return param.data if param.dtype == torch.float32 else param.data.float()

    def _store_master(self, param: torch.Tensor, state: dict[str, Any], values: torch.Tensor) -> None:
        scale = getattr(param, "master_scale", None)
        if scale is not None:
            q = quantize_current(values, storage_format(param.dtype), scale)
            param.data.copy_(q.data)
            scale.copy_(q.scale)
        elif values is not param.data:
            param.data.copy_(values)

    def _init_state(self, param: torch.Tensor, state: dict[str, Any]) -> None:
        """Empty moments in their dtypes; an FP32 master copy for a low-precision non-FP8 parameter."""
        state["step"] = torch.zeros((), dtype=torch.float32)
        if not getattr(param, "fp8_weight", False) and param.dtype != torch.float32:
            state["master"] = param.detach().float()
        zeros = torch.zeros_like(param, dtype=torch.float32)
        for key in self.MOMENTS_AT_INIT:
            _new_slot(state, key, zeros, self._dtype_for(param, key))

    def _dtype_for(self, param: torch.Tensor, key: str) -> torch.dtype:
        return self.state_dtypes[key] if getattr(param, "fp8_weight", False) else torch.float32

    # -- gradients -----------------------------------------------------------------------------------------
    def _grads_finite(self) -> bool:
        """One host sync: are all gradients (FP8 payloads and scales included) finite?"""
        flags = []
        for param in self._params():
            fp8 = _fp8_grad(param)
            # amax propagates Inf/NaN and, on FP8 payloads, is one pass over the bytes (isnan there is ~5x slower).
            if fp8 is not None:
                flags.append(torch.isfinite(fp8.scale) & torch.isfinite(amax(fp8.data)))
            elif param.grad is not None:
                flags.append(torch.isfinite(amax(param.grad)))
        return bool(torch.stack(flags).all()) if flags else True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over all gradients, FP8 ones included; returns the total L2 norm.

        An FP8 gradient is scaled by editing its scale only (``values = payload / scale``), as in MS-AMP. The norm
        is non-finite if any gradient is, which is how a training loop decides to skip the step.
        """
        norms, params = [], [p for p in self._params() if _has_grad(p)]
        for param in params:
            fp8 = _fp8_grad(param)
            if fp8 is not None:
                norms.append(torch.linalg.vector_norm(fp8.data.float()) * fp8.scale_inv)
            else:
                norms.append(torch.linalg.vector_norm(param.grad, dtype=torch.float32))
        if not norms:
            return torch.zeros(())
        total = _total_norm(params, norms)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for param in params:
            fp8 = _fp8_grad(param)
            if fp8 is not None:
                param.fp8_grad = ScaledFP8(fp8.data, fp8.scale / coef, fp8.fmt)
            else:
                param.grad.mul_(coef.to(param.grad.dtype))
        return total

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` as torch does and drop FP8 gradients (an FP8Linear would otherwise accumulate)."""
        super().zero_grad(set_to_none=set_to_none)
        for param in self._params():
            if _fp8_grad(param) is not None:
                param.fp8_grad = None

    # -- the step --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter with a gradient, or none at all if any gradient is non-finite."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:
            for param in group["params"]:
                if not _has_grad(param):
                    continue
                state = self.state[param]
                if not state:
                    self._init_state(param, state)
                grad = _grad_values(param)
                master = self._master_values(param, state)
                self._update(group, state, param, grad, master)
                self._store_master(param, state, master)
        return loss

    def _update(
        self, group: dict[str, Any], state: dict[str, Any], param: torch.Tensor, grad: torch.Tensor,
        master: torch.Tensor,
    ) -> None:
        raise NotImplementedError

    # -- state dicts -----------------------------------------------------------------------------------------
    def _formats(self) -> dict[str, Any]:
        roles = {"master": self.master_dtype, **self.state_dtypes}
        return {"kind": type(self).__name__, "dtypes": {k: _dtype_name(v) for k, v in roles.items()}}

    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state``, ``param_groups``) with payloads in their own dtypes, plus ``fp8``: the
        optimizer kind, the per-role dtypes (checked on load) and the skipped-step count."""
        return {**super().state_dict(), "fp8": {**self._formats(), "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by the same kind of optimizer with the same per-role dtypes, payloads bit for bit.

        Raises ValueError for a state from a plain torch optimizer or with other dtypes (e.g. an O2 state, with
        its E4M3 first moment, loaded into an O1 optimizer, or the reverse).
        """
        saved = state_dict.get("fp8")
        if saved is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this is not an FP8 optimizer state (no 'fp8' entry); "
                "it comes from a plain torch optimizer, e.g. an fp32/bf16 run, which an FP8 run cannot resume"
            )
        mine = self._formats()
        if {k: saved[k] for k in mine} != mine:
            raise ValueError(
                f"optimizer state was saved by {saved['kind']} with dtypes {saved['dtypes']}, but this is "
                f"{mine['kind']} with dtypes {mine['dtypes']} (e.g. FP8-LM O1 keeps FP32 moments, O2 an E4M3 first "
                "and FP16 second moment); resume with the opt_level the state was saved at"
            )
        # torch's loader would cast every state tensor to its parameter's dtype (an E4M3 moment to FP16):
        # let it map the groups only, then restore the states as stored.
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        for index, param in zip(saved_ids, self._params(), strict=True):
            if index in state_dict["state"]:
                self.state[param] = {
                    k: v.detach().clone().to(param.device) if k != "step" else v.detach().clone()
                    for k, v in state_dict["state"][index].items()
                }
        self.skipped_steps = int(saved["skipped_steps"])


class FP8AdamW(LowPrecisionOptimizer):
    """AdamW (decoupled weight decay) with per-role storage; defaults are FP8-LM O2.

    ``master_dtype``, ``m1_dtype`` (first moment ``exp_avg``) and ``m2_dtype`` (second moment ``exp_avg_sq``)
    apply to FP8 weights; all of FP32/BF16/FP16/E4M3/E5M2 are accepted, so the precision-decoupling negative
    controls (E4M3 master, FP8 second moment) are one argument away. Param groups, per-group ``lr`` /
    ``weight_decay`` and extra keys (e.g. the engine's ``lr_scale``) behave as in ``torch.optim.AdamW``.
    """

    HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
    MOMENTS_AT_INIT = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        master_dtype: torch.dtype = torch.float16,
        m1_dtype: torch.dtype = torch.float8_e4m3fn,
        m2_dtype: torch.dtype = torch.float16,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, master_dtype, {"exp_avg": m1_dtype, "exp_avg_sq": m2_dtype})

    def _update(self, group, state, param, grad, master) -> None:
        # The operations and their order are torch.optim.AdamW's single-tensor path.
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        state["step"] += 1
        master.mul_(1 - lr * group["weight_decay"])
        exp_avg, exp_avg_sq = _read(state, "exp_avg"), _read(state, "exp_avg_sq")
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(state["step"])
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        master.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        _write(state, "exp_avg", exp_avg)
        _write(state, "exp_avg_sq", exp_avg_sq)


class FP8SGD(LowPrecisionOptimizer):
    """SGD with (Nesterov) momentum as ``torch.optim.SGD``; the momentum buffer is the first-moment role
    (``m1_dtype``, E4M3 + scale by default) and FP8 weights are masters in ``master_dtype``."""

    HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        master_dtype: torch.dtype = torch.float16,
        m1_dtype: torch.dtype = torch.float8_e4m3fn,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        defaults = {
            "lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
            "nesterov": nesterov,
        }  # fmt: skip
        super().__init__(params, defaults, master_dtype, {"momentum_buffer": m1_dtype})

    def _update(self, group, state, param, grad, master) -> None:
        # torch.optim.SGD's single-tensor path; the buffer starts as the first gradient.
        if group["weight_decay"] != 0:
            grad = grad.add(master, alpha=group["weight_decay"])
        momentum = group["momentum"]
        state["step"] += 1
        if momentum != 0:
            if "momentum_buffer" not in state:
                _new_slot(state, "momentum_buffer", grad, self._dtype_for(param, "momentum_buffer"))
                buf = grad
            else:
                buf = _read(state, "momentum_buffer")
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                _write(state, "momentum_buffer", buf)
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        master.add_(grad, alpha=-group["lr"])


def check_convertible(optimizer: torch.optim.Optimizer) -> type[LowPrecisionOptimizer]:
    """The FP8 class :func:`convert_optimizer` would build for ``optimizer``; raises what it would raise."""
    if isinstance(optimizer, LowPrecisionOptimizer):
        raise TypeError(f"{type(optimizer).__name__} is already an FP8 optimizer; pass the torch optimizer")
    if isinstance(optimizer, torch.optim.AdamW):
        kind: type[LowPrecisionOptimizer] = FP8AdamW
        unsupported = ("amsgrad", "maximize")
    elif isinstance(optimizer, torch.optim.SGD):
        kind, unsupported = FP8SGD, ("maximize",)
    else:
        raise TypeError(
            f"FP8 O1/O2 can convert torch.optim.AdamW and torch.optim.SGD, not {type(optimizer).__name__}; "
            "build one of those (or swinlab.fp8.FP8AdamW / FP8SGD directly)"
        )
    if optimizer.state:
        raise ValueError("convert the optimizer before its first step (it already holds state)")
    for option in unsupported:
        if any(group.get(option) for group in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__}({option}=True) has no FP8 counterpart")
    return kind


def convert_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    master_dtype: torch.dtype,
    m1_dtype: torch.dtype,
    m2_dtype: torch.dtype,
) -> LowPrecisionOptimizer:
    """The FP8 twin of a ``torch.optim.AdamW`` or ``torch.optim.SGD``: same parameters, groups and
    hyper-parameters (torch-only switches such as ``fused``/``foreach`` dropped), given per-role dtypes.

    Raises TypeError for other optimizer types and ValueError for options the FP8 step does not implement
    (``amsgrad``, ``maximize``) or an optimizer that already holds state.
    """
    kind = check_convertible(optimizer)
    roles = {"master_dtype": master_dtype, "m1_dtype": m1_dtype}
    if kind is FP8AdamW:
        roles["m2_dtype"] = m2_dtype
    own_keys = set(kind.HYPERPARAMETERS)
    torch_only = set(optimizer.defaults) - own_keys
    groups = [{k: v for k, v in group.items() if k not in torch_only} for group in optimizer.param_groups]
    defaults = {k: v for k, v in optimizer.defaults.items() if k in own_keys}
    return kind(groups, **defaults, **roles)
