"""transformers' Swinv2 layouts -> official layout -> swinlab, checked against transformers' own outputs.

Every weight of the tiny transformers models is re-drawn at random (post-norms and logit scales included), so a
swapped or mis-mapped tensor changes the outputs. Skipped as a whole when transformers is not installed.
"""

from __future__ import annotations

import pytest
import torch

from swinlab.models.checkpoints import load_official
from swinlab.models.hf_keys import hf_config_to_kwargs, hf_key_to_official, hf_to_official, is_hf_swinv2
from swinlab.models.swin import SwinTransformerV2
from swinlab.pretrain.simmim import SimMIM

transformers = pytest.importorskip("transformers")

ATOL = 1e-5


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.2 if param.ndim > 1 else 0.5))
    return model.eval()


def _config(**overrides) -> transformers.Swinv2Config:
    base = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[2, 4], window_size=4)
    return transformers.Swinv2Config(**{**base, **overrides})


def _swinlab(config, num_classes: int = 0) -> SwinTransformerV2:
    return SwinTransformerV2(**hf_config_to_kwargs(config, num_classes=num_classes)).eval()


def _image(config, batch: int = 2) -> torch.Tensor:
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, config.num_channels, h, w, generator=torch.Generator().manual_seed(1))


CASES = {
    "default": {},
    "window8_pretrained": dict(
        image_size=64, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=8, pretrained_window_sizes=[6, 4, 3]
    ),
    "window4_three_stages": dict(
        image_size=64, depths=[2, 2, 2], num_heads=[1, 2, 4], pretrained_window_sizes=[3, 3, 2]
    ),
    "no_qkv_bias_patch2": dict(patch_size=2, qkv_bias=False, mlp_ratio=2.0),
    # grids (8, 16) -> (4, 8): the window divides every side. Where it does not, transformers pads with zero tokens
    # that are attended as keys, swinlab masks them (the official classifier rejects such inputs): not compared.
    "non_square": dict(image_size=[32, 64], depths=[2, 2], pretrained_window_sizes=[4, 3]),
}


@pytest.mark.parametrize("name", CASES)
def test_classifier_logits_match_transformers(name):
    config = _config(num_labels=5, **CASES[name])
    hf = _randomise(transformers.Swinv2ForImageClassification(config))
    model = _swinlab(config, num_classes=5)
    report = load_official(model, hf.state_dict(), strict=True)
    assert not report.missing and not report.unexpected
    x = _image(config)
    with torch.no_grad():
        expected, got = hf(x).logits, model(x)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["default", "window8_pretrained"])
def test_bare_model_pooled_features_match_transformers(name):
    config = _config(**CASES[name])
    hf = _randomise(transformers.Swinv2Model(config))
    state = hf.state_dict()
    assert not any(k.startswith("swinv2.") for k in state)  # the bare layout, no task prefix
    model = _swinlab(config)
    load_official(model, state, strict=True)
    x = _image(config)
    with torch.no_grad():
        out = hf(x)
        torch.testing.assert_close(model.forward_features(x), out.pooler_output, atol=ATOL, rtol=0)
        last = model.forward_features(x, return_stages=True)[-1]
        tokens = model.norm(last.permute(0, 2, 3, 1)).flatten(1, 2)
    torch.testing.assert_close(tokens, out.last_hidden_state, atol=ATOL, rtol=0)


def test_safetensors_file_from_save_pretrained_loads(tmp_path):
    config = _config(num_labels=3)
    hf = _randomise(transformers.Swinv2ForImageClassification(config))
    hf.save_pretrained(tmp_path)
    model = _swinlab(config, num_classes=3)
    load_official(model, tmp_path / "model.safetensors", strict=True)
    x = _image(config)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=ATOL, rtol=0)


def test_qkv_fused_in_official_order_and_key_names():
    config = _config()
    hf = _randomise(transformers.Swinv2Model(config))
    hf_state = hf.state_dict()
    official = hf_to_official(hf_state)
    prefix = "encoder.layers.1.blocks.1.attention.self."
    qkv = official["layers.1.blocks.1.attn.qkv.weight"]
    torch.testing.assert_close(qkv, torch.cat([hf_state[prefix + p + ".weight"] for p in ("query", "key", "value")]))
    assert official["layers.1.blocks.1.attn.q_bias"] is hf_state[prefix + "query.bias"]
    assert official["layers.1.blocks.1.attn.v_bias"] is hf_state[prefix + "value.bias"]
    assert (
        hf_key_to_official("swinv2.encoder.layers.0.blocks.0.output.dense.weight") == "layers.0.blocks.0.mlp.fc2.weight"
    )
    assert (
        hf_key_to_official("encoder.layers.0.blocks.0.attention.output.dense.bias")
        == "layers.0.blocks.0.attn.proj.bias"
    )
    assert hf_key_to_official("swinv2.layernorm.weight") == "norm.weight"
    assert hf_key_to_official("classifier.bias") == "head.bias"
    assert hf_key_to_official("something.else") == "something.else"


