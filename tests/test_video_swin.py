"""Video Swin on tiny configs: shapes, padding and window clamping, padding against a reference of the official
block (and the ``pad_mask`` option), freezing, the classifier's toolkit interface, registered variants, official
checkpoint loading and 2D -> 3D inflation (including the static-clip property)."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
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


@pytest.mark.parametrize("pad_mask", [False, True])
def test_clamped_window_offsets(pad_mask):
    """A 1-frame grid with window (2, 4, 4) attends with window (1, 4, 4): the bias is the dt = 0 slice of the
    table, gathered with the index of the smaller window, under both settings (time is the leading axis, so the
    official ``index[:N, :N]`` slice gives the true offsets). A window shrunk in H, e.g. (2, 3, 4), reads the
    official slice by default and its true offsets with ``pad_mask=True``."""
    attn = backbone(pad_mask=pad_mask).layers[0].blocks[0].attn
    table = attn.relative_position_bias_table.detach()
    expected = gather_relative_bias(table.view(3, 49, -1)[1], (1, 4, 4))
    assert torch.equal(attn.position_bias((1, 4, 4)).detach(), expected)
    true_offsets = gather_relative_bias(table.view(3, 7, 7, -1)[:, 1:6].reshape(-1, 2), (2, 3, 4))
    official = gather_relative_bias(table, (2, 4, 4))[:, :24, :24]
    assert torch.equal(attn.position_bias((2, 3, 4)).detach(), true_offsets if pad_mask else official)
    assert not torch.equal(true_offsets, official)


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


@pytest.mark.parametrize("frames, pad_mask", [(8, False), (6, True), (2, False)])
@torch.no_grad()
def test_static_clip_reproduces_2d_features(frames, pad_mask):
    """A clip of one repeated frame through the inflated model gives the 2D map at every time step.

    Exact (up to round-off) for any temporal window, shift or padding here: every temporal copy of a key has the
    same value and (tiled table) the same bias, and the shift mask is a product of per-axis region tests, so a
    query sees k >= 1 identical copies of exactly the 2D key set; k cancels in the softmax. ``frames=8``: two
    temporal windows, shifted in odd blocks; ``6``: 3 time tokens padded to 4, which needs ``pad_mask=True`` (the
    official semantics let the zero-padded keys in and break the equality, checked below); ``2``: one time token,
    window clamped to 1.
    """
    model2d = _randomised_2d()
    model3d = backbone(pad_mask=pad_mask).eval()
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
    clip = image[:, :, None].expand(-1, -1, frames, -1, -1)
    out = model3d(clip)
    assert out.shape[2] == -(-frames // 2)
    torch.testing.assert_close(out, expected[:, :, None].expand_as(out), atol=1e-5, rtol=1e-5)
    if pad_mask:
        official = backbone().eval()
        official.load_state_dict(model3d.state_dict())
        assert not torch.allclose(official(clip), expected[:, :, None].expand_as(out), atol=1e-3)


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


# -- padding inside blocks: the official semantics (default) against a reference, and the pad_mask option --


def _ln(x: torch.Tensor, p: dict, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])


def official_block(x: torch.Tensor, p: dict, window: tuple, shift: tuple, heads: int) -> torch.Tensor:
    """One official ``SwinTransformerBlock3D`` on ``(B, D, H, W, C)``, restated from its semantics (parameters
    ``p`` under the official names, without the block prefix), independent of swinlab's window code:

    per axis, a grid side not larger than the window uses window = side and no shift; ``norm1``; zero-pad at the
    end to window multiples (after the norm, so padded tokens are zero vectors); roll by ``-shift``; each token
    attends to the tokens of its window, padded ones included, with -100 added between two tokens of which exactly
    one wrapped around in the roll on some axis (the official ``compute_mask`` on the padded size, which never
    singles out padding); roll back, crop, residual; ``norm2``, MLP, residual. The bias reads the table at the
    official ``relative_position_index[:N, :N]`` of the configured window: a token's number in the effective
    window taken as a position in the configured one (the true offsets unless H or W shrank).
    """
    batch, *grid, dim = x.shape
    win = [g if g <= w else w for g, w in zip(grid, window, strict=True)]
    sft = [0 if g <= w else s for g, w, s in zip(grid, window, shift, strict=True)]
    h = _ln(x, p, "norm1")
    h = F.pad(h, (0, 0, 0, -grid[2] % win[2], 0, -grid[1] % win[1], 0, -grid[0] % win[0]))
    padded = h.shape[1:4]
    h = torch.roll(h, [-s for s in sft], dims=(1, 2, 3))
    # every position of the rolled, padded grid in raster order; then the positions of each window, in raster order
    pos = torch.cartesian_prod(*(torch.arange(n) for n in padded))
    tile = pos // torch.tensor(win)
    n = win[0] * win[1] * win[2]
    groups = torch.argsort((tile[:, 0] * padded[1] + tile[:, 1]) * padded[2] + tile[:, 2], stable=True).view(-1, n)
    wrapped = (pos + torch.tensor(sft) >= torch.tensor(padded))[groups]  # (nW, n, 3)
    mask = (wrapped[:, :, None] != wrapped[:, None]).any(-1) * -100.0
    conf = torch.stack(torch.unravel_index(torch.arange(n), tuple(window)), -1)
    offset = conf[:, None] - conf[None] + torch.tensor(window) - 1
    index = (offset[..., 0] * (2 * window[1] - 1) + offset[..., 1]) * (2 * window[2] - 1) + offset[..., 2]
    bias = p["attn.relative_position_bias_table"][index].permute(2, 0, 1)  # (heads, n, n)
    tokens = h.reshape(batch, -1, dim)[:, groups]  # (B, nW, n, C)
    qkv = F.linear(tokens, p["attn.qkv.weight"], p["attn.qkv.bias"])
    q, k, v = qkv.view(*tokens.shape[:3], 3, heads, -1).permute(3, 0, 1, 4, 2, 5)  # each (B, nW, heads, n, d)
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias + mask[:, None]
    out = F.linear((logits.softmax(-1) @ v).transpose(2, 3).reshape(tokens.shape), *_linear(p, "attn.proj"))
    merged = torch.empty(batch, groups.numel(), dim, dtype=out.dtype)
    merged[:, groups.flatten()] = out.flatten(1, 2)
    merged = torch.roll(merged.view(batch, *padded, dim), sft, dims=(1, 2, 3))
    x = x + merged[:, : grid[0], : grid[1], : grid[2]]
    return x + F.linear(F.gelu(F.linear(_ln(x, p, "norm2"), *_linear(p, "mlp.fc1"))), *_linear(p, "mlp.fc2"))


def _linear(p: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return p[f"{name}.weight"], p[f"{name}.bias"]


def official_forward(model: SwinTransformer3D, clip: torch.Tensor) -> torch.Tensor:
    """The official ``SwinTransformer3D.forward`` in float64 with ``model``'s weights (official key names):
    clip zero-padded at the end to patch multiples, Conv3d, LayerNorm; stages of :func:`official_block`
    (shift = window // 2 in odd blocks), patch merging (odd H, W zero-padded; 2x2 neighbours concatenated in the
    order (0,0), (1,0), (0,1), (1,1); norm; reduction); final norm."""
    p = {k: v.double() for k, v in model.state_dict().items()}
    pt, ph, pw = model.patch_size
    x = F.pad(clip.double(), (0, -clip.shape[4] % pw, 0, -clip.shape[3] % ph, 0, -clip.shape[2] % pt))
    x = _ln(F.conv3d(x, *_linear(p, "patch_embed.proj"), stride=model.patch_size).movedim(1, -1), p, "patch_embed.norm")
    for i, layer in enumerate(model.layers):
        for j, block in enumerate(layer.blocks):
            shift = tuple(w // 2 for w in model.window_size) if j % 2 else (0, 0, 0)
            prefix = f"layers.{i}.blocks.{j}."
            params = {k[len(prefix) :]: v for k, v in p.items() if k.startswith(prefix)}
            x = official_block(x, params, model.window_size, shift, block.attn.num_heads)
        if layer.downsample is not None:
            x = F.pad(x, (0, 0, 0, x.shape[3] % 2, 0, x.shape[2] % 2))
            x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
            x = F.linear(_ln(x, p, f"layers.{i}.downsample.norm"), p[f"layers.{i}.downsample.reduction.weight"])
    return _ln(x, p, "norm").movedim(-1, 1)


def _official_like(model: nn.Module) -> nn.Module:
    """Parameters made non-trivial as in the golden fixtures (shared/golden/README.md): LayerNorm weight 1 + 0.2 N
    and bias 0.1 N, other weights + N / sqrt(fan_in), biases 0.1 N, bias tables + 0.5 N."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif "bias_table" in name:
                p.add_(0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) / p[0].numel() ** 0.5)
    return model.eval()


