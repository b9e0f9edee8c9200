"""Video Swin on tiny configs: shapes, padding and window clamping, freezing, the classifier's toolkit interface,
registered variants, official checkpoint loading and 2D -> 3D inflation (including the static-clip property)."""

import warnings

import pytest
import torch
from torch import nn

from swinlab import create_model, list_models
from swinlab.layers import PatchEmbed, PatchMerging, PatchMergingV2, gather_relative_bias
from swinlab.models.swin import SwinBlockV1, swin_stages
from swinlab.models.video_checkpoints import (
    inflate_bias_table,
    inflate_from_2d,
    inflate_patch_kernel,
    load_official_video,
)
from swinlab.models.video_swin import SwinBlockV2PerAxis, SwinTransformer3D, VideoSwinClassifier

TINY = dict(patch_size=(2, 4, 4), embed_dim=8, depths=(2, 2), num_heads=(2, 4), window_size=(2, 4, 4), patch_norm=True)


def backbone(**kwargs) -> SwinTransformer3D:
    return SwinTransformer3D(**{**TINY, "drop_path_rate": 0.0, **kwargs})


def classifier(**kwargs) -> VideoSwinClassifier:
    return VideoSwinClassifier(**{"num_classes": 5, **TINY, **kwargs})


@pytest.mark.parametrize(
    "clip, grid",
    [((8, 32, 32), (4, 4, 4)), ((7, 30, 34), (4, 4, 5)), ((2, 16, 16), (1, 2, 2)), ((3, 4, 4), (2, 1, 1))],
)
def test_output_shape_padding_and_clamping(clip, grid):
    """Clips are end-padded to patch multiples; grids smaller than the window clamp it per axis."""
    with torch.no_grad():
        out = backbone().eval()(torch.randn(1, 3, *clip))
    assert out.shape == (1, 16, *grid) and torch.isfinite(out).all()


def test_return_stages():
    with torch.no_grad():
        maps = backbone().eval().forward_features(torch.randn(1, 3, 8, 32, 32), return_stages=True)
    assert [m.shape for m in maps] == [(1, 8, 4, 8, 8), (1, 16, 4, 4, 4)]


def test_clamped_window_uses_its_own_offsets():
    """A 1-frame grid with window (2, 4, 4) attends with window (1, 4, 4): the bias must be the dt = 0 slice of
    the table, gathered with the index of the smaller window."""
    attn = backbone().layers[0].blocks[0].attn
    table = attn.relative_position_bias_table.detach()
    expected = gather_relative_bias(table.view(3, 49, -1)[1], (1, 4, 4))
    assert torch.equal(attn.position_bias((1, 4, 4)).detach(), expected)


def test_shift_and_stochastic_depth_schedule():
    model = backbone(drop_path_rate=0.3)
    blocks = [b for layer in model.layers for b in layer.blocks]
    assert [b.shift_size for b in blocks] == [(0, 0, 0), (1, 2, 2)] * 2
    assert [getattr(b.drop_path, "p", 0.0) for b in blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_frozen_stages_stay_frozen():
    model = backbone(frozen_stages=1).train()
    assert model.training and not model.patch_embed.training and not model.layers[0].training
    assert not model.pos_drop.training and model.layers[1].training
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert not any(p.requires_grad for p in model.layers[0].parameters())
    assert all(p.requires_grad for p in model.layers[1].parameters())


def test_grad_checkpointing_gives_same_grads():
    x = torch.randn(1, 3, 4, 32, 32)
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = classifier(use_checkpoint=enable)
        model.cls_head.dropout.p = 0.0
        model(x).sum().backward()
        grads.append(model.backbone.patch_embed.proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_classifier_interface_and_layout():
    model = classifier(in_chans=2)
    assert (model.num_classes, model.in_chans, model.num_features) == (5, 2, 16)
    x = torch.randn(2, 2, 4, 32, 32)
    assert model.eval()(x).shape == (2, 5) and model.forward_features(x).shape == (2, 16)
    assert model.no_weight_decay_keywords() == {"relative_position_bias_table"} and not model.no_weight_decay()
    keys = set(model.state_dict())
    assert {"backbone.patch_embed.proj.weight", "backbone.norm.weight", "cls_head.fc_cls.weight"} <= keys
    assert "backbone.layers.0.downsample.reduction.weight" in keys
    assert not any("relative_position_index" in k or "attn_mask" in k for k in keys)
    assert model.cls_head.fc_cls.weight.std() < 0.02 and not model.cls_head.fc_cls.bias.any()
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 16)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(1, 3, 32, 32), ValueError, "5D"),
        (torch.randn(1, 4, 4, 32, 32), ValueError, "3 input channels"),
        (torch.randn(1, 3, 1, 32, 32), ValueError, "at least 2 frames"),
        (torch.randn(1, 3, 4, 3, 32), ValueError, "smaller than one patch"),
        ([1.0], TypeError, "torch.Tensor"),
    ],
)
def test_input_errors(x, error, match):
    with pytest.raises(error, match=match):
        backbone()(x)


