"""ResNet-18 / ResNet-50 (He et al. 2016) in torchvision's key layout, with the conv layer chosen by a factory.

Layout (torchvision names, so its checkpoints load strictly): ``conv1`` (7x7/2) -> ``bn1`` -> max-pool ->
``layer1..4`` of BasicBlock (``conv1, bn1, conv2, bn2``) or Bottleneck (``conv1, bn1, conv2, bn2, conv3, bn3``,
stride on the 3x3 as torchvision's "v1.5") with ``downsample.0`` (1x1 conv) / ``downsample.1`` (BN) ->
global average pool -> ``fc``.

``stem="small"`` replaces the 7x7/2 conv and max-pool by one 3x3/1 conv (the CIFAR-style stem, as He et al.
2016 Sec. 4.2 use for 32 px inputs): the ImageNet stem divides a 28-32 px image by 4 before the first block and
leaves ``layer4`` a 1x1 map. ``width`` scales every stage (64 in the paper); both change the model, not its key
names, so CPU-sized variants stay in the same layout.

``conv="gmconv"`` builds every conv with a kernel larger than 1x1 as :class:`~swinlab.layers.GMConv2d`: the
7x7 stem and every 3x3 (the 1x1 convs of the bottlenecks and shortcuts stay plain, a mask on 1x1 is 1). That
placement is this toolkit's choice; the paper's could not be read. Other placements: build ``conv="plain"``
and call :func:`~swinlab.layers.convert_to_gmconv` with ``include`` / ``exclude`` patterns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from swinlab.layers import conv2d_factory
from swinlab.models.registry import register_model

ConvFactory = Callable[..., nn.Conv2d]
STEMS = ("imagenet", "small")


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_chs: int, chs: int, stride: int, downsample: nn.Module | None, conv: ConvFactory) -> None:
        super().__init__()
        self.conv1 = conv(in_chs, chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(chs, chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs)
        self.downsample = downsample

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)) + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, in_chs: int, chs: int, stride: int, downsample: nn.Module | None, conv: ConvFactory) -> None:
        super().__init__()
        out_chs = chs * self.expansion
        self.conv1 = conv(in_chs, chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chs)
        self.conv2 = conv(chs, chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(chs)
        self.conv3 = conv(chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.relu(self.bn3(self.conv3(x)) + shortcut)


class ResNet(nn.Module):
    """ResNet classifier with the toolkit's model interface.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: classes of ``fc`` (0 = no head, ``forward`` returns pooled features).
        in_chans: input image channels.
        img_size: the input side the model is meant for (ResNets run at any size; tools such as
            ``swinlab info`` and ``swinlab erf`` read it as ``model.img_size``).
        conv: ``"plain"`` or ``"gmconv"`` (see the module docstring); ``gm_kwargs`` go to GMConv2d.
        width: channels of the first stage (stage ``i`` has ``width * 2**i``).
        stem: ``"imagenet"`` (7x7/2 conv + 3x3/2 max-pool) or ``"small"`` (3x3/1 conv, no pool).
        zero_init_residual: start each residual branch at zero (last BN weight 0), off as in torchvision.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        conv: str = "plain",
        width: int = 64,
        stem: str = "imagenet",
        zero_init_residual: bool = False,
        **gm_kwargs,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {stem!r}; choose one of {STEMS}")
        if width < 1 or img_size < 1:
            raise ValueError(f"width and img_size must be >= 1, got width={width}, img_size={img_size}")
        make_conv = conv2d_factory(conv, **gm_kwargs)
        self.conv = conv
        self.in_chans = in_chans
        self.img_size = img_size
        self.grad_checkpointing = False
        if stem == "imagenet":
            self.conv1 = make_conv(in_chans, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = make_conv(in_chans, width, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_chs = width
        for i, depth in enumerate(layers):
            chs, stride = width * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or in_chs != chs * block.expansion):
                    downsample = nn.Sequential(
                        make_conv(in_chs, chs * block.expansion, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(chs * block.expansion),
                    )
                blocks.append(block(in_chs, chs, stride if j == 0 else 1, downsample, make_conv))
                in_chs = chs * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.num_features = in_chs
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_classes = num_classes
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's: Kaiming-normal (fan_out) convs, unit BN, default Linear."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_norm().weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    # -- public toolkit interface --

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block in the backward pass instead of storing its activations (training
        only; BatchNorm running statistics are updated once more per block by the recomputation)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()

    def no_weight_decay_keywords(self) -> set[str]:
        return {"log_sigma"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(
        self, x: torch.Tensor, return_stages: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Pooled features ``(B, num_features)``; with ``return_stages=True`` the ``(B, C_i, H_i, W_i)``
        output of every stage (strides 4, 8, 16, 32; 1, 2, 4, 8 with the small stem)."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) input, got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for stage in self.stages():
            for block in stage:
                if self.grad_checkpointing and torch.is_grad_enabled():
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    x = block(x)
            maps.append(x)
        if return_stages:
            return maps
        return self.avgpool(x).flatten(1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# -- registered variants --

_SOURCE = (
    "torchvision layout (top-1 = torchvision IMAGENET1K_V1 weights, not shipped here); "
    "GMConv placement (7x7 stem + every 3x3) is the toolkit's choice"
)


def _meta(params: str, top1: float | None = None) -> dict:
    return {"params": params, "imagenet_top1": top1, "source": _SOURCE}


@register_model(meta=_meta("11.7M", 69.76))
def resnet18(**kwargs) -> ResNet:
    """ResNet-18, plain convolutions."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model(meta=_meta("25.6M", 76.13))
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (v1.5: stride on the 3x3), plain convolutions."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model(meta=_meta("11.7M"))
def resnet18_gmconv(**kwargs) -> ResNet:
    """ResNet-18 with GMConv on the stem and every 3x3 conv."""
    return ResNet(BasicBlock, (2, 2, 2, 2), **{"conv": "gmconv", **kwargs})


@register_model(meta=_meta("25.6M"))
def resnet50_gmconv(**kwargs) -> ResNet:
    """ResNet-50 with GMConv on the stem and every 3x3 conv."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **{"conv": "gmconv", **kwargs})
