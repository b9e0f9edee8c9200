"""Parity with the official Video Swin backbone (fixture recorded from SwinTransformer/Video-Swin-Transformer,
see shared/golden/README.md). No padding happens in this case (padding against the official semantics:
``test_video_swin.py::test_padding_follows_the_official_block``); the official float32 run is ~2e-6 from float64."""

import pytest
import torch

from swinlab.layers import relative_position_index
from swinlab.models.video_checkpoints import load_official_video
from swinlab.models.video_swin import SwinTransformer3D, VideoSwinClassifier

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return torch.load(golden_dir / "vswin_basic.pt", map_location="cpu", weights_only=True)


def _config(golden) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in golden["config"].items()}


@pytest.fixture(scope="module")
def model(golden):
    model = SwinTransformer3D(**_config(golden)).eval()
    report = load_official_video(model, golden["state_dict"], strict=True)
    assert not (report.missing or report.unexpected or report.resized or report.reinitialised)
    return model


def _close(actual, expected, what):
    diff = (actual - expected).abs().max().item()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert torch.allclose(actual, expected, **TOL), f"{what}: max abs diff {diff:.3g}"


@torch.no_grad()
def test_output_and_features(model, golden):
    out = model(golden["input"])
    _close(out, golden["output"], "output")
    _close(out.mean(dim=(2, 3, 4)), golden["features"], "features")


@torch.no_grad()
def test_patch_embed_and_stage_outputs(model, golden):
    x = model.embed(golden["input"])
    _close(x.movedim(-1, 1), golden["patch_embed_output"], "patch_embed_output")
    for i, (layer, expected) in enumerate(zip(model.layers, golden["stage_outputs"], strict=True)):
        x = layer(x)  # blocks then downsample, like the official layers[i]
        _close(x.movedim(-1, 1), expected, f"stage {i}")


def test_rebuilt_index_equals_official_buffer(model, golden):
    window = model.window_size
    for name, buffer in golden["state_dict"].items():
        if name.endswith("relative_position_index"):
            assert torch.equal(relative_position_index(window, buffer.device), buffer), name
    assert not any(k.endswith("relative_position_index") for k in model.state_dict())


@torch.no_grad()
def test_recognizer_layout_loads_into_classifier(golden):
    """The same weights under the recognizer's ``backbone.`` prefix, plus an I3D head."""
    classifier = VideoSwinClassifier(num_classes=3, **_config(golden)).eval()
    head = {"cls_head.fc_cls.weight": torch.randn(3, 64), "cls_head.fc_cls.bias": torch.randn(3)}
    state = {f"backbone.{k}": v for k, v in golden["state_dict"].items()} | head
    report = load_official_video(classifier, {"state_dict": state, "meta": {}}, strict=True)
    assert not (report.missing or report.unexpected)
    expected = golden["features"] @ head["cls_head.fc_cls.weight"].T + head["cls_head.fc_cls.bias"]
    _close(classifier(golden["input"]), expected, "logits")