def test_constructor_errors():
    with pytest.raises(ValueError, match="patch_size"):
        backbone(patch_size=(4, 4))
    with pytest.raises(ValueError, match="frozen_stages"):
        backbone(frozen_stages=5)
    with pytest.raises(ValueError, match="num_heads"):
        backbone(num_heads=(3, 4))


@pytest.mark.parametrize("name, params", [("tiny", 28e6), ("small", 50e6), ("base", 88e6), ("large", 197e6)])
def test_registered_variants(name, params):
    with torch.device("meta"):
        model = create_model(f"video_swin_{name}")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.02, f"{name}: {count / 1e6:.1f}M"
    assert model.backbone.window_size == (8, 7, 7) and model.backbone.patch_size == (2, 4, 4)
    assert model.num_classes == 400 and "video_swin_tiny" in list_models("video_swin_*")


def test_create_model_overrides():
    model = create_model("video_swin_tiny", num_classes=7, embed_dim=8, depths=(1, 1), num_heads=(1, 2))
    assert model.eval()(torch.randn(1, 3, 4, 32, 32)).shape == (1, 7)


# -- official checkpoints --


def test_load_bare_backbone_into_classifier_and_head_reinit():
    source = classifier(num_classes=3)
    bare = {k[len("backbone.") :]: v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    target = classifier(num_classes=5)
    report = load_official_video(target, bare)
    assert report.missing == ["cls_head.fc_cls.weight", "cls_head.fc_cls.bias"] and not report.unexpected
    torch.testing.assert_close(target.backbone.norm.weight, source.backbone.norm.weight)

    with pytest.warns(UserWarning, match="re-initialised"):
        report = load_official_video(target, {"state_dict": source.state_dict()})
    assert report.reinitialised == ["cls_head.fc_cls.weight", "cls_head.fc_cls.bias"]


def test_recognizer_into_backbone_and_window_mismatch():
    source = classifier()
    report = load_official_video(backbone(), source.state_dict())
    assert report.unexpected == ["cls_head.fc_cls.weight", "cls_head.fc_cls.bias"] and not report.missing
    with pytest.raises(ValueError, match="window_size"):
        load_official_video(backbone(window_size=(1, 4, 4)), source.state_dict())
    with pytest.raises(ValueError, match="strict"):
        load_official_video(backbone(), source.state_dict(), strict=True)


# -- 2D -> 3D inflation --


class SwinV1Image(nn.Module):
    """A 2D Swin V1 backbone from the toolkit's rank-generic parts, official 2D key layout (plus ``head``)."""

    def __init__(self, embed_dim: int = 8, depths=(2, 2), num_heads=(2, 4), window: int = 4) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed((4, 4), 3, embed_dim)
        self.layers = swin_stages(SwinBlockV1, PatchMerging, embed_dim, depths, num_heads, (window, window))
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))
        self.head = nn.Linear(self.norm.normalized_shape[0], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).movedim(-1, 1)


def _randomised_2d(**kwargs) -> SwinV1Image:
    model = SwinV1Image(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "bias_table" in name else 0.1))
    return model


def _official_2d_state(model: SwinV1Image) -> dict:
    state = dict(model.state_dict())
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    return {"model": state}


