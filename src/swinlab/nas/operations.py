"""The DARTS operation set (Liu, Simonyan, Yang 2019) and the cell stacking both DARTS networks share.

Every module keeps the submodule names and ``nn.Sequential`` indices of the official code (quark0/darts), so official
state dicts load with ``strict=True``: a ``SepConv`` is ``op.0 .. op.7``, a ``FactorizedReduce`` is ``conv_1``,
``conv_2``, ``bn``. ``OPS[name](C, stride, affine)`` builds an operation by its official name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

OpFactory = Callable[[int, int, bool], nn.Module]


class _Chain(nn.Module):
    """An operation whose layers sit in ``self.op`` (the official layout of ReLUConvBN, SepConv, DilConv)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.op = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


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
