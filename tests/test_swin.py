"""SwinTransformerV2 behaviour on tiny configs: any input size, multi-scale outputs, checkpointing, errors."""

import math

import pytest
import torch
from torch import nn

from swinlab import create_model
from swinlab.layers import PatchMergingV2
from swinlab.models.checkpoints import load_official
from swinlab.models.swin import SwinBlockV1, SwinBlockV2, SwinTransformerV2, swin_stages

TINY = dict(patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)


def tiny(**kwargs) -> SwinTransformerV2:
    return SwinTransformerV2(**{"img_size": 32, **TINY, **kwargs})


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (36, 52), (30, 17), (4, 4), (7, 100)])
def test_any_input_size(size):
    model = tiny().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_one_by_one_stage_is_finite():
    # img 32, patch 4, four stages -> the last stage is 1x1 (the official code returns NaN here).
    model = SwinTransformerV2(
        img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4
    )
    with torch.no_grad():
        maps = model.eval().forward_features(torch.randn(1, 3, 32, 32), return_stages=True)
        logits = model(torch.randn(1, 3, 32, 32))
    assert maps[-1].shape == (1, 128, 1, 1)
    assert torch.isfinite(logits).all()


def test_padded_grid_matches_unpadded_windows():
    """Grid 4x6 with window 4 (unshifted block): columns 0-3 form one full window, so their outputs must equal
    the block run on those columns alone; padding the other window must not leak."""
    block = tiny(depths=(2,), num_heads=(2,)).layers[0].blocks[0].eval()
    with torch.no_grad():
        block.norm1.weight.fill_(1.0)
        x = torch.randn(1, 4, 6, 16)
        torch.testing.assert_close(block(x)[:, :, :4], block(x[:, :, :4].contiguous()), atol=1e-5, rtol=1e-5)


def test_return_stages_and_features_only():
    model = tiny(depths=(2, 2, 2), num_heads=(2, 4, 8)).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        maps = model.forward_features(x, return_stages=True)
    assert [m.shape for m in maps] == [(2, 16, 10, 14), (2, 32, 5, 7), (2, 64, 3, 4)]
    backbone = tiny(depths=(2, 2, 2), num_heads=(2, 4, 8), features_only=True).eval()
    assert backbone.num_classes == 0 and "head.weight" not in backbone.state_dict()
    backbone.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for a, b in zip(backbone(x), maps, strict=True):
            torch.testing.assert_close(a, b)


def test_grad_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.3)
    x = torch.randn(2, 3, 32, 32)

    def grads():
        torch.manual_seed(1)
        model.zero_grad()
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(layer.grad_checkpointing for layer in model.layers)
    for a, b in zip(plain, grads(), strict=True):
        torch.testing.assert_close(a, b)


def test_use_checkpoint_alias():
    assert all(layer.grad_checkpointing for layer in tiny(use_checkpoint=True).layers)


def test_window_transfer_8_to_16():
    src = SwinTransformerV2(img_size=64, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=8)
    dst = SwinTransformerV2(
        img_size=128,
        embed_dim=16,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=16,
        pretrained_window_sizes=(8, 8),
    )
    report = load_official(dst, src.state_dict(), strict=True)
    assert not report.resized and not report.reinitialised
    with torch.no_grad():
        out = dst.eval()(torch.randn(1, 3, 128, 128))
    assert torch.isfinite(out).all()
    assert dst.layers[0].blocks[0].attn.coords_table((16, 16), torch.device("cpu")).max() > 1.06  # beyond P


def test_initialisation_matches_official():
    model = tiny()
    block = model.layers[0].blocks[0]
    for norm in (block.norm1, block.norm2):
        assert not norm.weight.any() and not norm.bias.any()  # res-post-norm starts as identity
    torch.testing.assert_close(block.attn.logit_scale, torch.full((2, 1, 1), math.log(10)))
    assert not block.attn.q_bias.any() and not block.attn.v_bias.any()
    assert model.norm.weight.eq(1).all() and abs(block.mlp.fc1.weight.std().item() - 0.02) < 0.005


