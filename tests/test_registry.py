"""Registry: names, metadata, overrides, and every registered variant's size (built on the meta device)."""

import pytest
import torch

import swinlab
from swinlab.models.registry import create_model, list_models, model_meta, register_model

OFFICIAL = [
    "swinv2_tiny_window8_256",
    "swinv2_tiny_window16_256",
    "swinv2_small_window8_256",
    "swinv2_small_window16_256",
    "swinv2_base_window8_256",
    "swinv2_base_window16_256",
    "swinv2_base_window12_192",
    "swinv2_large_window12_192",
    "swinv2_base_window12to16_192to256",
    "swinv2_base_window12to24_192to384",
    "swinv2_large_window12to16_192to256",
    "swinv2_large_window12to24_192to384",
]


def test_all_variants_registered():
    names = swinlab.list_models()
    assert set(OFFICIAL) <= set(names) and "swinv2_nano_window4_32" in names
    assert list_models("swinv2_huge*") and list_models("swinv2_giant*")
    assert list_models("*window12to24*") == [
        "swinv2_base_window12to24_192to384",
        "swinv2_large_window12to24_192to384",
    ]


@pytest.mark.parametrize("name", list_models("swinv2_*"))
def test_variant_builds_on_meta(name):
    with torch.device("meta"):
        model = create_model(name)
    params = sum(p.numel() for p in model.parameters())
    expected = {"tiny": 28e6, "small": 50e6, "base": 88e6, "large": 197e6, "huge": 658e6, "giant": 3.0e9}
    size = name.split("_")[1]
    if size in expected and model.num_classes == 1000:  # 21841-class heads add ~20-30M
        assert abs(params - expected[size]) / expected[size] < 0.02, f"{name}: {params / 1e6:.1f}M"
    assert model.model_spec == {"name": name, "kwargs": {}}


def test_official_config_mapping():
    with torch.device("meta"):
        model = create_model("swinv2_large_window12to24_192to384")
    block = model.layers[3].blocks[0]
    assert model.window_size == 24 and model.img_size == (384, 384) and model.embed_dim == 192
    assert block.attn.pretrained_window == (6, 6) and block.attn.num_heads == 48
    assert model.layers[0].blocks[0].attn.pretrained_window == (12, 12)
    with torch.device("meta"):
        assert create_model("swinv2_base_window12_192").num_classes == 21841


def test_nano_variant_and_overrides():
    model = create_model("swinv2_nano_window4_32", num_classes=10, in_chans=1, drop_path_rate=0.1)
    assert (model.num_classes, model.in_chans, model.num_features) == (10, 1, 256)
    assert model.patch_size == (4, 4) and model.window_size == 4
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert model.model_spec["kwargs"] == {"num_classes": 10, "in_chans": 1, "drop_path_rate": 0.1}


def test_metadata():
    meta = model_meta("swinv2_tiny_window8_256")
    assert meta["params"] == "28M" and meta["imagenet_top1"] == 81.8
    assert "unverified" in model_meta("swinv2_giant_window12_192")["source"]


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean swinv2_tiny_window8_256"):
        create_model("swinv2_tiny_windw8_256")
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        create_model("resnet9000")


def test_register_twice_is_an_error():
    @register_model
    def _registry_test_model(**kwargs):
        return torch.nn.Identity()

    assert "_registry_test_model" in list_models("_registry*")

    def _registry_test_model(**kwargs):
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="registered twice"):
        register_model(_registry_test_model)
