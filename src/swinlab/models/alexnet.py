"""AlexNet (Krizhevsky et al. 2012) in torchvision's single-tower key layout, with the conv layer chosen by a
factory.

Layout: ``features.{0,3,6,8,10}`` convs (11x11/4, 5x5, 3x3, 3x3, 3x3) with ReLU / max-pools between ->
6x6 adaptive average pool -> ``classifier.{1,4,6}`` linears (dropout at 0 and 3). ``conv="gmconv"`` makes all
five convs :class:`~swinlab.layers.GMConv2d` (the toolkit's placement choice). Inputs need at least 63 px:
the three stride-2 max-pools run out of pixels below that.
"""

from __future__ import annotations

import torch
from torch import nn

from swinlab.layers import conv2d_factory
from swinlab.models.registry import register_model

_HEAD = 6  # index of the last Linear in ``classifier``: the part reset_classifier replaces
MIN_SIZE = 63  # smallest input side that survives the 11x11/4 conv and the three 3x3/2 max-pools


class AlexNet(nn.Module):
    """AlexNet classifier with the toolkit's model interface.

    ``forward_features`` returns the output of the second hidden linear layer (``num_features`` =
    ``hidden_features``, 4096 as torchvision; smaller values make CPU-sized variants, 54M of the 61M parameters
    sit in those layers); ``forward_head`` is ``classifier.6``. ``gm_kwargs`` go to GMConv2d when
    ``conv="gmconv"``. ``img_size`` is the input side the model is meant for (read as ``model.img_size`` by
    ``swinlab info`` / ``swinlab erf``); it must be at least 63, below which the max-pools run out of pixels.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        img_size: int = 224,
        conv: str = "plain",
        drop_rate: float = 0.5,
        hidden_features: int = 4096,
        **gm_kwargs,
    ) -> None:
        super().__init__()
        if img_size < MIN_SIZE:
            raise ValueError(f"AlexNet needs inputs of at least {MIN_SIZE}x{MIN_SIZE} px, got img_size={img_size}")
        self.img_size = img_size
        make_conv = conv2d_factory(conv, **gm_kwargs)
        self.conv = conv
        self.in_chans = in_chans
        self.num_features = hidden_features
        self.num_classes = num_classes
        self.features = nn.Sequential(
            make_conv(in_chans, 64, 11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            make_conv(64, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            make_conv(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            make_conv(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            make_conv(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(drop_rate),
            nn.Linear(256 * 6 * 6, hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Linear(hidden_features, hidden_features),
            nn.ReLU(inplace=True),
            self._head(num_classes),
        )

    def _head(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # -- public toolkit interface --

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """No-op: AlexNet's activations are small next to its weights, so recomputation would save little."""

    def no_weight_decay(self) -> set[str]:
        return set()

    def no_weight_decay_keywords(self) -> set[str]:
        return {"log_sigma"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier[_HEAD] = self._head(num_classes)

    def forward_features(
        self, x: torch.Tensor, return_stages: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Features ``(B, num_features)``; with ``return_stages=True`` the conv maps after the three max-pools."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected a (B, {self.in_chans}, H, W) input, got shape {tuple(x.shape)}")
        if min(x.shape[2:]) < MIN_SIZE:
            raise ValueError(f"AlexNet needs inputs of at least {MIN_SIZE}x{MIN_SIZE} px, got {tuple(x.shape[2:])}")
        maps = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                maps.append(x)
        if return_stages:
            return maps
        return self.classifier[:_HEAD](self.avgpool(x).flatten(1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier[_HEAD](features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_SOURCE = (
    "torchvision layout (top-1 = torchvision IMAGENET1K_V1 weights, not shipped here); "
    "GMConv on all five convs is the toolkit's choice"
)


@register_model(meta={"params": "61.1M", "imagenet_top1": 56.52, "source": _SOURCE})
def alexnet(**kwargs) -> AlexNet:
    """AlexNet, plain convolutions."""
    return AlexNet(**kwargs)


@register_model(meta={"params": "61.1M", "imagenet_top1": None, "source": _SOURCE})
def alexnet_gmconv(**kwargs) -> AlexNet:
    """AlexNet with GMConv on all five convs."""
    return AlexNet(**{"conv": "gmconv", **kwargs})