def test_no_weight_decay_and_state_dict_layout():
    model = tiny(ape=True)
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {"absolute_pos_embed"} <= names.keys()
    assert tiny().no_weight_decay() == set()
    assert {"cpb_mlp", "logit_scale"} <= model.no_weight_decay_keywords()
    keys = set(model.state_dict())
    assert {
        "layers.0.blocks.1.attn.cpb_mlp.2.weight",
        "layers.0.blocks.0.attn.q_bias",
        "layers.0.downsample.norm.bias",
        "patch_embed.proj.weight",
        "head.weight",
        "norm.weight",
    } <= keys
    assert not any(
        k.endswith(("relative_position_index", "relative_coords_table", "attn_mask")) for k in keys
    )
    assert "layers.0.blocks.0.attn.qkv.bias" not in keys


def test_ape_interpolates_to_other_sizes():
    model = tiny(ape=True).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 40)).shape == (1, 5)


def test_extra_norms_for_huge_giant():
    model = tiny(depths=(2, 6), extra_norm_period=3, extra_norm_stage=True)
    keys = {k.rsplit(".", 1)[0] for k in model.state_dict() if "extra_norms" in k}
    assert keys == {"layers.0.extra_norms.1", "layers.1.extra_norms.2", "layers.1.extra_norms.5"}
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_eval_cache_follows_weight_updates():
    model = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model.layers[0].blocks[1].norm1.weight.fill_(
            1.0
        )  # post-norms start at zero, hiding the attention branch
        a = model(x)
        torch.testing.assert_close(model(x), a)
        model.layers[0].blocks[1].attn.cpb_mlp[2].weight.mul_(3)
        assert not torch.allclose(model(x), a)
    model.train()
    assert model(x).requires_grad


def test_training_after_inference_mode():
    """Geometry tables first built under inference_mode must still be usable in a training step."""
    model = tiny()
    with torch.inference_mode():
        model.eval()(torch.randn(1, 3, 20, 28))
    model.train()(torch.randn(2, 3, 20, 28)).sum().backward()
    assert model.layers[0].blocks[1].attn.cpb_mlp[0].weight.grad is not None


def test_v1_block_on_video_grid():
    block = SwinBlockV1(16, 2, window_size=(2, 4, 4), shift_size=(1, 2, 2))
    x = torch.randn(1, 3, 6, 5, 16)  # padded to (4, 8, 8) inside, cropped back
    assert block(x).shape == x.shape


def test_bf16_autocast_forward_backward():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 36, 36))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()


def test_reset_classifier():
    model = tiny()
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.randn(1, 1, 32, 32), ValueError, "3 input channels"),
        (torch.randn(1, 3, 2, 32), ValueError, "smaller than one patch"),
        (torch.randn(3, 32, 32), ValueError, "4D"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_input_errors(x, error, match):
    with pytest.raises(error, match=match):
        tiny()(x)


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match=r"num_heads\[1\]=3 does not divide the width 32"):
        tiny(num_heads=(2, 3))
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny(num_heads=(2,))
    with pytest.raises(ValueError, match=r"pretrained_window_size \(\(4, 4\),\) must have one entry per stage"):
        tiny(pretrained_window_sizes=(4,))


