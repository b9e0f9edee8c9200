"""The one training/evaluation engine every swinlab workload runs on; the workloads themselves are tasks
(:mod:`swinlab.tasks`).

Public surface:

- running: :func:`train` (from a config), :func:`evaluate` (a run folder or checkpoint),
  :func:`fit` (any model, task, optimizer(s) and loaders), :func:`run_evaluation`
- parts: :func:`build_model`, :func:`build_run_model` (as the task prepares it), :func:`build_task`,
  :func:`build_optimizer`, :func:`build_optimizers`, :func:`param_groups`, :class:`LRSchedule`,
  :func:`build_schedule`, :mod:`~swinlab.engine.precision` (``wrap``),
  :class:`Stepper` (a task's :class:`~swinlab.tasks.Step`), :func:`save_checkpoint`, :func:`load_checkpoint`,
  :class:`CheckpointError`, :class:`DistEnv`, :func:`init_distributed`, :func:`process_group`
"""

from swinlab.engine import precision
from swinlab.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from swinlab.engine.distributed import DistEnv, init_distributed, process_group
from swinlab.engine.loop import fit, run_evaluation
from swinlab.engine.optim import build_optimizer, build_optimizers, param_groups
from swinlab.engine.schedule import LRSchedule, build_schedule
from swinlab.engine.step import Stepper
from swinlab.engine.trainer import build_model, build_run_model, build_task, evaluate, train

__all__ = [  # noqa: RUF022 - grouped by purpose, as the module docstring
    # running
    "evaluate",
    "fit",
    "run_evaluation",
    "train",
    # parts
    "CheckpointError",
    "DistEnv",
    "LRSchedule",
    "Stepper",
    "build_model",
    "build_run_model",
    "build_optimizer",
    "build_optimizers",
    "build_schedule",
    "build_task",
    "init_distributed",
    "process_group",
    "load_checkpoint",
    "param_groups",
    "precision",
    "save_checkpoint",
]
