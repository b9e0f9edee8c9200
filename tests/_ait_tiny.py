"""Tiny AiT set-ups the task tests share: tokenizer and solver sizes that train in seconds on one thread, and a
tokenizer run through the engine (what ``task.tokenizer`` and its siblings point at)."""

from __future__ import annotations

from pathlib import Path

from swinlab.config import DataConfig, ModelConfig, OptimConfig, TaskConfig
from swinlab.engine import train
from swinlab.recipe import TrainConfig

DEPTH_TOKENIZER = {"image_size": 32, "downsample": 8, "num_codes": 16, "code_dim": 16, "width": 16, "num_res_blocks": 1}
MASK_TOKENIZER = {"image_size": 16, "downsample": 4, "num_codes": 16, "code_dim": 16, "width": 8, "num_res_blocks": 1}
BACKBONE = {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4}


def solver_kwargs(backbone: dict | None = None, **kwargs) -> dict:
    """``ait_task_solver`` kwargs: a two-stage SwinV2 of width 16 (``backbone`` adds to :data:`BACKBONE`) and a
    1 + 1-layer head of width 32, without dropout; ``kwargs`` set the vocabulary, prompts and length."""
    return {
        "backbone": "swinv2_tiny_window8_256",
        "backbone_kwargs": {**BACKBONE, **(backbone or {})},
        "dim": 32,
        "heads": 4,
        "hidden": 64,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "dropout": 0.0,
        "drop_path": 0.0,
        **kwargs,
    }


def base(out: Path, data: DataConfig) -> dict:
    """The run keys every tiny run shares: ``data``, one thread, no allocator switch, ``out`` as the run folder."""
    return {"data": data, "threads": 1, "reuse_cpu_memory": False, "output_dir": str(out)}


def train_tokenizer(out: Path, name: str, kwargs: dict, task: TaskConfig, data: DataConfig, lr: float) -> Path:
    """One epoch of the tokenizer ``name`` (``kwargs``) under ``task`` on ``data``: its run folder."""
    optim = OptimConfig(lr=lr, weight_decay=0.0, warmup_epochs=0.0)
    train(TrainConfig(model=ModelConfig(name=name, kwargs=kwargs), task=task, optim=optim, epochs=1, **base(out, data)))
    return out
