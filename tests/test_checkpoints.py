"""Checkpoint loading: official layouts (nested, derived buffers, resizing, head swaps, errors) and swinlab's
safetensors format."""

import pytest
import torch

from swinlab.models.checkpoints import (
    adapt_state_dict,
    load_official,
    load_weights,
    read_weights_metadata,
    save_checkpoint_weights,
)
from swinlab.models.registry import create_model
from swinlab.models.swin import SwinTransformerV2

TINY = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def tiny(**kwargs) -> SwinTransformerV2:
    return SwinTransformerV2(**{**TINY, "num_classes": 5, **kwargs})


def official_like(model):
    """Our state dict plus the official derived buffers (values irrelevant: they must be dropped)."""
    state = dict(model.state_dict())
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    state["layers.0.blocks.0.attn.relative_coords_table"] = torch.zeros(1, 7, 7, 2)
    return state


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_load_official_from_file(tmp_path, wrap):
    src, dst = tiny(), tiny()
    state = official_like(src)
    torch.save({wrap: state, "epoch": 3} if wrap else state, tmp_path / "ckpt.pth")
    report = load_official(dst, tmp_path / "ckpt.pth", strict=True)
    assert report.missing == report.unexpected == report.resized == report.reinitialised == []
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value)


def test_ddp_prefix_and_dict_input():
    src = tiny()
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    assert load_official(tiny(), state, strict=True).missing == []


def test_head_with_other_class_count_is_reinitialised():
    src, dst = tiny(num_classes=21841 // 100), tiny()
    with pytest.warns(UserWarning, match="re-initialised"):
        report = load_official(dst, src.state_dict())
    assert sorted(report.reinitialised) == ["head.bias", "head.weight"]
    assert not dst.head.bias.any() and report.missing == []


def test_absolute_pos_embed_and_v1_table_resized():
    src, dst = tiny(ape=True), tiny(ape=True, img_size=64)
    state = dict(src.state_dict())
    state["layers.0.blocks.0.attn.relative_position_bias_table"] = torch.randn(49, 2)
    out, report = adapt_state_dict(state, dst)
    assert report.resized == ["absolute_pos_embed"] and out["absolute_pos_embed"].shape == (1, 256, 16)
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in report.unexpected

    class WithTable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.relative_position_bias_table = torch.nn.Parameter(torch.zeros(13 * 13, 2))

    out, report = adapt_state_dict({"relative_position_bias_table": torch.ones(49, 2)}, WithTable())
    assert out["relative_position_bias_table"].shape == (169, 2) and report.resized
    torch.testing.assert_close(out["relative_position_bias_table"], torch.ones(169, 2))


def test_unadaptable_shapes_listed():
    state = dict(tiny(embed_dim=32, num_heads=(2, 4)).state_dict())
    with pytest.raises(ValueError, match=r"cannot be adapted[\s\S]*patch_embed.proj.weight"):
        load_official(tiny(), state)


def test_strict_reports_unexpected():
    state = dict(tiny().state_dict(), bogus=torch.zeros(1))
    with pytest.raises(ValueError, match="bogus"):
        load_official(tiny(), state, strict=True)
    assert load_official(tiny(), state).unexpected == ["bogus"]


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_official(tiny(), tmp_path / "missing.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_official(tiny(), tmp_path / "corrupt.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(TypeError, match="not a state dict"):
        load_official(tiny(), tmp_path / "list.pth")
    with pytest.raises(TypeError, match="not a state dict"):
        load_official(tiny(), {"model": {"a": 1}})


def test_safetensors_roundtrip_and_create_model(tmp_path):
    model = create_model("swinv2_nano_window4_32", num_classes=3)
    path = tmp_path / "weights.safetensors"
    save_checkpoint_weights(model, path)
    assert read_weights_metadata(path) == {"name": "swinv2_nano_window4_32", "kwargs": {"num_classes": 3}}
    again = create_model("swinv2_nano_window4_32", pretrained=path, num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="head shape"):
        load_weights(create_model("swinv2_nano_window4_32", num_classes=4), path)
    with pytest.warns(UserWarning, match="re-initialised"):  # fine-tuning start from swinlab weights
        create_model("swinv2_nano_window4_32", pretrained=path, num_classes=4)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" + bytes(7) + b"{garbage")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_weights(model, tmp_path / "bad.safetensors")


def test_create_model_with_official_checkpoint(tmp_path):
    src = create_model("swinv2_nano_window4_32")
    torch.save({"model": src.state_dict()}, tmp_path / "official.pth")
    with pytest.warns(UserWarning, match="re-initialised"):
        model = create_model("swinv2_nano_window4_32", pretrained=tmp_path / "official.pth", num_classes=10)
    assert torch.equal(model.patch_embed.proj.weight, src.patch_embed.proj.weight)
