"""benchmarks/profile_step.py: the by-layer attribution of a training step (forward ranges, backward nodes linked by
sequence number), on a tiny Swin V2, and its reading of the peers' module names."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import profile_step
from swinlab.models.swin import SwinTransformerV2


def test_every_layer_gets_its_forward_and_backward():
    torch.manual_seed(0)
    model = SwinTransformerV2(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                              window_size=4, num_classes=5)  # fmt: skip
    profile_step.mark_layers(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    opt = torch.optim.AdamW(model.parameters())

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    result = profile_step.profile_training(step, steps=2)
    layers = result["layers"]
    for kind, width in (("attention", 16), ("attention", 32), ("mlp", 16), ("mlp", 32), ("norm", 16),
                        ("patch merging", 16), ("patch embed", 0)):  # fmt: skip
        for phase in ("fwd", "bwd"):
            assert layers.get(f"{kind}:{width}:{phase}", 0.0) > 0.0, (kind, width, phase, sorted(layers))
    assert layers["optimizer"] > 0.0
    assert 0.0 <= layers["other"] < result["step_ms"]  # the layers never count more than the step's wall time
    assert result["ops"]  # and the by-op table has the ops


def test_peer_module_names_map_to_the_same_layers():
    linear = nn.Linear(2, 2)
    kind = profile_step.layer_kind
    assert kind("layers.0.blocks.1.attn", linear) == "attention"  # timm, swinlab
    assert kind("swinv2.encoder.layers.0.blocks.1.attention", linear) == "attention"  # transformers
    assert kind("swinv2.encoder.layers.0.blocks.1.intermediate", linear) == "mlp"
    assert kind("swinv2.encoder.layers.0.blocks.1.output", linear) == "mlp"
    assert kind("swinv2.encoder.layers.0.blocks.1.attention.output", linear) is None  # inside the attention
    assert kind("features.1.0.norm1", nn.LayerNorm(2)) == "norm"  # torchvision
    assert kind("swinv2.encoder.layers.0.blocks.1.layernorm_before", nn.LayerNorm(2)) == "norm"
    assert kind("layers.0.downsample", linear) == "patch merging"
    assert kind("features.2", type("PatchMergingV2", (nn.Module,), {})()) == "patch merging"
    assert kind("features.1.0.stochastic_depth", nn.Identity()) is None