def test_stage_builder_hands_the_injected_block_its_schedule():
    """``swin_stages`` owns what every Swin shares (widths, shift alternation, the stochastic-depth ramp over all
    blocks, per-stage block options, merging between stages); the block is whatever callable it is given."""
    calls = []

    def block(dim, heads, window, shift, *, drop_path, pretrained_window_size, **common):
        calls.append((dim, heads, window, shift, drop_path, pretrained_window_size))
        return nn.Identity()

    stages = swin_stages(
        block, PatchMergingV2, 8, (2, 1, 1), (1, 2, 4), (4, 6), drop_path_rate=0.3,
        stage_kwargs={"pretrained_window_size": [(3, 3), (5, 5), (0, 0)]}, extra_norm_period=2,
    )  # fmt: skip
    assert calls == [
        (8, 1, (4, 6), (0, 0), 0.0, (3, 3)),
        (8, 1, (4, 6), (2, 3), pytest.approx(0.1), (3, 3)),
        (16, 2, (4, 6), (0, 0), pytest.approx(0.2), (5, 5)),
        (32, 4, (4, 6), (0, 0), pytest.approx(0.3), (0, 0)),
    ]
    assert [type(s.downsample) for s in stages] == [PatchMergingV2, PatchMergingV2, type(None)]
    assert list(stages[0].extra_norms) == ["1"] and not hasattr(stages[1], "extra_norms")
    model = tiny()
    assert {type(b) for layer in model.layers for b in layer.blocks} == {SwinBlockV2}


@pytest.mark.slow
def test_torch_compile_matches_eager():
    model = tiny().eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        for size in [(32, 32), (36, 44)]:  # a second size exercises padding and a recompilation
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_training_matches_eager():
    """Forward and backward traced by dynamo + AOTAutograd (the cosine q/k autograd Function included, no graph
    break besides the table-building prefix); inductor code generation is covered by the inference test."""
    torch._dynamo.reset()
    model = tiny(drop_path_rate=0.0)
    for block in (b for layer in model.layers for b in layer.blocks):
        torch.nn.init.ones_(block.norm1.weight)  # zero-initialised post-norms would hide the attention branch
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.utils.counters.clear()
    torch.compile(model, backend="aot_eager")(x).square().sum().backward()
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("_build_window_tables" in reason for reason in breaks), list(breaks)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_eval_bias_cache_never_outlives_training_steps():
    """Fused AdamW does not bump parameter version counters; the cached attention bias must still be rebuilt."""
    model = create_model("swinv2_nano_window4_32", num_classes=3, in_chans=1)
    for block in (b for layer in model.layers for b in layer.blocks):
        torch.nn.init.ones_(block.norm1.weight)  # zero-initialised post-norms would hide the attention branch
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    with torch.no_grad():
        model(x)  # fills the caches
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(x).sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        cached = model(x)
    uncached = model(x)  # autograd on: the bias is recomputed from the parameters
    # The two paths differ only in float rounding (SDPA vs explicit softmax, ~1e-6 on logits of ~3); a stale
    # bias after an lr=0.1 step moves the logits by orders of magnitude more.
    torch.testing.assert_close(cached, uncached.detach(), rtol=1e-5, atol=1e-5)


def test_forward_tokens_are_the_final_map_at_those_tokens():
    """``forward_tokens`` computes the last block's MLP half and the final norm for the given tokens only, with
    the values ``forward_features(return_map=True)`` has there (and their gradients); bad indices are refused."""
    torch.manual_seed(0)
    model = SwinTransformerV2(img_size=32, patch_size=4, embed_dim=8, depths=(2, 2), num_heads=(2, 4),
                              window_size=4, num_classes=0, drop_path_rate=0.0).double()  # fmt: skip
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)  # float64: the same function, not float32 rounding
    tokens = torch.stack([torch.randperm(16)[:5] for _ in range(3)])  # last grid 4 x 4
    full = model.forward_features(x, return_map=True).permute(0, 2, 3, 1).flatten(1, 2)
    expected = full.gather(1, tokens.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    picked = model.forward_tokens(x, tokens.int())
    torch.testing.assert_close(picked, expected)
    direction = torch.randn_like(picked)
    grads = [torch.autograd.grad((out * direction).sum(), list(model.parameters())) for out in (expected, picked)]
    for ref, new in zip(*grads, strict=True):
        torch.testing.assert_close(new, ref)
    with pytest.raises(ValueError, match=r"tokens must be a \(B, k\) index tensor with B = 3"):
        model.forward_tokens(x, tokens[:2])
    with pytest.raises(TypeError, match="int64 or int32"):
        model.forward_tokens(x, tokens.float())
