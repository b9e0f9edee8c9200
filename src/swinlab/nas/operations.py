"""The DARTS operation set (Liu, Simonyan, Yang 2019) and the cell stacking both DARTS networks share.

Every module keeps the submodule names and ``nn.Sequential`` indices of the official code (quark0/darts), so official
state dicts load with ``strict=True``: a ``SepConv`` is ``op.0 .. op.7``, a ``FactorizedReduce`` is ``conv_1``,
``conv_2``, ``bn``. ``OPS[name](C, stride, affine)`` builds an operation by its official name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

OpFactory = Callable[[int, int, bool], nn.Module]


class _Chain(nn.Module):
    """An operation whose layers sit in ``self.op`` (the official layout of ReLUConvBN, SepConv, DilConv)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.op = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class _MaxPool(torch.autograd.Function):
    """Max pooling by torch's channels-last forward kernel (1.7-5x faster than its NCHW one at DARTS sizes, layout
    copies included) and its NCHW backward kernel (given an NCHW gradient, the channels-last backward converts it and
    runs 4x slower). Both kernels pick the same maxima, so values, indices and gradients are the official ones."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.MaxPool2d) -> torch.Tensor:
        ctx.args = [*map(_pair, (pool.kernel_size, pool.stride, pool.padding, pool.dilation)), pool.ceil_mode]
        x = x.contiguous()
        channels_last = x.contiguous(memory_format=torch.channels_last)
        out, indices = torch.ops.aten.max_pool2d_with_indices(channels_last, *ctx.args)
        ctx.save_for_backward(x, indices.contiguous())
        return out.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad.contiguous(), x, *ctx.args, indices), None


class _AvgPool(torch.autograd.Function):
    """Average pooling by torch's channels-last kernels on NCHW tensors: forward and backward 1.3-2x faster at DARTS
    sizes with stride 1, on par with stride 2 (layout copies included). Each output sums its window in the same order
    and divides by the same count, and each input gradient sums its outputs' shares in the same order, so the numbers
    are the official ones."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pool: nn.AvgPool2d) -> torch.Tensor:
        ctx.args = [
            *map(_pair, (pool.kernel_size, pool.stride, pool.padding)),
            pool.ceil_mode,
            pool.count_include_pad,
            pool.divisor_override,
        ]
        x = x.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x)
        return torch.ops.aten.avg_pool2d(x, *ctx.args).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        return torch.ops.aten.avg_pool2d_backward(grad, x, *ctx.args).contiguous(), None


_POOLS = {nn.MaxPool2d: _MaxPool, nn.AvgPool2d: _AvgPool}


