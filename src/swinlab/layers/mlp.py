"""Transformer feed-forward block (key names ``fc1`` / ``fc2`` as in the official checkpoints)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.layers.linear import Linear, _gemm, _records_grad, _takes_onednn, linear_gelu, linear_grads


class _GeluMlp(torch.autograd.Function):
    """``fc2(GELU(fc1(x)))`` on 2D ``x`` as one autograd node, for one reason: the gradient of the hidden
    activation (4x the block's width, its widest tensor) is made here and used only here, so GELU's derivative is
    applied to it in place instead of into a fresh tensor of that size (one allocation and one pass over 4C-wide
    memory less per block; bit-identical to autograd's ops)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, approximate: str, onednn: bool) -> torch.Tensor:
        h = _gemm(x, w1, b1, onednn)
        a = F.gelu(h, approximate=approximate)
        ctx.save_for_backward(x, w1, h, a, w2)
        ctx.approximate, ctx.onednn, ctx.has_bias = approximate, onednn, (b1 is not None, b2 is not None)
        return _gemm(a, w2, b2, onednn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w1, h, a, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        da, dw2, db2 = linear_grads(dy, a, w2, (True, need[3], ctx.has_bias[1] and need[4]), ctx.onednn)
        torch.ops.aten.gelu_backward.grad_input(da, h, approximate=ctx.approximate, grad_input=da)
        dx, dw1, db1 = linear_grads(da, x, w1, (need[0], need[1], ctx.has_bias[0] and need[2]), ctx.onednn)
        return dx, dw1, db1, dw2, db2, None, None


class Mlp(nn.Module):
    """``Linear -> act -> dropout -> Linear -> dropout``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, out_features or in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self.fc1, self.fc2
        if not (type(fc1) is Linear and type(fc2) is Linear and type(self.act) is nn.GELU):  # e.g. FP8Linear swapped in
            return self.drop2(fc2(self.drop1(self.act(fc1(x)))))
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if _records_grad(x, *params) and not (self.training and self.drop1.p > 0) and _fusable(x, *params):
            onednn = _takes_onednn(x, fc1.weight, fc1.bias)  # fc2's operands share its dtype and device (_fusable)
            y = _GeluMlp.apply(x.reshape(-1, x.shape[-1]), *params, self.act.approximate, onednn)
            return self.drop2(torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1])))
        h = linear_gelu(x, fc1.weight, fc1.bias, self.act.approximate)
        return self.drop2(fc2(self.drop1(h)))


def _fusable(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether :class:`_GeluMlp` computes what the plain layers would: one dtype and device, no autocast (which
    would cast inside ``F.linear``), not under ``torch.compile`` (which fuses on its own), not on the meta device
    (shapes only, and no autocast state to ask)."""
    return (
        x.dim() >= 2
        and x.numel() > 0
        and x.device.type != "meta"
        and all(p is None or (p.dtype == x.dtype and p.device == x.device) for p in params)
        and not torch.is_autocast_enabled(x.device.type)
        and not torch.compiler.is_compiling()
    )
