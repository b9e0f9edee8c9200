"""Transformer feed-forward block (key names ``fc1`` / ``fc2`` as in the official checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from swinlab.layers.linear import Linear, linear_gelu


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
        if type(self.fc1) is Linear and type(self.act) is nn.GELU:  # not a swapped layer (e.g. FP8Linear)
            h = linear_gelu(x, self.fc1.weight, self.fc1.bias, self.act.approximate)
        else:
            h = self.act(self.fc1(x))
        return self.drop2(self.fc2(self.drop1(h)))
