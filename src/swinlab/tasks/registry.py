"""Tasks by name: ``task: <name>`` in a recipe picks one, and its class says which config section it reads.

Entries are import paths, resolved on first use, so reading a recipe (``swinlab.recipe``) never imports a system it
does not use. A name of the form
``package.module:Class`` is taken as such a path too: a task of your own runs without registering it.
Adding a task to swinlab = one module + one line here.
"""

from __future__ import annotations

import difflib
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swinlab.config import TaskConfig
    from swinlab.tasks.base import Task

TASKS: dict[str, str] = {
    "classification": "swinlab.tasks.classification:ClassificationTask",
    "video_classification": "swinlab.tasks.classification:VideoClassificationTask",
    "language_model": "swinlab.tasks.language_model:LanguageModelTask",
    "simmim": "swinlab.tasks.simmim:SimMIMTask",
    "darts_search": "swinlab.tasks.darts:DartsSearchTask",
    "darts_eval": "swinlab.tasks.darts:DartsEvalTask",
    "ait_tokenizer": "swinlab.tasks.ait_tokenizer:AitTokenizerTask",
    "ait_depth": "swinlab.tasks.ait_depth:AitDepthTask",
    "ait_mask_tokenizer": "swinlab.tasks.ait_tokenizer:AitMaskTokenizerTask",
    "ait_insseg": "swinlab.tasks.ait_insseg:AitInsSegTask",
    "ait_joint": "swinlab.tasks.ait_joint:AitJointTask",
}


def task_names() -> list[str]:
    return sorted(TASKS)


def task_class(name: str) -> type[Task]:
    """The task class registered as ``name`` (or at the import path ``module:Class``)."""
    path = TASKS.get(name, name if ":" in name else None)
    if path is None:
        close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown task {name!r}{hint} (choose from {', '.join(task_names())}, or give module:Class of your own)"
        )
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"task {name!r}: cannot import {path} ({e})") from None
    from swinlab.tasks.base import Task

    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"task {name!r}: {path} is not a subclass of swinlab.tasks.Task")
    return cls


def config_class(name: str) -> type[TaskConfig]:
    """The config section class of task ``name``."""
    return task_class(name).Config
