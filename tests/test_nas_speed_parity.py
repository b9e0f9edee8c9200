"""The faster DARTS super-net paths compute the official operations.

MixedOp gives the plain official sum bit for bit. The 1 x 1 convolutions (matrix products) and the dilated depthwise
input gradient (a convolution with the flipped kernel) sum in another order than torch's kernels, so they are checked
in float64 against ``F.conv2d`` and its autograd; in fp32 the second-order α gradient they give is held to the
official code's own distance from float64 by ``benchmarks/bench_darts.py`` and ``tests/test_nas_darts.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swinlab.nas import PRIMITIVES, MixedOp, Network, use_fast_convolutions
from swinlab.nas.model_search import darts_search
from swinlab.nas.operations import DepthwiseConv, PointwiseConv


def _official_sum(op: MixedOp, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return sum(w * o(x) for w, o in zip(weights, op._ops, strict=True))


@pytest.mark.parametrize("stride, size", [(1, 10), (2, 10), (1, 32), (2, 32), (1, 9)])
@pytest.mark.parametrize("primitives", [PRIMITIVES, ["max_pool_3x3", "none", "sep_conv_3x3", "avg_pool_3x3"]])
def test_mixed_op_is_bit_exact_to_the_official_sum(stride, size, primitives):
    """The pools' channels-last kernels included (forward and backward, odd sizes and strides)."""
    op = MixedOp(6, stride, primitives)
    x = torch.randn(3, 6, size, size, requires_grad=True)
    alpha = torch.randn(len(primitives), requires_grad=True)
    grad_out = torch.randn(3, 6, (size - 1) // stride + 1, (size - 1) // stride + 1)
    results = []
    for forward in (op.forward, lambda x, w: _official_sum(op, x, w)):
        out = forward(x, torch.softmax(alpha, -1))
        grads = torch.autograd.grad(out, [x, alpha, *op.parameters()], grad_out)
        results.append((out, *grads))
    for ours, official in zip(*results, strict=True):
        assert torch.equal(ours, official)



def test_mixed_op_pools_have_second_derivatives():
    """Hyper-gradients through the super-net (``create_graph=True``) still work with the pools' own backward."""
    torch.manual_seed(0)
    op = MixedOp(3, 1, ["max_pool_3x3", "avg_pool_3x3"]).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: op(x, w), (x, w))

def _assert_same_convolution(conv: nn.Conv2d, x: torch.Tensor, weight_grad: bool = True) -> None:
    """``conv(x)`` and its input / weight gradients against ``F.conv2d`` with the same settings, in float64."""
    conv = conv.double().requires_grad_(weight_grad)
    x = x.double().requires_grad_()
    inputs = [x, conv.weight] if weight_grad else [x]
    results = []
    for forward in (
        conv,
        lambda x: F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups),
    ):
        out = forward(x)
        results.append((out, *torch.autograd.grad(out, inputs, torch.ones_like(out).cumsum(-1))))
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride, size", [(1, 8), (2, 8), (2, 7)])
def test_pointwise_conv_is_the_1x1_convolution(stride, size):
    _assert_same_convolution(PointwiseConv(5, 6, stride), torch.randn(3, 5, size, size + 1))


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation",
    [(3, 1, 2, 2), (5, 1, 4, 2), (3, 1, 1, 2), (3, 1, 3, 3), (3, 2, 2, 2), (5, 1, 2, 1)],
)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_depthwise_conv_is_the_depthwise_convolution(kernel, stride, padding, dilation, weight_grad):
    """Dilated stride-1 ones take the flipped-kernel input gradient (also alone, as the α-only passes ask);
    strided and undilated ones are torch's own."""
    _assert_same_convolution(DepthwiseConv(4, kernel, stride, padding, dilation), torch.randn(2, 4, 11, 9), weight_grad)


