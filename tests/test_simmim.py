"""SimMIM (issue 14): golden parity with the official code, the mask generator, target normalisation against a
per-pixel loop, the loss, non-square images, errors before any compute, and official-layout checkpoint loading
into a SimMIM and into a classifier."""

import math

import pytest
import torch

from swinlab.models.checkpoints import load_official
from swinlab.models.swin import SwinTransformerV2
from swinlab.pretrain.simmim import MaskGenerator, SimMIM, normalize_targets, simmim_loss, upsample_mask

# two stages of patch 4 -> encoder stride 8
TINY = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=8, depths=[1, 1], num_heads=[2, 4], window_size=4)
TINY_SIMMIM = dict(encoder_stride=8, in_chans=3, patch_size=4)


def tiny_simmim(norm: bool = False, **config) -> SimMIM:
    model = SimMIM.from_official({**TINY, "num_classes": 0, **config}, {**TINY_SIMMIM, "norm_target_enable": norm})
    with torch.no_grad():  # non-trivial decoder, post-norms and mask token
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p) if name.endswith(("bias", "mask_token")) else 0.0)
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.fill_(1.0)
    return model.eval()


def derived_buffers(state: dict) -> dict:
    """Official derived buffers with placeholder values (load_official must drop them)."""
    state = dict(state)
    state["encoder.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["encoder.layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    return state


# -- golden parity --


@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "simmim_swinv2_nonorm.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def golden_model(golden):
    model = SimMIM.from_official(golden["config"], golden["simmim_config"])
    report = load_official(model, golden["state_dict"], strict=True)
    assert report.missing == report.unexpected == report.dropped == []
    return model.eval()


def test_golden_loss_reconstruction_and_encoder(golden, golden_model):
    x, mask = golden["input"], golden["mask"]
    with torch.no_grad():
        loss, reconstruction = golden_model.loss_and_reconstruction(x, mask)
        encoded = golden_model.encoder.forward_features(x, mask=mask, return_map=True)
        torch.testing.assert_close(golden_model(x, mask), loss, rtol=1e-6, atol=0)  # masked cells only
        assert torch.equal(golden_model.reconstruct(x, mask), reconstruction)
    torch.testing.assert_close(loss, golden["output"], rtol=1e-5, atol=0)
    torch.testing.assert_close(reconstruction, golden["reconstruction"], atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(encoded, golden["encoder_output"], atol=3e-4, rtol=1e-4)
    assert torch.equal(golden_model.target(x), golden["normalized_target"])  # raw targets in this case


def test_golden_mask_dtypes_agree(golden, golden_model):
    x, mask = golden["input"], golden["mask"]
    with torch.no_grad():
        ref = golden_model(x, mask)
        for dtype in (torch.bool, torch.int32, torch.uint8, torch.float32):
            assert torch.equal(golden_model(x, mask.to(dtype)), ref), dtype


def test_golden_mask_token_matters(golden, golden_model):
    """The recorded loss depends on the mask token: a model without it loaded is far off."""
    state = dict(golden["state_dict"])
    state["encoder.mask_token"] = torch.zeros_like(state["encoder.mask_token"])
    model = SimMIM.from_official(golden["config"], golden["simmim_config"])
    load_official(model, state, strict=True)
    with torch.no_grad():
        assert not torch.allclose(model.eval()(golden["input"], golden["mask"]), golden["output"], rtol=1e-3)


# -- mask generator --


def test_mask_generator_counts_blocks_and_shape():
    gen = MaskGenerator(96, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    assert gen.mask_count == 6 and gen.token_grid == (24, 24)  # ceil(0.6 * 9)
    mask = gen(64, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (64, 24, 24) and mask.dtype == torch.long
    assert set(mask.unique().tolist()) == {0, 1}
    cells = mask[:, ::8, ::8]
    assert torch.equal(cells.sum((1, 2)), torch.full((64,), 6))  # exactly ceil(ratio * cells) per image
    assert torch.equal(upsample_mask(cells, 8), mask)  # constant over each 8x8 block of tokens
    assert gen(generator=torch.Generator().manual_seed(1)).shape == (24, 24)  # one mask, as the official call


@pytest.mark.parametrize(
    ("size", "ratio", "count"), [((64, 128), 0.6, 5), (128, 0.5, 8), (96, 0.0, 0), (96, 1.0, 9), (160, 0.75, 19)]
)
def test_mask_generator_ceil_and_non_square(size, ratio, count):
    gen = MaskGenerator(size, 32, 4, ratio)
    h, w = (size, size) if isinstance(size, int) else size
    mask = gen(8, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (8, h // 4, w // 4)
    assert gen.mask_count == count == math.ceil(ratio * (h // 32) * (w // 32))
    assert torch.equal(mask.sum((1, 2)), torch.full((8,), count * 64))


def test_mask_generator_seeded_and_uniform():
    gen = MaskGenerator(128, 32, 4, 0.6)  # 16 cells, 10 masked
    a = gen(4, generator=torch.Generator().manual_seed(7))
    b = gen(4, generator=torch.Generator().manual_seed(7))
    c = gen(4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = gen(4)
    torch.manual_seed(3)
    assert torch.equal(gen(4), d)  # the global torch RNG when no generator is given
    # every cell is masked with probability 10/16; 4000 draws: 5 sigma ~ 0.038
    freq = gen(4000, generator=torch.Generator().manual_seed(0))[:, ::8, ::8].float().mean(0)
    assert (freq - 10 / 16).abs().max() < 0.04
    # masks of different images are independent: the pairwise overlap averages 16 * (10/16)^2 cells
    masks = gen(2000, generator=torch.Generator().manual_seed(1))[:, ::8, ::8].flatten(1).float()
    overlap = (masks[::2] * masks[1::2]).sum(1).mean()
    assert abs(overlap.item() - 16 * (10 / 16) ** 2) < 0.15


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(input_size=96, mask_patch_size=30, model_patch_size=4), "mask_patch_size=30 .* model patch size 4"),
        (dict(input_size=100, mask_patch_size=32), r"\(100, 100\) .* mask_patch_size=32"),
        (dict(input_size=(64, 80), mask_patch_size=32), r"\(64, 80\) .* mask_patch_size=32"),
        (dict(input_size=96, mask_ratio=1.5), "mask_ratio"),
        (dict(input_size=0), "input_size"),
    ],
)
def test_mask_generator_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskGenerator(**kwargs)


# -- target normalisation and loss --


def loop_normalize(x: torch.Tensor, window: int) -> torch.Tensor:
    """The official definition pixel by pixel: mean and unbiased variance of the in-image window."""
    out = torch.empty_like(x)
    half = window // 2
    h, w = x.shape[-2:]
    for i in range(h):
        for j in range(w):
            patch = x[:, :, max(i - half, 0) : i + half + 1, max(j - half, 0) : j + half + 1].flatten(2)
            mean, var = patch.mean(-1), patch.var(-1, unbiased=True).clamp_min(0)
            out[:, :, i, j] = (x[:, :, i, j] - mean) / torch.sqrt(var + 1e-6)
    return out


@pytest.mark.parametrize(("size", "window"), [((7, 9), 3), ((7, 9), 5), ((4, 5), 7), ((6, 6), 47)])
def test_normalize_targets_against_loop(size, window):
    x = torch.randn(2, 3, *size, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(normalize_targets(x, window), loop_normalize(x, window), rtol=1e-9, atol=1e-9)
    got32 = normalize_targets(x.float(), window)
    torch.testing.assert_close(got32.double(), loop_normalize(x, window), rtol=1e-4, atol=1e-4)


def test_normalize_targets_flat_image_and_errors():
    flat = torch.full((1, 1, 5, 5), 3.0)
    assert torch.equal(normalize_targets(flat, 3), torch.zeros_like(flat))  # variance 0 -> (x - mean) = 0
    for window in (4, 1):
        with pytest.raises(ValueError, match=f"odd and at least 3, got {window}"):
            normalize_targets(flat, window)


def test_loss_is_mean_l1_over_masked_pixel_values():
    target, reconstruction = torch.randn(2, 3, 16, 24), torch.randn(2, 3, 16, 24)
    mask = (torch.rand(2, 4, 6) < 0.5).long()
    pixels = upsample_mask(mask, 4).bool().unsqueeze(1).expand_as(target)
    expected = (target - reconstruction).abs()[pixels].mean()
    loss = simmim_loss(target, reconstruction, mask, 4)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    changed = reconstruction.masked_fill(~pixels, 100.0)  # unmasked pixels do not count
    assert torch.equal(simmim_loss(target, changed, mask, 4), loss)
    assert simmim_loss(target, reconstruction, torch.zeros_like(mask), 4) == 0


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_training_loss_computes_the_cells_it_reads(norm, ratio, drop_path):
    """``model(x, mask)`` runs the last block's MLP, the final norm and the decoder only for cells with a masked
    pixel: the loss and every gradient of the full reconstruction's, also for a mask that does not follow the
    decoder's cells (images with fewer masked cells get cells that count zero) and with drop path drawing."""
    model = tiny_simmim(norm=norm, drop_path_rate=drop_path).train().double()  # the function, not fp32 rounding
    x = torch.randn(2, 3, 32, 64, dtype=torch.float64)
    mask = (torch.rand(2, 8, 16, generator=torch.Generator().manual_seed(0)) < ratio).long()
    results = []
    for loss_of in (lambda: model.loss_and_reconstruction(x, mask)[0], lambda: model(x, mask)):
        torch.manual_seed(1)  # the same drop-path draws
        loss = loss_of()
        results.append([loss, *torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)])
    for ref, new in zip(*results, strict=True):
        if ref is None:
            assert new is None
        else:
            torch.testing.assert_close(new, ref)
    assert (results[0][0] == 0) == (ratio == 0.0)


def test_norm_target_loss_uses_normalised_pixels():
    model = tiny_simmim(norm=True)
    x = torch.randn(2, 3, 32, 32) * 3 + 2
    mask = MaskGenerator(32, 16, 4, 0.6)(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, reconstruction = model.loss_and_reconstruction(x, mask)
    torch.testing.assert_close(loss, simmim_loss(normalize_targets(x, 47), reconstruction, mask, 4))
    assert not torch.allclose(loss, simmim_loss(x, reconstruction, mask, 4))


# -- the model --


def test_non_square_image_trains():
    model = tiny_simmim(norm=True).train()
    gen = MaskGenerator((32, 64), mask_patch_size=16, model_patch_size=4)
    x, mask = torch.randn(2, 3, 32, 64), gen(2, generator=torch.Generator().manual_seed(0))
    assert model.reconstruct(x, mask).shape == (2, 3, 32, 64)
    assert model.encoder.forward_features(x, mask=mask, return_map=True).shape == (2, 16, 4, 8)
    loss = model(x, mask)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.encoder.mask_token.grad.abs().sum() > 0 and model.decoder[0].weight.grad.abs().sum() > 0


def test_mask_semantics():
    """No mask: the plain encoder. All masked: the image is invisible. Unmasked tokens never see the token."""
    model = tiny_simmim()
    x, other = torch.randn(2, 3, 32, 48), torch.randn(2, 3, 32, 48)
    zeros, ones = torch.zeros(2, 8, 12, dtype=torch.long), torch.ones(2, 8, 12, dtype=torch.long)
    with torch.no_grad():
        plain = model.encoder.forward_features(x, return_map=True)
        torch.testing.assert_close(model.encoder.forward_features(x, mask=zeros, return_map=True), plain)
        torch.testing.assert_close(model.reconstruct(x, ones), model.reconstruct(other, ones))
        assert not torch.allclose(model.reconstruct(x, zeros), model.reconstruct(other, zeros))
        pooled = model.encoder.forward_features(x)
        torch.testing.assert_close(pooled, plain.mean((2, 3)))
    model.train()
    model(x, zeros).backward()
    assert model.encoder.mask_token.grad.abs().max() == 0


def test_mask_token_is_optional_on_the_encoder():
    classifier = SwinTransformerV2(**{**TINY, "num_classes": 5})
    assert "mask_token" not in classifier.state_dict() and classifier.mask_token is None
    with pytest.raises(ValueError, match="no mask token"):
        classifier.forward_features(torch.randn(1, 3, 32, 32), mask=torch.zeros(1, 8, 8))
    token = classifier.enable_mask_token()
    assert classifier.enable_mask_token() is token and token.shape == (1, 1, 8)
    assert "mask_token" in classifier.state_dict() and "mask_token" in classifier.no_weight_decay()
    model = tiny_simmim()
    assert "encoder.mask_token" in model.no_weight_decay()
    assert sorted(k for k in model.state_dict() if not k.startswith("encoder.layers")) == [
        "decoder.0.bias",
        "decoder.0.weight",
        "encoder.mask_token",
        "encoder.norm.bias",
        "encoder.norm.weight",
        "encoder.patch_embed.norm.bias",
        "encoder.patch_embed.norm.weight",
        "encoder.patch_embed.proj.bias",
        "encoder.patch_embed.proj.weight",
    ]
    assert model.decoder[0].out_channels == 8 * 8 * 3 and model.decoder[1].upscale_factor == 8


# -- errors before any compute --


class _NoCompute:
    """Fails the test if the patch embedding runs."""

    def __init__(self, model: SimMIM) -> None:
        self.handle = model.encoder.patch_embed.register_forward_pre_hook(self._fail)

    @staticmethod
    def _fail(*_):
        raise AssertionError("computed before rejecting the input")

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.handle.remove()


@pytest.mark.parametrize(
    ("x", "mask", "error", "message"),
    [
        (torch.randn(2, 3, 36, 32), torch.zeros(2, 9, 8), ValueError, r"\(36, 32\) .* encoder stride 8"),
        (torch.randn(2, 3, 32, 32), torch.zeros(2, 8, 4), ValueError, r"\(2, 8, 4\) .* \(2, 8, 8\)"),
        (torch.randn(2, 3, 32, 32), torch.zeros(1, 8, 8), ValueError, r"\(1, 8, 8\) .* \(2, 8, 8\)"),
        (torch.randn(2, 3, 32, 32), torch.zeros(2, 32, 32), ValueError, "expected .* = \\(2, 8, 8\\)"),
        (torch.randn(2, 3, 32, 32), torch.zeros(2, 8, 8, dtype=torch.complex64), TypeError, "complex64"),
        (torch.randn(2, 3, 32, 32), [[0]], TypeError, "torch.Tensor"),
        (torch.randn(2, 1, 32, 32), torch.zeros(2, 8, 8), ValueError, "3 input channels"),
    ],
)
def test_input_errors_before_compute(x, mask, error, message):
    model = tiny_simmim()
    with _NoCompute(model), pytest.raises(error, match=message):
        model(x, mask)


@pytest.mark.parametrize(
    ("config", "simmim", "message"),
    [
        (dict(num_classes=10), {}, "num_classes=0, got 10"),
        (dict(window=4), {}, "unknown .* 'window' \\(did you mean 'window_size'"),
        ({}, dict(norm_target=True), "unknown SimMIM config key 'norm_target'"),
        ({}, dict(encoder_stride=16), "encoder_stride=16 .* output stride is 8"),
        ({}, dict(in_chans=1), "in_chans=1"),
        ({}, dict(patch_size=2), "patch_size=2"),
        ({}, dict(norm_target_enable=True, norm_target_patch_size=48), "odd and at least 3, got 48"),
    ],
)
def test_construction_errors(config, simmim, message):
    with pytest.raises(ValueError, match=message):
        SimMIM.from_official({**TINY, **config}, {**TINY_SIMMIM, **simmim})


def test_encoder_with_classes_is_refused():
    with pytest.raises(ValueError, match="num_classes=0, got 10"):
        SimMIM(SwinTransformerV2(**{**TINY, "num_classes": 10}), encoder_stride=8)
    with pytest.raises(ValueError, match="encoder_stride"):
        SimMIM.from_official(TINY, {})


# -- checkpoints --


def test_load_official_strict_round_trip():
    source = tiny_simmim(norm=True)
    target = tiny_simmim(norm=True)
    report = load_official(target, derived_buffers(source.state_dict()), strict=True)
    assert report.missing == report.unexpected == report.resized == report.dropped == []
    x, mask = torch.randn(2, 3, 32, 32), MaskGenerator(32, 16, 4)(2)
    with torch.no_grad():
        assert torch.equal(target(x, mask), source(x, mask))
    partial = {k: v for k, v in source.state_dict().items() if k != "encoder.mask_token"}
    with pytest.raises(ValueError, match=r"missing \['encoder.mask_token'\]"):
        load_official(tiny_simmim(), partial, strict=True)


def test_simmim_checkpoint_into_classifier():
    source = tiny_simmim()
    classifier = SwinTransformerV2(**{**TINY, "num_classes": 5})
    report = load_official(classifier, derived_buffers(source.state_dict()))
    assert report.stripped_prefix == "encoder."
    assert sorted(report.dropped) == ["decoder.0.bias", "decoder.0.weight", "encoder.mask_token"]
    assert sorted(report.missing) == ["head.bias", "head.weight"] and report.unexpected == []
    for name, value in classifier.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, source.encoder.state_dict()[name]), name
    with pytest.raises(ValueError, match="missing"):
        load_official(SwinTransformerV2(**{**TINY, "num_classes": 5}), source.state_dict(), strict=True)
    # an encoder that has a mask token keeps it
    encoder = SwinTransformerV2(**{**TINY, "num_classes": 0})
    encoder.enable_mask_token()
    report = load_official(encoder, source.state_dict(), strict=True)
    assert report.dropped == ["decoder.0.weight", "decoder.0.bias"]
    assert torch.equal(encoder.mask_token, source.encoder.mask_token)


def test_simmim_checkpoint_into_other_width_names_keys():
    source = tiny_simmim()
    wider = SwinTransformerV2(**{**TINY, "embed_dim": 16, "num_classes": 5})
    with pytest.raises(
        ValueError, match=r"patch_embed.proj.weight: checkpoint \(8, 3, 4, 4\) vs model \(16, 3, 4, 4\)"
    ):
        load_official(wider, source.state_dict())


def test_load_that_matches_nothing_is_an_error():
    classifier = SwinTransformerV2(**{**TINY, "num_classes": 5})
    with pytest.raises(ValueError, match="no checkpoint key matches the model"):
        load_official(classifier, {"backbone.stem.weight": torch.zeros(3), "fc.bias": torch.zeros(2)})