@pytest.mark.parametrize("frames", [8, 6, 2])
@torch.no_grad()
def test_static_clip_reproduces_2d_features(frames):
    """A clip of one repeated frame through the inflated model gives the 2D map at every time step.

    Exact (up to round-off) for any temporal window, shift or padding here: every temporal copy of a key has the
    same value and (tiled table) the same bias, and the shift mask is a product of per-axis region tests, so a
    query sees k >= 1 identical copies of exactly the 2D key set; k cancels in the softmax. ``frames=8``: two
    temporal windows, shifted in odd blocks; ``6``: 3 time tokens padded to 4 (masked here; the official code
    would let the zero-padded keys in and break the equality); ``2``: one time token, window clamped to 1.
    """
    model2d = _randomised_2d()
    model3d = backbone().eval()
    report = inflate_from_2d(model3d, _official_2d_state(model2d))
    assert not report.missing
    assert report.inflated[0] == "patch_embed.proj.weight" and len(report.inflated) == 5  # kernel + 4 tables
    assert set(report.skipped) == {
        "head.weight",
        "head.bias",
        "layers.0.blocks.0.attn.relative_position_index",
        "layers.0.blocks.1.attn_mask",
    }
    image = torch.randn(2, 3, 32, 32)
    expected = model2d(image)
    out = model3d(image[:, :, None].expand(-1, -1, frames, -1, -1))
    assert out.shape[2] == -(-frames // 2)
    torch.testing.assert_close(out, expected[:, :, None].expand_as(out), atol=1e-5, rtol=1e-5)


def test_inflation_formulas():
    kernel = torch.randn(8, 3, 4, 4)
    inflated = inflate_patch_kernel(kernel, 2)
    assert inflated.shape == (8, 3, 2, 4, 4) and torch.equal(inflated.sum(2), kernel / 2 * 2)
    table = torch.randn(49, 2)
    tiled = inflate_bias_table(table, (3, 4, 4))
    assert tiled.shape == (5 * 49, 2) and torch.equal(tiled.view(5, 49, 2), table.expand(5, 49, 2))
    resized = inflate_bias_table(torch.randn(25, 2), (2, 4, 5))  # 2D window 3 -> spatial (4, 5)
    assert resized.shape == (3 * 7 * 9, 2)
    constant = inflate_bias_table(torch.full((25, 2), 0.5), (2, 4, 4))
    torch.testing.assert_close(constant, torch.full((3 * 49, 2), 0.5))


def test_inflate_reports_and_pretrained_argument(tmp_path):
    model2d = _randomised_2d(window=3)
    path = tmp_path / "swin2d.pth"
    torch.save(_official_2d_state(model2d), path)
    model3d = backbone(pretrained=path, pretrained2d=True, frozen_stages=0)
    torch.testing.assert_close(model3d.norm.weight, model2d.norm.weight)
    assert not model3d.patch_embed.proj.weight.requires_grad

    other_heads = backbone(num_heads=(1, 4))
    with pytest.warns(UserWarning, match="heads"):
        report = inflate_from_2d(other_heads, path)
    assert report.skipped["layers.0.blocks.0.attn.relative_position_bias_table"] == "head count 2 vs 1"
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in report.missing

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = inflate_from_2d(classifier(), path)  # into a classifier's backbone; its head is not touched
    assert not report.missing and len(report.copied) > 20


def test_create_model_pretrained_routes_to_the_video_loader(tmp_path):
    """A recognizer checkpoint with another class count loads through create_model (head re-initialised)."""
    kwargs = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=(2, 4, 4))
    source = create_model("video_swin_tiny", num_classes=5, **kwargs)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "official.pth")
    with pytest.warns(UserWarning, match="re-initialised"):
        model = create_model("video_swin_tiny", pretrained=tmp_path / "official.pth", num_classes=3, **kwargs)
    torch.testing.assert_close(model.backbone.patch_embed.proj.weight, source.backbone.patch_embed.proj.weight)