def test_reference_reproduces_the_golden_fixture(golden_dir):
    """The reference below is itself checked against the recorded official output (a case without padding)."""
    golden = torch.load(golden_dir / "vswin_basic.pt", map_location="cpu", weights_only=True)
    model = SwinTransformer3D(**{k: tuple(v) if isinstance(v, list) else v for k, v in golden["config"].items()})
    load_official_video(model, golden["state_dict"], strict=True)
    torch.testing.assert_close(official_forward(model, golden["input"]).float(), golden["output"], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "clip, grids",
    [
        # token grids (3, 9, 10) -> padded (4, 12, 12), then (3, 5, 5) -> (4, 8, 8): every stage pads T, H and W
        # and its second block shifts by (1, 2, 2)
        ((5, 35, 39), [(3, 9, 10), (3, 5, 5)]),
        # one time token: T clamps to window 1 (no temporal shift) while H and W are padded and shifted
        ((2, 27, 25), [(1, 7, 7), (1, 4, 4)]),
        # (3, 5, 7) padded in T, H, W; then (3, 3, 4): H shrinks the window to (2, 3, 4) (official sliced index),
        # T is padded and shifted, H and W are not shifted
        ((5, 19, 27), [(3, 5, 7), (3, 3, 4)]),
    ],
)
def test_padding_follows_the_official_block(clip, grids):
    """Default semantics on inputs padded in T, H and W at once (batch 2, shifted windows): the model equals the
    float64 reference of the official block within float32 round-off (measured ~3e-6; ``pad_mask=True``, which
    masks the padded tokens, moves the output by ~1-3)."""
    model = _official_like(backbone())
    x = torch.randn(2, 3, *clip)
    with torch.no_grad():
        stages = model.forward_features(x, return_stages=True)
        out = model(x)
    assert [tuple(s.shape[2:]) for s in stages] == grids
    expected = official_forward(model, x)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)

    masked = backbone(pad_mask=True).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (masked(x).double() - expected).abs().max() > 0.1


