"""Workloads as tasks: what a batch means, kept apart from the engine that runs it (see :mod:`swinlab.tasks.base`).

- the seam: :class:`Task`, :class:`Step` (what the engine lends a custom train step), :class:`OptimizerSpec`,
  :class:`FrozenModule`
- by name: :func:`task_class` (``task: <name>`` in a recipe), :data:`TASKS`
- built in: :class:`ClassificationTask`, :class:`VideoClassificationTask`, :class:`LanguageModelTask`
"""

from swinlab.tasks.base import FrozenModule, OptimizerSpec, Step, Task, batch_len, model_device, move_to
from swinlab.tasks.classification import (
    ClassificationConfig,
    ClassificationTask,
    VideoClassificationConfig,
    VideoClassificationTask,
)
from swinlab.tasks.language_model import LanguageModelTask
from swinlab.tasks.registry import TASKS, task_class, task_names

__all__ = [  # noqa: RUF022 - grouped as the module docstring
    "FrozenModule",
    "OptimizerSpec",
    "Step",
    "Task",
    "batch_len",
    "model_device",
    "move_to",
    "TASKS",
    "task_class",
    "task_names",
    "ClassificationConfig",
    "ClassificationTask",
    "LanguageModelTask",
    "VideoClassificationConfig",
    "VideoClassificationTask",
]