def test_inflation_refuses_what_is_not_a_2d_swin(tmp_path):
    resnet_like = {"conv1.weight": torch.randn(8, 3, 7, 7), "fc.weight": torch.randn(10, 8)}
    with pytest.raises(ValueError, match="not a 2D Swin checkpoint"):
        inflate_from_2d(backbone(), resnet_like)
    with pytest.raises(ValueError, match="already holds 3D"):
        inflate_from_2d(backbone(), backbone().state_dict())
    torch.save({"model": resnet_like}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth is not a 2D Swin"):
        backbone(pretrained=tmp_path / "resnet.pth")


# -- beyond the official code: the Swin V2 techniques in 3D --


def _randomised(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_v2_option_shapes_parameters_and_grads():
    model = backbone(swin_version=2)
    names = dict(model.named_parameters())
    assert not any("relative_position_bias_table" in n for n in names)
    attn = model.layers[0].blocks[0].attn
    assert attn.cpb_mlp[0].in_features == 3 and attn.logit_scale.shape == (2, 1, 1)  # 3D log-spaced CPB
    block = model.layers[0].blocks[1]
    assert not block.norm1.weight.any() and not block.norm2.weight.any()  # res-post-norm starts as identity
    assert model.no_weight_decay_keywords() == {"cpb_mlp", "logit_scale"}
    _randomised(model).train()
    x = torch.randn(2, 3, 7, 30, 34)  # padding in all three axes
    out = model(x)
    assert out.shape == (2, 16, 4, 4, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert attn.cpb_mlp[0].weight.grad.abs().sum() > 0 and attn.logit_scale.grad.abs().sum() > 0


def test_swin_version_picks_the_parts_handed_to_the_stages():
    """``swin_version`` is resolved once, at the constructor, into the block and merging the shared stage builder
    assembles; each version refuses the option it cannot use instead of ignoring it."""
    for version, block, merging in [(1, SwinBlockV1, PatchMerging), (2, SwinBlockV2PerAxis, PatchMergingV2)]:
        model = backbone(swin_version=version)
        assert {type(b) for layer in model.layers for b in layer.blocks} == {block}
        assert type(model.layers[0].downsample) is merging and model.layers[-1].downsample is None
    assert backbone(qk_scale=0.5).layers[1].blocks[0].attn.scale == 0.5
    v2 = backbone(swin_version=2, pretrained_window_size=(2, 3, 3))
    assert {b.attn.pretrained_window for layer in v2.layers for b in layer.blocks} == {(2, 3, 3)}
    with pytest.raises(ValueError, match="qk_scale"):
        backbone(swin_version=2, qk_scale=0.5)
    with pytest.raises(ValueError, match="pretrained_window_size"):
        backbone(pretrained_window_size=(2, 4, 4))
    with pytest.raises(ValueError, match="one entry per window axis"):
        backbone(swin_version=2, pretrained_window_size=(4, 4))
    with pytest.raises(ValueError, match="swin_version must be 1"):
        backbone(swin_version=3)


def test_v2_window_change_needs_no_table_resampling():
    """The continuous position bias has no per-window table: weights trained with one window load unchanged
    into a model with another (longer clip window, larger spatial window) and run; the V1 table cannot."""
    trained = _randomised(backbone(swin_version=2))
    state = trained.state_dict()
    bigger = backbone(swin_version=2, window_size=(4, 8, 8), pretrained_window_size=(2, 4, 4)).eval()
    bigger.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 8, 64, 64)
    with torch.no_grad():
        a, b = trained(x), bigger(x)
    assert a.shape == b.shape and torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-3)  # the larger window does change what each token sees
    with pytest.raises(RuntimeError, match="relative_position_bias_table"):
        backbone(window_size=(4, 8, 8)).load_state_dict(_randomised(backbone()).state_dict())


def test_v2_short_clip_clamps_only_time():
    """Video Swin's per-axis window rule also holds for V2 blocks: a 2-frame clip (1 token in time) keeps the
    spatial window 4x4 instead of shrinking the whole window to 1 as the 2D Swin V2 rule would."""
    block = backbone(swin_version=2).layers[0].blocks[0]
    assert block.geometry((1, 8, 8)).window == (1, 4, 4)


def test_v1_block_in_place_residuals_give_the_reference_gradients():
    """The V1 block adds its residuals in place into the branch outputs; values and gradients must equal the
    textbook ``x + f(norm(x))`` form."""
    torch.manual_seed(0)
    block = SwinBlockV1(16, 2, (2, 4, 4), (1, 2, 2)).train()
    x = torch.randn(2, 4, 8, 8, 16, requires_grad=True)
    out = block(x)
    out.square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()
    h = x + block.window_attention(block.norm1(x))
    ref = h + block.mlp(block.norm2(h))
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, [x.grad] + [p.grad for p in block.parameters()], strict=True):
        torch.testing.assert_close(a, b)