def test_faster_convolutions_keep_the_conv2d_layout_and_errors():
    pointwise, depthwise = PointwiseConv(4, 6, 2), DepthwiseConv(4, 3, 1, 2, 2)
    pointwise.load_state_dict(nn.Conv2d(4, 6, 1, 2, bias=False).state_dict(), strict=True)
    depthwise.load_state_dict(nn.Conv2d(4, 4, 3, 1, 2, 2, groups=4, bias=False).state_dict(), strict=True)
    with pytest.raises(ValueError, match=r"expects \(B, 4, H, W\) input, got \(2, 3, 8, 8\)"):
        pointwise(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="channels"):
        depthwise(torch.randn(2, 3, 8, 8))


def test_use_fast_convolutions_swaps_in_place_and_keeps_the_parameters():
    """Opt-in: the default super-net runs torch's convolutions (the official numbers); the swap changes the module
    types only, so parameters (and any optimizer over them), state-dict keys and outputs stay."""
    net = Network(4, 5, 3, nn.CrossEntropyLoss())
    assert not any(isinstance(m, (PointwiseConv, DepthwiseConv)) for m in net.modules())
    params, keys = [id(p) for p in net.parameters()], list(net.state_dict())
    x = torch.randn(2, 3, 16, 16)
    before = net(x)
    assert use_fast_convolutions(net) is net
    kinds = [type(m) for m in net.modules()]
    assert kinds.count(PointwiseConv) > 0 and kinds.count(DepthwiseConv) > 0
    assert [id(p) for p in net.parameters()] == params and list(net.state_dict()) == keys
    for m in net.modules():  # what is left: the stem, undilated or strided depthwise convolutions
        if type(m) is nn.Conv2d:
            assert m.kernel_size != (1, 1) and not (m.dilation[0] > 1 and m.stride == (1, 1))
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    assert darts_search(C=4, layers=3, fast_convolutions=True).cells[0].preprocess1.op[1].__class__ is PointwiseConv


def test_fast_convolutions_run_under_autocast():
    """Mixed precision: the dilated input gradient works in the dtype autocast ran the forward in and hands back
    gradients in the parameters' and inputs' own dtypes."""
    torch.manual_seed(0)
    for conv in (DepthwiseConv(4, 3, 1, 2, 2), PointwiseConv(4, 6)):
        reference = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, 1, conv.padding, conv.dilation,
                              conv.groups, bias=False)  # fmt: skip
        reference.load_state_dict(conv.state_dict())
        x = torch.randn(2, 4, 9, 9, requires_grad=True)
        grads = []
        for module in (conv, reference):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x)
            assert out.dtype == torch.bfloat16
            grads.append(torch.autograd.grad(out.float().square().sum(), [x, module.weight]))
        for ours, theirs in zip(*grads, strict=True):
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05)


def test_substituted_replaces_by_name_and_puts_back():
    """What the architect evaluates the unrolled and perturbed weights with: the same outputs as ``functional_call``;
    a BN statistic given as ``None`` is absent for the call (batch statistics, nothing updated)."""
    from torch.func import functional_call

    from swinlab.nas.model_search import substituted

    torch.manual_seed(0)
    net = Network(4, 5, 3, nn.CrossEntropyLoss())
    x = torch.randn(2, 3, 16, 16)
    state = {name: p.detach() + 0.01 * torch.randn_like(p) for name, p in net.named_parameters()}
    params = dict(net.named_parameters())
    stats = {name: b.clone() for name, b in net.named_buffers()}
    expected = functional_call(net, {**state, **{n: b.clone() for n, b in stats.items()}}, (x,))
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    no_stats = {n: None for n in stats if n.rpartition(".")[2] in statistics}
    with substituted(net, {**state, **no_stats}):
        out = net(x)
        assert net.cells[0].preprocess1.op[2].running_mean is None
    assert torch.equal(out, expected)
    assert all(p is params[n] for n, p in net.named_parameters())
    assert all(torch.equal(b, stats[n]) for n, b in net.named_buffers())  # put back, not updated
    missing = pytest.raises(KeyError, match=r"no parameter or buffer 'cells\.0\.nope'")
    with missing, substituted(net, {**state, "cells.0.nope": x}):
        pass
    assert all(p is params[n] for n, p in net.named_parameters())
