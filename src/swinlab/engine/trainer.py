"""``train(cfg)`` and ``evaluate(run)``: build data, model, optimizer and precision from a config, then run.

Each part is built by a small named helper; the loop itself is :func:`swinlab.engine.fit`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swinlab.config import TrainConfig, apply_overrides, from_dict
from swinlab.engine import precision
from swinlab.engine.allocator import reuse_freed_memory
from swinlab.engine.checkpoint import load_checkpoint
from swinlab.engine.distributed import DistEnv, process_group
from swinlab.engine.loop import fit, run_evaluation
from swinlab.engine.optim import build_optimizer
from swinlab.engine.tasks import ClassificationTask, LanguageModelingTask, Task


def configure_runtime(cfg: TrainConfig) -> None:
    """Process-wide switches: CPU threads, reuse of freed CPU memory and deterministic kernels."""
    if cfg.reuse_cpu_memory:
        reuse_freed_memory()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)


def _build_data(cfg: TrainConfig, env: DistEnv):
    from swinlab import data  # imported here: the engine itself does not depend on the data package

    return data.build(cfg.data, seed=cfg.seed, rank=env.rank, world_size=env.world_size)


def _num_classes(cfg: TrainConfig, data) -> int:
    return cfg.model.num_classes or data.num_classes


def build_model(cfg: TrainConfig, data, device: torch.device, *, pretrained: str | None) -> nn.Module:
    """The model of recipe ``cfg`` for the data bundle ``data`` (head size, channels, input size from the data),
    exactly as :func:`train` builds it; tools that rebuild a run's model (``swinlab erf``) use it too."""
    import swinlab

    data_kwargs = dict(data.model_kwargs)
    if "num_classes" in data_kwargs:  # a classifier's head follows the data unless the recipe sets its size
        data_kwargs["num_classes"] = _num_classes(cfg, data)
    model = swinlab.create_model(cfg.model.name, pretrained=pretrained, **{**data_kwargs, **cfg.model.kwargs})
    if cfg.model.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise TypeError(f"model {cfg.model.name!r} does not support model.grad_checkpointing")
        model.set_grad_checkpointing(True)
    return model.to(device)


def _build_task(cfg: TrainConfig, num_classes: int, kind: str) -> Task:
    if kind == "text":
        return LanguageModelingTask()
    views = kind == "video"  # video evaluation batches are (B, views, C, T, H, W)
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return ClassificationTask(label_smoothing=cfg.label_smoothing, views=views)
    from swinlab.data.mixup import Mixup

    mixup = Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )
    return ClassificationTask(mixup=mixup, label_smoothing=cfg.label_smoothing, views=views)


def _data_unit(cfg: TrainConfig, data) -> str:
    if data.kind == "text":
        return f" windows of {cfg.data.seq_len} tokens, vocabulary {data.num_classes}"
    return f", {data.num_classes} classes"


def _describe(cfg: TrainConfig, model: nn.Module, data, env: DistEnv) -> str:
    # An FP8 O3 shard (``param.fp8_shard``) stands for its whole weight.
    params = sum(p.fp8_shard.numel if hasattr(p, "fp8_shard") else p.numel() for p in model.parameters())
    global_batch = cfg.data.batch_size * env.world_size * cfg.accum_steps
    return (
        f"model {cfg.model.name} ({params / 1e6:.2f} M params) | data {cfg.data.name}: "
        f"{data.train_size} train / {data.val_size} val{_data_unit(cfg, data)} | "
        f"device {env.device} x{env.world_size}, global batch {global_batch}, precision {cfg.precision}"
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the model, data and recipe ``cfg`` describes; returns the final metrics and ``run_dir``.

    Run under ``torchrun --nproc_per_node N`` for data-parallel training; resumes from
    ``cfg.output_dir/checkpoint.pt`` when ``cfg.resume`` is set and the file exists.
    """
    configure_runtime(cfg)
    with process_group(cfg.device) as env:
        return _train(cfg, env)


def _train(cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    data = _build_data(cfg, env)
    torch.manual_seed(cfg.seed)  # the initial weights are part of the recipe (and equal on every rank)
    model = build_model(cfg, data, env.device, pretrained=cfg.model.pretrained)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, autocast = precision.wrap(model, optimizer, cfg.precision, cfg.fp8)
    if env.is_main:
        print(_describe(cfg, model, data, env), flush=True)
    if cfg.compile:
        model = torch.compile(model)
    task = _build_task(cfg, _num_classes(cfg, data), data.kind)
    return fit(model, task, optimizer, data.train_loader, data.val_loader, cfg, env=env, autocast=autocast)


def _checkpoint_path(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    return path / "checkpoint.pt" if path.is_dir() else path


def config_from_checkpoint(ckpt: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """The run's stored config with ``key=value`` overrides applied (e.g. ``data.root=/elsewhere``)."""
    return from_dict(apply_overrides(ckpt["config"], overrides))


def evaluate(run_or_checkpoint: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate a run folder (its checkpoint.pt) or a checkpoint file on the validation set of its config."""
    path = _checkpoint_path(run_or_checkpoint)
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, overrides)
    configure_runtime(cfg)
    with process_group(cfg.device) as env:
        metrics = _evaluate(cfg, ckpt["model"], env)
    if env.is_main:
        print(" ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    return {**metrics, "epoch": ckpt["epoch"], "checkpoint": str(path)}


def _evaluate(cfg: TrainConfig, state_dict: dict[str, Any], env: DistEnv) -> dict[str, float]:
    data = _build_data(cfg, env)
    model = build_model(cfg, data, env.device, pretrained=None)
    # Wrap first: a precision (e.g. FP8) may add state of its own that the checkpoint holds.
    model, _, autocast = precision.wrap(model, None, cfg.precision, cfg.fp8)
    model.load_state_dict(state_dict)
    task = _build_task(cfg, _num_classes(cfg, data), data.kind)
    return run_evaluation(model, task, data.val_loader, env, autocast)