def test_pad_mask_leaves_unpadded_inputs_alone_and_is_a_builder_option():
    model = _official_like(backbone())
    masked = backbone(pad_mask=True).eval()
    masked.load_state_dict(model.state_dict())
    assert not model.pad_mask and masked.pad_mask
    assert {b.pad_mask for layer in masked.layers for b in layer.blocks} == {True}
    x = torch.randn(2, 3, 8, 32, 32)  # grids (4, 8, 8), (4, 4, 4): multiples of the window (2, 4, 4)
    with torch.no_grad():
        assert torch.equal(masked(x), model(x))
        padded = torch.randn(2, 3, 5, 35, 39)
        assert not torch.allclose(masked(padded), model(padded), atol=1e-2)
    created = create_model("video_swin_nano", pad_mask=True)
    assert created.backbone.pad_mask and created.backbone.layers[0].blocks[1].geometry((3, 5, 5)).pad_mask
    v2 = backbone(swin_version=2, pad_mask=True)
    assert {b.pad_mask for layer in v2.layers for b in layer.blocks} == {True}


@pytest.mark.parametrize("pad_mask", [True, False])
@torch.no_grad()
def test_pad_mask_makes_windows_independent_of_padding(pad_mask):
    """With ``pad_mask=True`` the unshifted block on a grid that needs padding equals the block run on each
    window-aligned piece of the grid alone (a piece smaller than the window clamps it, so nothing is padded
    there): the padding changes nothing. The official semantics (default) let the zero-padded keys in, so every
    piece that had padding in its window differs; the one full window agrees either way."""
    block = _official_like(backbone(pad_mask=pad_mask)).layers[0].blocks[0]
    x = torch.randn(2, 3, 6, 7, 8)  # window (2, 4, 4): padded to (4, 8, 8)
    out = block(x)
    axes = [(slice(0, 2), slice(2, 3)), (slice(0, 4), slice(4, 6)), (slice(0, 4), slice(4, 7))]
    for piece in itertools.product(*axes):
        index = (slice(None), *piece, slice(None))
        alone = block(x[index])
        if pad_mask or piece == (slice(0, 2), slice(0, 4), slice(0, 4)):
            torch.testing.assert_close(out[index], alone, msg=f"piece {piece}")
        else:
            assert not torch.allclose(out[index], alone, atol=1e-3), f"piece {piece}"
