"""Checkpoint loading: official layouts (nested, derived buffers, resizing, head swaps, errors), V1 bias tables at
another window (per-head bicubic, 2D loads and 2D -> 3D inflation) and swinlab's safetensors format."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swinlab.layers import PatchEmbed, PatchMerging
from swinlab.models.checkpoints import (
    adapt_state_dict,
    load_official,
    load_weights,
    read_weights_metadata,
    save_checkpoint_weights,
)
from swinlab.models.registry import create_model
from swinlab.models.swin import SwinBlockV1, SwinTransformerV2, swin_stages
from swinlab.models.video_checkpoints import inflate_from_2d, load_official_video
from swinlab.models.video_swin import SwinTransformer3D

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


# -- V1 bias tables at another window: each head's (2W-1) x (2W-1) offset map is resized on its own --


def per_head_bicubic(table: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The official loaders' resize, written head by head: head h's column is its S x S map of offsets (rows
    ``dy``-major, as the official index), resized by ``F.interpolate(mode="bicubic")`` with torch's default
    ``align_corners=False``, and flattened back the same way."""
    side = math.isqrt(table.shape[0])
    columns = []
    for head in range(table.shape[1]):
        image = table[:, head].reshape(1, 1, side, side)
        columns.append(F.interpolate(image, size=size, mode="bicubic", align_corners=False).reshape(-1))
    return torch.stack(columns, dim=1)


def distinct_heads_table(window: int, heads: int, seed: int = 0) -> torch.Tensor:
    """``((2W-1)**2, heads)``: head h is its own smooth function of the offset (dy, dx), neither symmetric in dy
    and dx nor separable, so a transposed, mixed or swapped layout changes the values."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = torch.rand(3, heads, generator=g) * 2 + 0.5
    d = torch.linspace(-1, 1, 2 * window - 1)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    maps = [torch.sin(a[h] * dy + h) * torch.cos(b[h] * dx) + c[h] * dy * dx**2 - 0.3 * h * dx for h in range(heads)]
    return torch.stack([m.reshape(-1) for m in maps], dim=1)


class OneTable(nn.Module):
    def __init__(self, window: int, heads: int) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))


@pytest.mark.parametrize(("src", "dst"), [(7, 4), (4, 7), (3, 5)], ids=["shrink", "grow", "3to5"])
def test_v1_bias_table_resize_is_per_head_bicubic(src, dst):
    table = distinct_heads_table(src, heads=3)
    assert min(float((table[:, i] - table[:, j]).abs().max()) for i, j in ((0, 1), (0, 2), (1, 2))) > 0.3
    out, report = adapt_state_dict({"relative_position_bias_table": table}, OneTable(dst, heads=3))
    assert report.resized == ["relative_position_bias_table"]
    resized = out["relative_position_bias_table"]
    assert resized.shape == ((2 * dst - 1) ** 2, 3)
    torch.testing.assert_close(resized, per_head_bicubic(table, (2 * dst - 1, 2 * dst - 1)), rtol=0, atol=1e-6)
    # Independent of F.interpolate: an odd-to-odd resize with align_corners=False samples the zero offset at the
    # zero offset, where the cubic kernel is (0, 1, 0, 0): every head keeps its own zero-offset bias exactly.
    torch.testing.assert_close(resized[(2 * dst - 1) ** 2 // 2], table[(2 * src - 1) ** 2 // 2], rtol=0, atol=1e-6)


class SwinV1Image(nn.Module):
    """A tiny 2D Swin V1 backbone in the official key layout (swinlab registers no 2D V1 model)."""

    def __init__(self, window: int, embed_dim: int = 8, num_heads=(2, 4)) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed((4, 4), 3, embed_dim)
        self.layers = swin_stages(SwinBlockV1, PatchMerging, embed_dim, (2, 2), num_heads, (window, window))
        self.norm = nn.LayerNorm(embed_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def v1_checkpoint(window: int) -> dict[str, torch.Tensor]:
    """A V1 state dict whose bias tables have distinct heads (and differ per block), plus official buffers."""
    state = dict(SwinV1Image(window).state_dict())
    tables = sorted(k for k in state if k.endswith("relative_position_bias_table"))
    for seed, key in enumerate(tables):
        state[key] = distinct_heads_table(window, state[key].shape[1], seed=seed)
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros((window * window,) * 2, dtype=torch.long)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(4, window * window, window * window)
    return state


def test_v1_checkpoint_loads_at_another_window_size(tmp_path):
    state = v1_checkpoint(window=7)
    torch.save({"model": state}, tmp_path / "swin_v1_window7.pth")
    model = SwinV1Image(window=4)
    report = load_official(model, tmp_path / "swin_v1_window7.pth", strict=True)
    tables = sorted(k for k in model.state_dict() if k.endswith("relative_position_bias_table"))
    assert len(tables) == 4 and sorted(report.resized) == tables and report.missing == report.unexpected == []
    for key, value in model.state_dict().items():
        expected = per_head_bicubic(state[key], (7, 7)) if key in tables else state[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


@pytest.mark.parametrize("window", [(2, 4, 4), (3, 5, 4)], ids=["2x4x4", "3x5x4"])
def test_video_swin_inflates_a_v1_checkpoint_at_another_window_size(window):
    state = v1_checkpoint(window=7)
    model = SwinTransformer3D(patch_size=(2, 4, 4), embed_dim=8, depths=(2, 2), num_heads=(2, 4), window_size=window)
    report = inflate_from_2d(model, {"model": state})
    tables = sorted(k for k in model.state_dict() if k.endswith("relative_position_bias_table"))
    assert sorted(k for k in report.inflated if k in tables) == tables and not report.missing
    spatial = (2 * window[1] - 1, 2 * window[2] - 1)
    for key in tables:
        loaded = model.state_dict()[key]
        expected = per_head_bicubic(state[key], spatial)
        per_time = loaded.view(2 * window[0] - 1, *expected.shape)  # rows are temporal-major
        for slice_ in per_time:
            torch.testing.assert_close(slice_, expected, rtol=0, atol=1e-6, msg=key)
    # A 3D checkpoint of another window is refused, not resized: its table has no unambiguous 2D map per head.
    other = SwinTransformer3D(patch_size=(2, 4, 4), embed_dim=8, depths=(2, 2), num_heads=(2, 4), window_size=(2, 7, 7))
    with pytest.raises(ValueError, match="window_size"):
        load_official_video(model, other.state_dict())
