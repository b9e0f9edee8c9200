"""``memory_report(model, optimizer)``: persistent training memory in bytes per parameter, by role, measured.

The report walks the live tensors, not a formula: every parameter, its ``.grad`` and FP8 ``fp8_grad``, its
master scale, its optimizer state and the FP8 layers' scaling buffers, each counted by the storage it really
occupies (``untyped_storage().nbytes()``), each storage once (tied weights, shared scales, views). Call it after
a training step (gradients still alive) to see what a step keeps resident; activations and the transient FP8
copies a forward makes are not persistent and not counted.

Roles (FP8-LM / ZeRO accounting, see ``reference/fp8.md`` §5): ``weights`` (what the forward reads; for an FP8
weight this is the FP16 master itself), ``gradients``, ``master_weights`` (a separate higher-precision copy, as
BF16 mixed precision keeps), ``optimizer_states`` (moments, momentum buffers, step counters) and
``scale_metadata`` (per-tensor scales, amax histories). Scopes: ``model`` (all parameters) and ``fp8_linears``
(the weight matrices of :class:`FP8Linear` layers with their scaling buffers; their biases stay with ``model``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from swinlab.fp8.linear import FP8Linear

ROLES = ("weights", "gradients", "master_weights", "optimizer_states", "scale_metadata")


@dataclass
class ScopeMemory:
    """Bytes per role over ``params`` parameter elements."""

    params: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def per_param(self, role: str | None = None) -> float:
        """Bytes per parameter of one role, or of all roles together (``role=None``)."""
        value = self.total if role is None else self.bytes[role]
        return value / self.params if self.params else 0.0


@dataclass
class MemoryReport:
    scopes: dict[str, ScopeMemory]
    other_buffers: int
    """Bytes of module buffers that are not FP8 scaling state (e.g. index tables); not in any total."""

    def __getitem__(self, scope: str) -> ScopeMemory:
        return self.scopes[scope]

    def __str__(self) -> str:
        names = [name for name, scope in self.scopes.items() if scope.params]
        lines = [f"{'bytes/param':<18}" + "".join(f"{name:>14}" for name in names)]
        for role in (*ROLES, None):
            label = role or "total"
            lines.append(f"{label:<18}" + "".join(f"{self.scopes[n].per_param(role):>14.3f}" for n in names))
        lines.append(f"{'parameters':<18}" + "".join(f"{self.scopes[n].params:>14,}" for n in names))
        return "\n".join(lines)


class _Storages:
    """Counts each distinct storage once."""

    def __init__(self) -> None:
        self.seen: set[tuple[torch.device, int]] = set()

    def __call__(self, tensor: torch.Tensor | None) -> int:
        if tensor is None:
            return 0
        storage = tensor.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in self.seen:
            return 0
        self.seen.add(key)
        return storage.nbytes()


def _state_role(key: str) -> str:
    if key == "master":
        return "master_weights"
    return "scale_metadata" if key.endswith("_scale") else "optimizer_states"


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Measure the resident training state of ``model`` (and ``optimizer``); see the module docstring."""
    count = _Storages()
    model_scope, fp8_scope = ScopeMemory(), ScopeMemory()
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    fp8_weights = {id(layer.weight) for layer in fp8_layers}
    state = optimizer.state if optimizer is not None else {}

    def add(role: str, nbytes: int, in_fp8: bool) -> None:
        model_scope.bytes[role] += nbytes
        if in_fp8:
            fp8_scope.bytes[role] += nbytes

    for param in model.parameters():
        in_fp8 = id(param) in fp8_weights
        # One rank's shard of an FP8 O3 weight stands for the whole weight: bytes/param are then per rank.
        shard = getattr(param, "fp8_shard", None)
        numel = param.numel() if shard is None else shard.numel
        model_scope.params += numel
        fp8_scope.params += numel if in_fp8 else 0
        add("weights", count(param), in_fp8)
        add("gradients", count(param.grad), in_fp8)
        fp8_grad = getattr(param, "fp8_grad", None)
        if fp8_grad is not None:
            add("gradients", count(fp8_grad.data), in_fp8)
            add("scale_metadata", count(fp8_grad.scale), in_fp8)
        add("scale_metadata", count(getattr(param, "master_scale", None)), in_fp8)
        for key, value in state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                add(_state_role(key), count(value), in_fp8)
    for layer in fp8_layers:
        for meta in layer.metas():
            for buffer in meta.buffers():
                add("scale_metadata", count(buffer), True)
    other = sum(count(buffer) for buffer in model.buffers())
    return MemoryReport({"model": model_scope, "fp8_linears": fp8_scope}, other_buffers=other)
