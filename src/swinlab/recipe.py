"""A run's whole recipe: the sections of :mod:`swinlab.config` plus the section of the task it names.

Kept apart from :mod:`swinlab.config` because a recipe is checked against its task's own keys, and tasks live above
the config sections (``swinlab.tasks``): the sections stay importable by every package, and only this module, which
sits just below the engine, looks a task up by name.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swinlab.config import (
    ConfigError,
    Count,
    DataConfig,
    FP8Config,
    KeyInfo,
    ModelConfig,
    OptimConfig,
    Positive,
    Probability,
    TaskConfig,
    apply_overrides,
    build_section,
    read_yaml,
    section_keys,
)
from swinlab.tasks.registry import config_class


def task_section(values: dict[str, Any] | str | None = None, where: str = "task") -> TaskConfig:
    """The typed section of the task ``values`` names (``"name"`` or ``{"name": ..., key: value}``)."""
    if isinstance(values, str):
        values = {"name": values}
    if not isinstance(values, (dict, type(None))):
        raise ConfigError(f"{where}: expected a task name or a mapping, got {values!r}")
    values = dict(values or {})
    name = values.setdefault("name", TaskConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected a task name, got {name!r}")
    try:
        cls = config_class(name)
    except ValueError as e:
        raise ConfigError(f"{where}.name: {e}") from None
    return build_section(cls, values, where + ".")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=task_section)
    """What the run trains for and how it is scored: ``name`` plus that task's own keys (e.g. ``label_smoothing``,
    ``mixup`` for classification)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: Count = 10
    """Epochs to train in all (a resumed run continues up to this many)."""
    clip_grad: Positive | None = 5.0
    """Clip the global gradient norm to this value; ``null``: no clipping."""
    accum_steps: Count = 1
    """Micro-batches whose gradients add up to one update (a larger batch in the same memory)."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast), or FP8-LM's ``fp8-o1`` / ``fp8-o2`` / ``fp8-o3`` (``swinlab.fp8.initialize``)."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """Used by the ``fp8-*`` precisions only, e.g. ``--set fp8.grad_format=e4m3``."""
    seed: int = 0
    """Seeds the initial weights, the data order and augmentation, and every epoch's random state."""
    deterministic: bool = False
    """Deterministic kernels only (``torch.use_deterministic_algorithms``): slower, repeatable on GPUs."""
    device: str = "auto"
    """``auto`` picks CUDA when present, else CPU."""
    output_dir: str = "runs/default"
    """The run folder: config.yaml, metrics.csv, curves.png, checkpoint.pt, best.pt."""
    resume: bool | str = True
    """``true``: continue from ``output_dir/checkpoint.pt`` when it exists and was trained with this recipe
    (run-control keys such as ``epochs`` may differ); ``force``: continue it whatever changed (the new values apply
    from here on); ``false``: start over, replacing the folder's checkpoints."""
    eval_every: Count = 1
    """Evaluate every N epochs (and always after the last)."""
    tensorboard: bool = False
    """Write TensorBoard event files into ``output_dir/tb`` (needs the ``tensorboard`` extra)."""
    compile: bool = False
    """``torch.compile`` the model. Measure before using it for CPU training: compiled graphs run torch's default GEMM
    (MKL on x86) instead of swinlab's oneDNN linears, and inductor's fresh buffers cost page faults
    (``benchmarks/RESULTS.md``)."""
    log_every: Count = 10
    """Log the training step's values (progress bar, TensorBoard) every N updates."""
    max_steps_per_epoch: Count | None = None
    """Cut each epoch short (smoke tests)."""
    threads: Count | None = None
    """``torch.set_num_threads`` for CPU runs; ``None`` leaves torch's default."""
    max_skipped_fraction: Probability = 0.5
    """Stop the run when more than this share of an epoch's updates were skipped as non-finite: its weights no
    longer learn (diverged, or a learning rate or FP8 scale far off)."""
    reuse_cpu_memory: bool = True
    """Keep freed CPU memory in the process (``swinlab.engine.allocator``): large activations then cost no fresh page
    faults each step (SwinV2-T CPU training ~1.2x faster); ``false`` leaves the C library's default."""

    def __post_init__(self) -> None:
        if isinstance(self.resume, str) and self.resume != "force":
            raise ConfigError(f"resume={self.resume!r}: must be true, false or force")
        if type(self.task) is TaskConfig:  # built in Python with only a name: take that task's own section
            object.__setattr__(self, "task", task_section({"name": self.task.name}))


MOVED_KEYS = {key: f"task.{key}" for key in ("label_smoothing", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob")}
"""Keys that left the top level for their task's section (an old recipe is told where they went)."""


def recipe_keys(task: str = TaskConfig.name) -> list[KeyInfo]:
    """Every key a recipe for ``task`` may set (``swinlab config --keys``): the run's sections and that task's."""
    task_keys = [
        dataclasses.replace(info, default=task) if info.key == "task.name" else info
        for info in section_keys(config_class(task), "task.")
    ]
    keys = []
    for info in section_keys(TrainConfig):
        if info.key == "task.name":
            keys += task_keys
        elif not info.key.startswith("task."):
            keys.append(info)
    return keys


def from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from nested plain values (a parsed recipe, a checkpoint's stored config)."""
    if not isinstance(values, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(values).__name__}")
    for key in values:
        if key in MOVED_KEYS:
            raise ConfigError(f"config key {key!r} moved to {MOVED_KEYS[key]!r} (the classification task's section)")
    rest = {key: value for key, value in values.items() if key != "task"}
    return build_section(TrainConfig, rest, task=task_section(values.get("task")))


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    values = apply_overrides(read_yaml(Path(path)) if path is not None else {}, overrides)
    try:
        return from_dict(values)
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
