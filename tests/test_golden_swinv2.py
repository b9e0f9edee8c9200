"""Parity with the official Swin V2 forward pass (fixture recorded from microsoft/Swin-Transformer, see
shared/golden/README.md). Tolerances are the README's: the official float32 run itself is ~7e-5 from
float64."""

import pytest
import torch

from swinlab.layers import log_spaced_coords, relative_position_index, window_geometry, window_mask
from swinlab.models.checkpoints import load_official
from swinlab.models.swin import SwinTransformerV2

TOL = dict(atol=3e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "swinv2_basic.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def model(golden):
    model = SwinTransformerV2(**golden["config"]).eval()
    report = load_official(model, golden["state_dict"], strict=True)
    assert not (report.missing or report.unexpected or report.resized or report.reinitialised)
    return model


def _close(actual, expected, what):
    diff = (actual - expected).abs().max().item()
    assert torch.allclose(actual, expected, **TOL), f"{what}: max abs diff {diff:.3g}"


@torch.no_grad()
def test_logits_and_features(model, golden):
    _close(model(golden["input"]), golden["output"], "logits")
    _close(model.forward_features(golden["input"]), golden["features"], "features")


@torch.no_grad()
def test_final_norm_tokens(model, golden):
    x = model.embed(golden["input"])
    for layer in model.layers:
        x = layer(x)
    _close(model.norm(x).flatten(1, 2), golden["final_norm_tokens"], "final_norm_tokens")


@torch.no_grad()
def test_patch_embed_and_stage_outputs(model, golden):
    x = model.embed(golden["input"])
    _close(x.flatten(1, 2), golden["patch_embed_output"], "patch_embed_output")
    for i, (layer, expected) in enumerate(zip(model.layers, golden["stage_outputs"], strict=True)):
        x = layer(x)  # blocks then downsample, like the official layers[i]
        _close(x.flatten(1, 2), expected, f"stage {i}")


@torch.no_grad()
def test_cpb_mlp_raw(model, golden):
    for name, expected in golden["cpb_mlp_raw"].items():
        attn = model.get_submodule(name)
        window = ((expected.shape[1] + 1) // 2, (expected.shape[2] + 1) // 2)
        raw = attn.cpb_mlp(attn.coords_table(window, expected.device))
        _close(raw[None], expected, f"{name} cpb_mlp_raw")


def test_rebuilt_buffers_equal_official(golden):
    """Our per-size index / coordinates / masks equal every official buffer (exact ints, 1e-6 floats)."""
    cfg, state = golden["config"], golden["state_dict"]
    grid = cfg["img_size"] // cfg["patch_size"]
    checked = 0
    for stage, depth in enumerate(cfg["depths"]):
        side = grid // 2**stage
        for j in range(depth):
            shift = (cfg["window_size"] // 2,) * 2 if j % 2 else (0, 0)
            geom = window_geometry((side, side), (cfg["window_size"],) * 2, shift)
            prefix = f"layers.{stage}.blocks.{j}."
            index = relative_position_index(geom.window, torch.device("cpu"))
            assert torch.equal(index, state[prefix + "attn.relative_position_index"])
            coords = log_spaced_coords(geom.window, (0, 0), torch.device("cpu"))
            torch.testing.assert_close(
                coords[None], state[prefix + "attn.relative_coords_table"], atol=1e-6, rtol=0
            )
            mask = window_mask(geom, torch.device("cpu"))
            if prefix + "attn_mask" in state:
                torch.testing.assert_close(mask, state[prefix + "attn_mask"], atol=1e-6, rtol=0)
                checked += 1
            else:
                assert mask is None
    assert checked == 2  # the shifted blocks of stages 0 and 1
