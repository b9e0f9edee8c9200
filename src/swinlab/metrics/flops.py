"""Model cost: parameters, FLOPs and training activation memory, measured rather than estimated by formula.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` taught SDPA's CPU kernel and oneDNN's linear
(:func:`flop_counter`); it
counts a multiply-add as 2 FLOPs, so halve the number to compare with papers that quote "GFLOPs" meaning
multiply-accumulates. Activation memory is the size of
the tensors autograd keeps for the backward pass of one training forward, counted once per storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _onednn_linear_flop(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(input_shape) * weight_shape[0]


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts SDPA's CPU kernel and oneDNN's linear (``swinlab.layers.Linear`` on
    CPU), which torch's table leaves out: it would report 0 FLOPs for them and under-count the models against
    peers that use matmuls."""
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
    }
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _onednn_linear_flop
    return FlopCounterMode(display=False, custom_mapping=mapping)


@dataclass(frozen=True)
class ModelCost:
    params: int
    trainable_params: int
    flops_per_sample: float
    """Forward FLOPs for one sample (2 per multiply-add)."""
    activation_bytes_per_sample: float
    """Bytes autograd saves for backward in a training forward, per sample."""
    input_shape: tuple[int, ...]

    def format(self) -> str:
        return "\n".join(
            [
                f"input             {'x'.join(map(str, self.input_shape))}",
                f"params            {self.params / 1e6:.2f} M ({self.trainable_params / 1e6:.2f} M trainable)",
                f"FLOPs / sample    {self.flops_per_sample / 1e9:.3f} GFLOP "
                f"({self.flops_per_sample / 2e9:.3f} GMAC)",
                f"activations       {self.activation_bytes_per_sample / 2**20:.1f} MiB / sample (training, fp32)",
            ]
        )


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def forward_flops(model: nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one eval-mode forward over the batch ``x``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as counter:
            model(x)
    finally:
        model.train(was_training)
    return float(counter.get_total_flops())


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves during one training-mode forward of ``x``."""
    # Storages are told apart by their C++ object (``_cdata``), not by data_ptr(), which is 0 for every tensor on
    # the meta device (where models too big to allocate are measured).
    seen: dict[int, int] = {}
    params = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    was_training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        model.train(was_training)
    return sum(seen.values())


def measure(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> ModelCost:
    """Params, FLOPs and activation memory of ``model`` for inputs of ``input_shape`` (batch first).

    ``dtype`` is the input's: floating inputs are random normal, integer ones (token ids) zeros. A model on the
    meta device is measured without allocating anything (FLOPs and saved-tensor sizes depend on shapes only).
    """
    device = next(model.parameters()).device
    if dtype.is_floating_point:
        x = torch.randn(input_shape, device=device, dtype=dtype)
    else:
        x = torch.zeros(input_shape, device=device, dtype=dtype)
    batch = input_shape[0]
    total, trainable = count_params(model)
    return ModelCost(
        params=total,
        trainable_params=trainable,
        flops_per_sample=forward_flops(model, x) / batch,
        activation_bytes_per_sample=activation_bytes(model, x) / batch,
        input_shape=tuple(input_shape),
    )