def test_detection_and_derived_buffers():
    config = _config()
    hf_state = transformers.Swinv2Model(config).state_dict()
    assert is_hf_swinv2(hf_state)
    assert is_hf_swinv2({"swinv2." + k: v for k, v in hf_state.items()})
    assert not is_hf_swinv2(_swinlab(config).state_dict())
    assert not is_hf_swinv2({"encoder." + k: v for k, v in _swinlab(config).state_dict().items()})  # official SimMIM
    # older files carried the derived buffers: dropped, swinlab rebuilds them
    old = dict(hf_state)
    old["encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    old["encoder.layers.0.blocks.0.attention.self.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    assert hf_to_official(old).keys() == hf_to_official(hf_state).keys()


def test_key_bias_zero_dropped_nonzero_rejected():
    state = transformers.Swinv2Model(_config()).state_dict()
    name = "encoder.layers.0.blocks.0.attention.self.key.bias"
    assert not any(k.endswith("k_bias") for k in hf_to_official({**state, name: torch.zeros(16)}))
    with pytest.raises(ValueError, match="key bias"):
        hf_to_official({**state, name: torch.ones(16)})
    missing = {k: v for k, v in state.items() if not k.endswith("blocks.0.attention.self.key.weight")}
    with pytest.raises(ValueError, match="incomplete attention projections"):
        hf_to_official(missing)


def test_other_width_names_the_mismatched_keys():
    hf = transformers.Swinv2ForImageClassification(_config(embed_dim=24, num_labels=5))
    model = _swinlab(_config(), num_classes=5)
    with pytest.raises(ValueError, match="cannot be adapted") as err:
        load_official(model, hf.state_dict())
    message = str(err.value)
    assert "patch_embed.proj.weight: checkpoint (24, 3, 4, 4) vs model (16, 3, 4, 4)" in message
    assert "layers.0.blocks.0.attn.qkv.weight" in message


def test_unsupported_configs_are_named():
    with pytest.raises(ValueError, match="hidden_act"):
        hf_config_to_kwargs(_config(hidden_act="relu"))
    with pytest.raises(ValueError, match="layer_norm_eps"):
        hf_config_to_kwargs({"layer_norm_eps": 1e-6})
    ape = transformers.Swinv2Model(_config(use_absolute_embeddings=True)).state_dict()
    with pytest.raises(ValueError, match="position_embeddings"):
        hf_to_official(ape)
    with pytest.raises(ValueError, match="not a transformers Swinv2"):
        hf_to_official(_swinlab(_config()).state_dict())


def _mim(config) -> transformers.Swinv2ForMaskedImageModeling:
    hf = _randomise(transformers.Swinv2ForMaskedImageModeling(config))
    assert {"swinv2.embeddings.mask_token", "decoder.0.weight"} <= hf.state_dict().keys()
    return hf


def _mim_config(**overrides) -> transformers.Swinv2Config:
    # encoder_stride must be the encoder's output stride: patch 4 x 2^(2 stages - 1)
    return _config(encoder_stride=8, **overrides)


def test_masked_image_modeling_layout_is_official_simmim():
    official = hf_to_official(_mim(_mim_config()).state_dict())
    assert "encoder.mask_token" in official and "decoder.0.weight" in official and "decoder.0.bias" in official
    assert "encoder.layers.0.blocks.0.attn.qkv.weight" in official and "encoder.norm.weight" in official
    assert all(k.startswith(("encoder.", "decoder.0.")) for k in official)


def test_masked_image_modeling_weights_fine_tune_a_bare_encoder():
    """The SimMIM fine-tuning path: the encoder of a transformers MIM model loads into a classifier backbone
    (prefix stripped, decoder and mask token dropped) and gives transformers' unmasked token features."""
    config = _mim_config()
    hf = _mim(config)
    model = _swinlab(config)
    load_official(model, hf.state_dict(), strict=True)
    x = _image(config)
    with torch.no_grad():
        expected = hf.swinv2(x).last_hidden_state
        last = model.forward_features(x, return_stages=True)[-1]
        tokens = model.norm(last.permute(0, 2, 3, 1)).flatten(1, 2)
    torch.testing.assert_close(tokens, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["default", "window8_pretrained"])
def test_masked_image_modeling_matches_transformers(name):
    """transformers' Swinv2ForMaskedImageModeling -> swinlab's SimMIM: same reconstruction and loss for the same
    mask (transformers takes it flattened ``(B, N)``, SimMIM as ``(B, H/p, W/p)``; both 1 = masked)."""
    overrides = dict(CASES[name])
    config = _mim_config(**overrides) if name == "default" else _config(encoder_stride=16, **overrides)
    hf = _mim(config)
    model = SimMIM.from_official(hf_config_to_kwargs(config), {"encoder_stride": config.encoder_stride})
    load_official(model.eval(), hf.state_dict(), strict=True)
    x = _image(config)
    grid = config.image_size // config.patch_size
    mask = torch.rand(x.shape[0], grid, grid, generator=torch.Generator().manual_seed(2)) < 0.6
    with torch.no_grad():
        out = hf(x, bool_masked_pos=mask.flatten(1))
        reconstruction = model.reconstruct(x, mask.long())
        loss = model(x, mask.long())
    assert out.reconstruction.abs().max() > 0.1
    torch.testing.assert_close(reconstruction, out.reconstruction, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=0, rtol=1e-5)
    # the mask matters: without it (transformers: no bool_masked_pos) the reconstruction differs
    assert (model.reconstruct(x, torch.zeros_like(mask, dtype=torch.long)) - reconstruction).abs().max() > 1e-2
