"""``train(cfg)`` / ``evaluate(run)`` with the real data and model packages on a tiny slice of the data."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swinlab.config import DataConfig, ModelConfig, OptimConfig
from swinlab.data import build
from swinlab.engine import build_model, evaluate, load_checkpoint, train
from swinlab.recipe import TrainConfig, from_dict
from swinlab.tasks import ClassificationConfig


def _cfg(tmp_path, **overrides) -> TrainConfig:
    base = {
        "model": ModelConfig(name="swinv2_nano_window4_32"),
        "data": DataConfig(name="fashion_mnist_embedded", train_limit=64, val_limit=32, batch_size=16),
        "optim": OptimConfig(lr=1e-3, warmup_epochs=0.5),
        "epochs": 1,
        "task": ClassificationConfig(mixup=0.8, cutmix=1.0),
        "threads": 1,
        "output_dir": str(tmp_path / "run"),
    }
    return TrainConfig(**{**base, **overrides})


def _top1_by_hand(run_dir: str, val_limit: int) -> float:
    """The run's checkpointed model scored on the first ``val_limit`` validation images outside the engine."""
    ckpt = load_checkpoint(f"{run_dir}/checkpoint.pt")
    cfg = from_dict(ckpt["config"])
    bundle = build(dataclasses.replace(cfg.data, val_limit=val_limit), seed=cfg.seed)
    model = build_model(cfg, bundle, torch.device("cpu"), pretrained=None)
    model.load_state_dict(ckpt["model"])
    model.eval()
    with torch.no_grad():
        pairs = [(model(x).argmax(1), y) for x, y in bundle.val_loader]
    correct = sum(int((p == y).sum()) for p, y in pairs)
    return 100.0 * correct / sum(len(y) for _, y in pairs)


def test_train_then_evaluate_the_run(tmp_path):
    result = train(_cfg(tmp_path))
    assert result["epochs_completed"] == 1 and result["step"] == 4
    assert result["samples_seen"] == result["samples_expected"] == 64
    assert result["summary"][0].startswith(f"validation top-1 {result['val_top1']:.2f}%, top-5")

    again = evaluate(result["run_dir"])
    assert again["val_top1"] == pytest.approx(result["val_top1"])
    assert again["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)
    assert again["epoch"] == 1 and again["summary"] == result["summary"][:1]
    assert result["val_top1"] == pytest.approx(_top1_by_hand(result["run_dir"], 32))

    half = evaluate(result["run_dir"], overrides=["data.val_limit=16"])
    assert half["val_skipped_samples"] == 0
    assert half["val_top1"] == pytest.approx(_top1_by_hand(result["run_dir"], 16))
