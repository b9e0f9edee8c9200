"""``train(cfg)`` / ``evaluate(run)`` with the real data and model packages on a tiny slice of the data."""

from __future__ import annotations

import importlib.util

import pytest

from swinlab.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("swinlab.data") is None or importlib.util.find_spec("swinlab.models") is None,
    reason="needs swinlab.data and swinlab.models",
)


def _cfg(tmp_path, **overrides) -> TrainConfig:
    base = {
        "model": ModelConfig(name="swinv2_nano_window4_32"),
        "data": DataConfig(name="fashion_mnist_embedded", train_limit=64, val_limit=32, batch_size=16),
        "optim": OptimConfig(lr=1e-3, warmup_epochs=0.5),
        "epochs": 1,
        "mixup": 0.8,
        "cutmix": 1.0,
        "threads": 1,
        "output_dir": str(tmp_path / "run"),
    }
    return TrainConfig(**{**base, **overrides})


def test_train_then_evaluate_the_run(tmp_path):
    from swinlab.engine import evaluate, train

    result = train(_cfg(tmp_path))
    assert result["epochs_completed"] == 1 and result["step"] == 4
    assert result["samples_seen"] == result["samples_expected"] == 64
    assert 0 <= result["val_top1"] <= 100 and "val_top5" in result

    again = evaluate(result["run_dir"])
    assert again["val_top1"] == pytest.approx(result["val_top1"])
    assert again["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)
    assert again["epoch"] == 1

    half = evaluate(result["run_dir"], overrides=["data.val_limit=16"])
    assert half["val_skipped_samples"] == 0 and 0 <= half["val_top1"] <= 100
