"""The faster DARTS super-net paths give the official numbers bit for bit (a second-order α step amplifies any
rounding difference by 1 / 2R, so "close" is not enough): MixedOp against the plain official sum."""

from __future__ import annotations

import pytest
import torch

from swinlab.nas import PRIMITIVES, MixedOp


def _official_sum(op: MixedOp, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return sum(w * o(x) for w, o in zip(weights, op._ops, strict=True))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("primitives", [PRIMITIVES, ["max_pool_3x3", "none", "sep_conv_3x3"]])
def test_mixed_op_is_bit_exact_to_the_official_sum(stride, primitives):
    op = MixedOp(6, stride, primitives)
    x = torch.randn(3, 6, 10, 10, requires_grad=True)
    alpha = torch.randn(len(primitives), requires_grad=True)
    grad_out = torch.randn(3, 6, 10 // stride, 10 // stride)
    results = []
    for forward in (op.forward, lambda x, w: _official_sum(op, x, w)):
        out = forward(x, torch.softmax(alpha, -1))
        grads = torch.autograd.grad(out, [x, alpha, *op.parameters()], grad_out)
        results.append((out, *grads))
    for ours, official in zip(*results, strict=True):
        assert torch.equal(ours, official)
