"""``train(cfg)`` and ``evaluate(run)``: build data, task, model, optimizers and precision from a config, then run.

Each part is built by a small named helper; the loop itself is :func:`swinlab.engine.fit`. Nothing here knows a
task: the registry turns ``cfg.task.name`` into one, and the task says what it reads, trains and reports.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from swinlab import data
from swinlab.config import apply_overrides
from swinlab.data.build import DataBundle
from swinlab.engine import precision
from swinlab.engine.allocator import reuse_freed_memory
from swinlab.engine.checkpoint import load_checkpoint
from swinlab.engine.distributed import DistEnv, process_group
from swinlab.engine.loop import fit, run_evaluation
from swinlab.engine.optim import build_optimizers
from swinlab.models.checkpoints import LoadReport
from swinlab.models.registry import load_pretrained
from swinlab.recipe import TrainConfig, from_dict
from swinlab.tasks import Task, task_class


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


def _build_data(cfg: TrainConfig, env: DistEnv) -> DataBundle:
    return data.build(cfg.data, seed=cfg.seed, rank=env.rank, world_size=env.world_size)


def build_task(cfg: TrainConfig, bundle: DataBundle) -> Task:
    """The task ``cfg.task`` names, for the data it will see; refuses data whose batches it cannot read."""
    cls = task_class(cfg.task.name)
    if cls.data_kinds and bundle.kind not in cls.data_kinds:
        raise ValueError(
            f"task {cfg.task.name!r} reads {' or '.join(cls.data_kinds)} batches, but data {cfg.data.name!r} gives "
            f"{bundle.kind} batches: choose a task for this data (e.g. --set task=...) or other data"
        )
    return cls.from_config(cfg.task, bundle)


def _num_classes(cfg: TrainConfig, bundle: DataBundle) -> int:
    return cfg.model.num_classes or bundle.num_classes


def _short(names: Sequence[str], shown: int = 4) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def describe_load(path: Path, report: Any, model: nn.Module) -> str:
    """What loading ``model.pretrained`` did, for the start of a run: tensors loaded, a stripped prefix, and every
    key adapted, dropped, re-initialised or left at its initial value (a fine-tune should be read, not trusted)."""
    if not isinstance(report, LoadReport):
        return f"pretrained: loaded {path}"
    untouched = len(report.missing) + len(report.reinitialised)
    lines = [f"pretrained: loaded {len(model.state_dict()) - untouched} tensors from {path}"]
    if report.stripped_prefix:
        lines[0] += f" (prefix {report.stripped_prefix!r} stripped: a pre-training checkpoint)"
    for what, names in (
        ("adapted to this model's size", report.resized),
        ("dropped (pre-training only)", report.dropped),
        ("re-initialised (another shape)", report.reinitialised),
        ("left at their initial values (not in the checkpoint)", report.missing),
        ("ignored (not in this model)", report.unexpected),
    ):
        if names:
            lines.append(f"  {what}: {_short(names)}")
    if any("cpb_mlp" in name for name in model.state_dict()):
        lines.append("  position bias: the continuous-position-bias MLPs load as they are; the bias tables are "
                     "computed for this model's windows")  # fmt: skip
    return "\n".join(lines)


def build_model(
    cfg: TrainConfig, bundle: DataBundle, device: torch.device, *, pretrained: str | None, verbose: bool = False
) -> nn.Module:
    """The model of recipe ``cfg`` for the data bundle ``bundle`` (head size, channels, input size from the data),
    exactly as :func:`train` builds it; tools that rebuild a run's model (``swinlab erf``) use it too.

    ``pretrained``: an official or swinlab weight file, a swinlab run's checkpoint, or a run folder (its
    ``checkpoint.pt``); a SimMIM run gives its encoder. ``verbose`` prints what the load did.
    """
    import swinlab

    data_kwargs = dict(bundle.model_kwargs)
    if "num_classes" in data_kwargs:  # a classifier's head follows the data unless the recipe sets its size
        data_kwargs["num_classes"] = _num_classes(cfg, bundle)
    model = swinlab.create_model(cfg.model.name, **{**data_kwargs, **cfg.model.kwargs})
    if pretrained is not None:
        path = checkpoint_path(pretrained)
        report = load_pretrained(model, path)
        if verbose:
            print(describe_load(path, report, model), flush=True)
    if cfg.model.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise TypeError(f"model {cfg.model.name!r} does not support model.grad_checkpointing")
        model.set_grad_checkpointing(True)
    return model.to(device)


def build_run_model(
    cfg: TrainConfig,
    bundle: DataBundle,
    task: Task,
    device: torch.device,
    *,
    pretrained: str | None,
    verbose: bool = False,
) -> nn.Module:
    """The module a run trains and checkpoints: the recipe's model as the task prepares it
    (:meth:`~swinlab.tasks.Task.prepare_model`, e.g. SimMIM's encoder with its decoder)."""
    model = build_model(cfg, bundle, device, pretrained=pretrained, verbose=verbose)
    return task.prepare_model(model).to(device)


def _describe(cfg: TrainConfig, model: nn.Module, bundle: DataBundle, env: DistEnv) -> str:
    # An FP8 O3 shard (``param.fp8_shard``) stands for its whole weight.
    params = sum(p.fp8_shard.numel if hasattr(p, "fp8_shard") else p.numel() for p in model.parameters())
    global_batch = cfg.data.batch_size * env.world_size * cfg.accum_steps
    return (
        f"model {cfg.model.name} ({params / 1e6:.2f} M params) | task {cfg.task.name} | data {cfg.data.name}: "
        f"{bundle.describe()} | device {env.device} x{env.world_size}, global batch {global_batch}, "
        f"precision {cfg.precision}"
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train the model, data and recipe ``cfg`` describes; returns the final metrics, ``run_dir`` and the task's
    ``summary`` lines.

    Run under ``torchrun --nproc_per_node N`` for data-parallel training; resumes from
    ``cfg.output_dir/checkpoint.pt`` when ``cfg.resume`` is set and the file exists.
    """
    configure_runtime(cfg)
    with process_group(cfg.device) as env:
        return _train(cfg, env)


def _train(cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    bundle = _build_data(cfg, env)
    task = build_task(cfg, bundle)
    torch.manual_seed(cfg.seed)  # the initial weights are part of the recipe (and equal on every rank)
    model = build_run_model(cfg, bundle, task, env.device, pretrained=cfg.model.pretrained, verbose=env.is_main)
    optimizers = build_optimizers(model, task, cfg.optim)
    model, optimizers, autocast = precision.wrap(model, optimizers, cfg.precision, cfg.fp8)
    if env.is_main:
        print(_describe(cfg, model, bundle, env), flush=True)
    if cfg.compile:
        model = torch.compile(model)
    return fit(
        model, task, optimizers, bundle.train_loader, bundle.val_loader, cfg, env=env, autocast=autocast,
        loaders=bundle.extra_loaders,
    )  # fmt: skip


def checkpoint_path(run_or_checkpoint: str | Path) -> Path:
    """A run folder's ``checkpoint.pt``, or the checkpoint file given."""
    path = Path(run_or_checkpoint)
    return path / "checkpoint.pt" if path.is_dir() else path


def config_from_checkpoint(ckpt: dict[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """The run's stored config with ``key=value`` overrides applied (e.g. ``data.root=/elsewhere``)."""
    return from_dict(apply_overrides(ckpt["config"], overrides))


def evaluate(run_or_checkpoint: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate a run folder (its checkpoint.pt) or a checkpoint file on the validation set of its config."""
    path = checkpoint_path(run_or_checkpoint)
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, overrides)
    configure_runtime(cfg)
    with process_group(cfg.device) as env:
        metrics, summary = _evaluate(cfg, ckpt["model"], env)
    return {**metrics, "epoch": ckpt["epoch"], "checkpoint": str(path), "summary": summary}


def _evaluate(cfg: TrainConfig, state_dict: dict[str, Any], env: DistEnv) -> tuple[dict[str, float], list[str]]:
    bundle = _build_data(cfg, env)
    task = build_task(cfg, bundle)
    model = build_run_model(cfg, bundle, task, env.device, pretrained=None)
    # Wrap first: a precision (e.g. FP8) may add state of its own that the checkpoint holds.
    model, _, autocast = precision.wrap(model, None, cfg.precision, cfg.fp8)
    model.load_state_dict(state_dict)
    for frozen in task.frozen_modules().values():
        frozen.place(env.device)
    metrics = run_evaluation(model, task, bundle.val_loader, env, autocast)
    return metrics, task.summary(metrics, None, 0)
