"""``task: ait_depth`` through the engine: a TaskSolver learns a frozen depth tokenizer's codes of procedural depth
maps; the tokenizer stays out of the optimizer and the checkpoint; missing / wrong tokenizers are named errors."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch

from _ait_tiny import DEPTH_TOKENIZER, base, solver_kwargs, train_tokenizer
from swinlab.config import DataConfig, ModelConfig, OptimConfig
from swinlab.engine import load_checkpoint, train
from swinlab.recipe import TrainConfig, load_config
from swinlab.tasks.ait_depth import AitDepthConfig
from swinlab.tasks.ait_tokenizer import AitTokenizerConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER = DEPTH_TOKENIZER
SOLVER = solver_kwargs(codes={"mask": 8, "depth": 16}, max_length=16)
DATA = DataConfig(name="procedural_depth", img_size=32, train_limit=64, val_limit=8, batch_size=8)


def _base(out: Path) -> dict:
    return base(out, DATA)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ait_depth") / "tokenizer"
    return train_tokenizer(out, "ait_depth_vqvae", TOKENIZER, AitTokenizerConfig(recon_images=0), DATA, lr=1e-3)


def _solver_cfg(out: Path, tokenizer: str | None, **task) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="ait_task_solver", kwargs=SOLVER),
        task=AitDepthConfig(tokenizer=tokenizer, depth_images=2, **task),
        optim=OptimConfig(lr=2e-3, warmup_epochs=0.0),
        epochs=2,
        **_base(out),
    )


def test_solver_trains_on_frozen_tokenizer_codes(tokenizer_run, tmp_path):
    tokenizer_weights = load_checkpoint(tokenizer_run / "checkpoint.pt")["model"]
    train(_solver_cfg(tmp_path / "solver", str(tokenizer_run)))
    with open(tmp_path / "solver" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[1] < losses[0], losses
    for key in ("train_ce", "train_aux_silog", "val_loss", "val_rmse", "val_d1", "val_abs_rel", "val_silog"):
        assert rows[-1][key] != "", key
    ckpt = load_checkpoint(tmp_path / "solver" / "checkpoint.pt")
    assert not any("_vq_vae" in k or k.startswith("tokenizer") for k in ckpt["model"])
    assert ckpt["frozen"]["tokenizer"]["source"] == str(tokenizer_run / "checkpoint.pt")
    assert (tmp_path / "solver" / "depth_epoch2.png").is_file()
    after = load_checkpoint(tokenizer_run / "checkpoint.pt")["model"]
    assert all(torch.equal(after[k], v) for k, v in tokenizer_weights.items())


def test_missing_tokenizer_names_the_config_key(tmp_path):
    with pytest.raises(ValueError, match=r"task\.tokenizer is required"):
        train(_solver_cfg(tmp_path / "a", None))
    with pytest.raises(FileNotFoundError, match=r"task\.tokenizer: no tokenizer checkpoint at"):
        train(_solver_cfg(tmp_path / "b", str(tmp_path / "nowhere")))


def test_code_count_mismatch_names_the_model_key(tokenizer_run, tmp_path):
    model = ModelConfig(name="ait_task_solver", kwargs={**SOLVER, "codes": {"depth": 32}})
    cfg = dataclasses.replace(_solver_cfg(tmp_path / "c", str(tokenizer_run)), model=model)
    with pytest.raises(ValueError, match=r"set model\.kwargs\.codes\.depth: 16"):
        train(cfg)


def test_nano_recipe_loads():
    cfg = load_config(CONFIGS / "ait_depth_nano.yaml")
    assert cfg.task.name == "ait_depth" and cfg.task.tokenizer == "runs/ait_tokenizer_depth_nano"
