"""memory_report on a small MLP after a real training step: FP32 Adam 16, BF16 mixed precision 16, O1 11, O2 6."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swinlab.fp8 import FP8AdamW, initialize, memory_report


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))


def step(model: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.float32) -> None:
    """One training step; gradients stay alive, as right before the next zero_grad."""
    x, y = torch.randn(8, 256, dtype=dtype), torch.randint(0, 10, (8,))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x).float(), y).backward()
    optimizer.step()


def roles(scope) -> dict[str, float]:
    return {role: round(scope.per_param(role), 2) for role in scope.bytes}


def test_fp32_adam_is_16_bytes_per_param():
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    step(model, optimizer)
    report = memory_report(model, optimizer)
    assert report["model"].params == sum(p.numel() for p in model.parameters())
    assert report["fp8_linears"].params == 0
    assert roles(report["model"]) == {"weights": 4, "gradients": 4, "master_weights": 0, "optimizer_states": 8,
                                      "scale_metadata": 0}
    assert 16 <= report["model"].per_param() < 16.001  # + one 4-byte step counter per tensor


def test_bf16_mixed_precision_is_16_bytes_per_param():
    """BF16 weights and gradients for compute, FP32 master and moments in the optimizer (ZeRO's accounting)."""
    model = mlp().to(torch.bfloat16)
    optimizer = FP8AdamW(model.parameters())  # no FP8 layers: the plain mixed-precision path
    step(model, optimizer, torch.bfloat16)
    report = memory_report(model, optimizer)
    assert roles(report["model"]) == {"weights": 2, "gradients": 2, "master_weights": 4, "optimizer_states": 8,
                                      "scale_metadata": 0}
    assert 16 <= report["model"].per_param() < 16.001


@pytest.mark.parametrize(
    ("level", "states", "bound"),
    [("O1", 8, 11.05), ("O2", 3, 6.05)],
)
def test_fp8_levels_on_the_fp8_linears(level, states, bound):
    model = mlp()
    model, optimizer = initialize(model, torch.optim.AdamW(model.parameters()), level)
    step(model, optimizer)
    report = memory_report(model, optimizer)
    fp8 = report["fp8_linears"]
    assert fp8.params == 2 * 256 * 256  # the two hidden linears; the 10-way head stays in FP32
    assert roles(fp8) == {"weights": 2, "gradients": 1, "master_weights": 0, "optimizer_states": states,
                          "scale_metadata": 0}
    assert 0 < fp8.bytes["scale_metadata"] < 300 * 2  # scales and amax histories: a few hundred bytes a layer
    assert fp8.per_param() <= bound
    assert report["model"].per_param() > fp8.per_param()  # biases and the head keep FP32 Adam's 16


def test_each_storage_is_counted_once():
    model = nn.Sequential(nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False))
    model[1].weight = model[0].weight  # tied
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    report = memory_report(model, optimizer)
    assert report["model"].params == 256
    assert report["model"].bytes == {"weights": 1024, "gradients": 1024, "master_weights": 0,
                                     "optimizer_states": 1024, "scale_metadata": 0}
    assert "weights" in str(report) and "total" in str(report)