def apply_pool(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``pool(x)`` for the search cells' ``nn.MaxPool2d`` / ``nn.AvgPool2d``, by the faster kernels above (same
    numbers)."""
    return _POOLS[type(pool)].apply(x, pool)


def _pair(v: int | tuple[int, int]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


class PointwiseConv(nn.Conv2d):
    """A bias-free 1 x 1 convolution (optionally strided) computed as one matrix product over the channels.

    Same parameter and state-dict layout as ``nn.Conv2d``; the numbers are the same sums in another order (see
    :func:`use_fast_convolutions`, which puts it in place). Why: at DARTS search sizes torch's CPU convolution goes
    through oneDNN with two threads and costs several times the arithmetic (8 x 8 x 32 x 32, forward + backward:
    475 µs against 120 µs as a matrix product; on par at one thread, where torch itself runs a matrix product;
    ``benchmarks/RESULTS.md``)."""

    def __init__(self, C_in: int, C_out: int, stride: int = 1) -> None:
        super().__init__(C_in, C_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"1 x 1 convolution expects (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        stride = self.stride[0]
        if stride > 1:
            x = x[:, :, ::stride, ::stride]
        B, C, H, W = x.shape
        # bmm on the weight expanded over the batch: no copies either way (``matmul`` folds the batch into the rows
        # and transposes), and its backward sums the per-image weight gradients.
        weight = self.weight.view(1, self.out_channels, C).expand(B, -1, -1)
        return torch.bmm(weight, x.reshape(B, C, H * W)).view(B, -1, H, W)


class _DilatedDepthwise(torch.autograd.Function):
    """A stride-1 dilated depthwise convolution whose input gradient is the forward convolution of the output
    gradient with the flipped kernel (the transpose of a stride-1 convolution). torch's CPU backward runs a
    reference loop here: 3-8x slower than its own forward kernel at DARTS sizes (``benchmarks/RESULTS.md``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, padding: int, dilation: int) -> torch.Tensor:
        out = F.conv2d(x, weight, None, 1, padding, dilation, x.shape[1])
        # Under autocast the convolution ran in ``out.dtype``: the backward works in it and casts back.
        ctx.save_for_backward(x.to(out.dtype), weight.to(out.dtype))
        ctx.padding, ctx.dilation, ctx.dtypes = padding, dilation, (x.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        p, d, groups = ctx.padding, ctx.dilation, x.shape[1]
        grad = grad.to(x.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            k = weight.shape[-1]
            grad_x = F.conv2d(grad, weight.flip(-2, -1), None, 1, d * (k - 1) - p, d, groups).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_w = torch.ops.aten.convolution_backward(
                grad, x, weight, None, [1, 1], [p, p], [d, d], False, [0, 0], groups, [False, True, False]
            )[1].to(ctx.dtypes[1])
        return grad_x, grad_w, None, None


class DepthwiseConv(nn.Conv2d):
    """A bias-free depthwise k x k convolution (``nn.Conv2d`` layout); stride-1 dilated ones take the faster input
    gradient of :class:`_DilatedDepthwise` (the same sums in another order)."""

    def __init__(self, C: int, kernel_size: int, stride: int, padding: int, dilation: int) -> None:
        super().__init__(C, C, kernel_size, stride, padding, dilation, groups=C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dilation[0] == 1 or self.stride[0] != 1 or x.dim() != 4 or x.shape[1] != self.in_channels:
            return super().forward(x)  # torch's own kernels and shape errors
        return _DilatedDepthwise.apply(x, self.weight, self.padding[0], self.dilation[0])


def use_fast_convolutions(module: nn.Module) -> nn.Module:
    """Put :class:`PointwiseConv` in place of every bias-free, unpadded 1 x 1 ``nn.Conv2d`` of ``module`` and
    :class:`DepthwiseConv` in place of every bias-free, stride-1 dilated depthwise one, keeping their parameter
    objects (so optimizers and state dicts are unaffected); returns ``module``.

    Opt-in, because the official code's numbers are the contract by default: these sum in another order than torch's
    kernels, so a second-order DARTS α gradient, whose finite difference amplifies fp32 rounding, moves by the same
    amount as the official code's own does between 1 and 2 threads (as far from the float64 result as the official's;
    first order stays within 1e-9). Search cells with these run edge by edge (the stacked cells of
    :mod:`~swinlab.nas.stacked_cell` use torch's kernels), and at the benchmark's search size the second-order
    iteration is no faster than the default's (1.29x against 1.30-1.33x the official's; ``benchmarks/RESULTS.md``)."""
    for parent in list(module.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is not nn.Conv2d or conv.bias is not None or conv.padding_mode != "zeros":
                continue
            C_out, _, kh, kw = conv.weight.shape
            if (kh, kw) == (1, 1) and conv.groups == 1 and conv.padding == (0, 0) and len(set(conv.stride)) == 1:
                fast: nn.Conv2d = PointwiseConv(conv.in_channels, C_out, conv.stride[0])
            elif (
                conv.groups == conv.in_channels == C_out
                and kh == kw
                and conv.stride == (1, 1)
                and conv.dilation[0] == conv.dilation[1] > 1
                and conv.padding[0] == conv.padding[1]
            ):
                fast = DepthwiseConv(C_out, kh, 1, conv.padding[0], conv.dilation[0])
            else:
                continue
            fast.weight = conv.weight
            setattr(parent, name, fast)
    return module


def _depthwise_unit(
    C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int, affine: bool
) -> list[nn.Module]:
    """ReLU, depthwise k x k, pointwise 1 x 1, BN: a dilated conv is one unit, a separable conv two."""
    return [
        nn.ReLU(inplace=False),
        nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation, groups=C_in, bias=False),
        nn.Conv2d(C_in, C_out, 1, bias=False),
        nn.BatchNorm2d(C_out, affine=affine),
    ]


class ReLUConvBN(_Chain):
    """ReLU, dense conv, BN: the cells' input preprocessing."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(_Chain):
    """One depthwise unit with a dilated depthwise kernel."""

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, dilation: int, affine: bool = True
    ) -> None:
        super().__init__(*_depthwise_unit(C_in, C_out, kernel_size, stride, padding, dilation, affine))


class SepConv(_Chain):
    """Two depthwise units; only the first is strided."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True) -> None:
        super().__init__(
            *_depthwise_unit(C_in, C_in, kernel_size, stride, padding, 1, affine),
            *_depthwise_unit(C_in, C_out, kernel_size, 1, padding, 1, affine),
        )


class Zero(nn.Module):
    """The ``none`` operation: zeros of the (strided) output shape, still connected to the graph as officially."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halve the resolution without losing pixels: two stride-2 1 x 1 convs, the second on ``x`` shifted by one pixel
    (``x[:, :, 1:, 1:]``), concatenated along channels, then BN.

    Odd sizes cannot work (the two paths give ``ceil(H/2)`` and ``floor(H/2)`` rows; the official code fails in
    ``torch.cat``), so they are refused with a clear error instead."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True) -> None:
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"FactorizedReduce needs an even height and width, got {tuple(x.shape[-2:])}")
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def _conv_7x1_1x7(C: int, stride: int, affine: bool) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(inplace=False),
        nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
        nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
        nn.BatchNorm2d(C, affine=affine),
    )


OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
    "conv_7x1_1x7": _conv_7x1_1x7,
}


def is_reduction(i: int, layers: int) -> bool:
    """Cells at 1/3 and 2/3 of the depth halve the resolution and double the channels."""
    return i in (layers // 3, 2 * layers // 3)


CellFactory = Callable[[int, int, int, bool, bool], nn.Module]


def stack_cells(
    make_cell: CellFactory, C: int, layers: int, C_stem: int, reduction_prev: bool
) -> tuple[nn.ModuleList, int, int]:
    """The DARTS macro-architecture: ``layers`` cells, each reading the two previous outputs.

    ``make_cell(C_prev_prev, C_prev, C, reduction, reduction_prev)`` builds one cell with a ``multiplier`` attribute
    (its output is ``multiplier * C`` channels). Returns the cells, the last cell's channels and the channels after
    cell ``2 * layers // 3`` (where an auxiliary head reads)."""
    cells = nn.ModuleList()
    C_prev_prev, C_prev, C_aux = C_stem, C_stem, 0
    for i in range(layers):
        reduction = is_reduction(i, layers)
        C = C * 2 if reduction else C
        cell = make_cell(C_prev_prev, C_prev, C, reduction, reduction_prev)
        cells.append(cell)
        C_prev_prev, C_prev, reduction_prev = C_prev, cell.multiplier * C, reduction
        if i == 2 * layers // 3:
            C_aux = C_prev
    return cells, C_prev, C_aux
