"""Video through the one engine: multi-view evaluation in ClassificationTask, train / evaluate on the generated
demo, the CLI's clip-shaped `info`, and the recipes in configs/."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from swinlab.config import DataConfig, ModelConfig, OptimConfig
from swinlab.models.registry import list_models
from swinlab.recipe import TrainConfig, load_config
from swinlab.tasks import ClassificationTask, VideoClassificationConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class PerViewLogits(nn.Module):
    """Returns the logits stored in each input's first element (so a test controls every view's scores)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.flatten(1)[:, 0].long()]


def test_views_average_probabilities_not_logits():
    # view 0 favours class 0, view 1 class 1 with a very negative logit for class 0: the mean of the logits
    # picks 1, the mean of the probabilities (the official average_clips='prob') picks 0.
    table = torch.tensor([[3.0, 0.0, 0.0], [-20.0, 1.0, 0.0]])
    views = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1, 1, 1).expand(1, 2, 3, 1, 1, 1)  # (B, V, C, T, H, W)
    assert table.mean(0).argmax() == 1 and table.softmax(-1).mean(0).argmax() == 0
    sums = ClassificationTask(views=True).evaluate(PerViewLogits(table), [(views, torch.tensor([0]))])
    assert sums["correct1"] == 1 and sums["count"] == 1
    probs = table.softmax(-1).mean(0)
    assert float(sums["loss"]) == pytest.approx(-float(probs[0].log()), rel=1e-6)
    with pytest.raises(ValueError, match="multi-view"):
        ClassificationTask(views=True).evaluate(PerViewLogits(table), [(torch.zeros(2), torch.tensor([0, 0]))])


def _cfg(tmp_path, **overrides) -> TrainConfig:
    base = {
        "model": ModelConfig(name="video_swin_nano"),
        "data": DataConfig(
            name="motion_demo", img_size=32, clip_len=4, frame_interval=2, test_clips=2, batch_size=8,
            train_limit=16, val_limit=4, augment="none", hflip=False,
        ),
        "optim": OptimConfig(lr=1e-3, warmup_epochs=0.5),
        "epochs": 1,
        "threads": 1,
        "task": VideoClassificationConfig(label_smoothing=0.0),
        "output_dir": str(tmp_path / "run"),
    }
    return TrainConfig(**{**base, **overrides})


def test_train_then_evaluate_a_video_run(tmp_path):
    from swinlab.engine import evaluate, train

    result = train(_cfg(tmp_path))
    assert result["epochs_completed"] == 1 and result["samples_seen"] == 16
    assert "val_top5" not in result  # 4 classes: no top-5
    assert result["summary"][0] == f"validation top-1 {result['val_top1']:.2f}%, loss {result['val_loss']:.4f}"
    again = evaluate(result["run_dir"])
    assert again["val_top1"] == pytest.approx(result["val_top1"])
    assert again["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)
    more_views = evaluate(result["run_dir"], overrides=["data.test_clips=3", "data.test_crops=3"])
    assert more_views["val_skipped_samples"] == 0
    assert more_views["val_loss"] != pytest.approx(result["val_loss"], rel=1e-6)  # 9 views per video, not 2


def test_info_reports_the_clip_shape(capsys):
    from swinlab.cli import main

    assert main(["info", "video_swin_nano", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "input             1x3x8x32x32" in out and "GFLOP" in out  # the model's own clip (8, 32, 32)
    assert main(["info", "video_swin_nano", "--frames", "4", "--img-size", "16", "--batch", "2"]) == 0
    assert "input             2x3x4x16x16" in capsys.readouterr().out


def test_info_on_video_swin_tiny_counts_on_the_meta_device(capsys):
    """The full 32x224x224 view: FLOPs from shapes alone (a real forward took 22 s and 6 GB)."""
    from swinlab.cli import main

    assert main(["info", "video_swin_tiny", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "meta device" in out and "input             1x3x32x224x224" in out
    assert "(87.764 GMAC)" in out  # the paper's 88 G for Swin-T on one 32x224x224 view


@pytest.mark.parametrize("name", ["demo", "tiny_k400", "small_k400", "base_k400"])
def test_video_recipes_parse(name):
    cfg = load_config(CONFIGS / f"video_swin_{name}.yaml")
    assert cfg.model.name in list_models("video_swin_*")
    if name == "demo":
        assert cfg.data.name == "motion_demo" and not cfg.data.hflip
        return
    data = cfg.data
    assert (data.clip_len, data.frame_interval, data.img_size, data.test_clips, data.test_crops) == (32, 2, 224, 4, 3)
    assert cfg.epochs == 30 and cfg.optim.warmup_epochs == 2.5 and cfg.optim.lr_mult == {"backbone": 0.1}
    assert cfg.optim.weight_decay == (0.05 if name == "base_k400" else 0.02)
    assert cfg.model.kwargs["drop_path_rate"] == {"tiny_k400": 0.1, "small_k400": 0.1, "base_k400": 0.3}[name]
