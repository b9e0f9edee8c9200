"""Training one AiT task-solver on depth and instance segmentation together (``task: ait_joint``), through the one
engine: a single :class:`~swinlab.ait.TaskSolver` (one vocabulary holding the depth and the mask codes, a prompt and a
position table per task) learns both token languages, as AiT's joint COCO + NYUv2 model (box AP 42.2, mask AP 34.1,
RMSE 0.310 with SwinV2-B).

AiT trains the joint model on each task's own dataset: every iteration takes a batch of each and optimises the sum of
the two tasks' losses. Here a training step does the same: the depth loss of :class:`~swinlab.tasks.ait_depth.
AitDepthTask` on a batch of the run's data (``data:``, depth maps), the instance-segmentation loss of
:class:`~swinlab.tasks.ait_insseg.AitInsSegTask` on the next batch of a second dataset (``task.instances_data``), each
scaled by its weight (``task.depth_weight``, ``task.insseg_weight``), and one optimizer step on their sum. The two
tasks' own code computes the losses, predictions, metrics and pictures; this module only composes them. Each loss
gets its own backward (the gradients add up before the one update; under DDP each backward averages over ranks), so
the depth graph is freed before the instances forward.

The second dataset: the engine's loaders hold the run's ``data:`` (depth); the task builds the instances loaders
itself with :func:`swinlab.data.build.build` for its rank and the world size (the training set sharded like the
run's), and cycles the training loader on its own epochs. Its position (stream epoch, batches drawn in it) is task
state, and each stream epoch's sample order and augmentation seeds depend only on (run seed, stream epoch), never on
the global random state at the moment it starts, so a killed run resumes on the same instances batches. The two
tokenizers are frozen helpers (``task.depth_tokenizer``, ``task.mask_tokenizer``: run folders or checkpoints of
``task: ait_tokenizer`` and ``task: ait_mask_tokenizer``); each task's options are in ``task.depth`` and
``task.insseg`` (the keys of ``ait_depth`` and ``ait_insseg``).

Evaluation scores the depth metrics on the run's validation loader and COCO AP on the instances validation loader;
each task's teacher-forced loss becomes ``val_depth_loss`` / ``val_insseg_loss`` and ``val_loss`` is their weighted
sum. The best checkpoint is chosen by the validation RMSE: a dense, per-pixel metric that moves smoothly on a small
validation set, whereas COCO AP of a small solver is near zero and jumps with single detections.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from swinlab.ait import SoftVQVAE, TaskSolver
from swinlab.config import DataConfig, Positive, TaskConfig
from swinlab.tasks.ait_depth import AitDepthConfig, AitDepthTask
from swinlab.tasks.ait_insseg import AitInsSegConfig, AitInsSegTask, require_pycocotools
from swinlab.tasks.ait_tokenizer import load_run_tokenizer
from swinlab.tasks.base import Batch, FrozenModule, Logs, Step, Task
from swinlab.tasks.simmim import _stream

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from swinlab.data.build import DataBundle

_INSTANCES = 2
"""Stream tag of the instances loader's epochs (apart from the masks and sequences drawn with tags 0 and 1)."""


@dataclass(frozen=True, kw_only=True)
class AitJointConfig(TaskConfig):
    name: str = "ait_joint"
    depth_tokenizer: str | None = None
    """Run folder of a ``task: ait_tokenizer`` run (its ``checkpoint.pt``) or such a checkpoint file. Required."""
    mask_tokenizer: str | None = None
    """Run folder of a ``task: ait_mask_tokenizer`` run (its ``checkpoint.pt``) or such a checkpoint file. Required."""
    instances_data: DataConfig | None = None
    """The instance-segmentation data, with the keys of ``data:`` (e.g. ``{name: procedural_instances, img_size: 64,
    batch_size: 8}``); the run's ``data:`` is the depth data. Required."""
    depth_weight: Positive = 1.0
    """Weight of the depth loss (cross-entropy + auxiliary SILog) in each step's sum."""
    insseg_weight: Positive = 1.0
    """Weight of the instance-segmentation loss (weighted cross-entropy + auxiliary mask loss) in each step's sum."""
    depth: AitDepthConfig = field(default_factory=AitDepthConfig)
    """Options of the depth task (the keys of ``task: ait_depth`` but its tokenizer: ``aux_weight``, ``tau``, ...)."""
    insseg: AitInsSegConfig = field(default_factory=AitInsSegConfig)
    """Options of the instance-segmentation task (the keys of ``task: ait_insseg`` but its tokenizer:
    ``num_objects``, ``top_p``, ...)."""


TOKENIZERS = {"depth_tokenizer": ("depth", "ait_tokenizer"), "mask_tokenizer": ("mask", "ait_mask_tokenizer")}
"""Config key -> (tokenizer kind, the task that trains it)."""


def load_tokenizer(source: str | None, key: str) -> tuple[SoftVQVAE, Path]:
    """The tokenizer ``task.<key>`` names (:func:`~swinlab.tasks.ait_tokenizer.load_run_tokenizer`, errors naming
    that key)."""
    kind, trainer = TOKENIZERS[key]
    return load_run_tokenizer(source, kind, "ait_joint", trainer, key=key)


class InstanceStream:
    """Endless training batches of a loader, restarted on its own epochs, with its position as state.

    A stream epoch draws its sample order (the sampler's ``set_epoch``) and its augmentation seeds (drawn by the
    sampler from torch's global generator when its first batch is taken) under a seed of (``seed``, stream epoch)
    only, so the same position gives the same batch in a fresh run and in a resumed one. A resumed stream loads and
    drops the batches its epoch already gave (less than one stream epoch) to get back to its position.
    """

    def __init__(self, loader: DataLoader, seed: int) -> None:
        self.loader, self.seed = loader, seed
        self.epoch = 0
        """Stream epochs completed."""
        self.drawn = 0
        """Batches drawn in the current stream epoch."""
        self._batches: Iterator[Batch] | None = None

    def _start(self) -> Iterator[Batch]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stream(self.seed, _INSTANCES, self.epoch).initial_seed())
            batches = iter(self.loader)
            first = next(batches, None)
        if first is None:
            raise ValueError("task.instances_data: the instances training loader yields no batch (is the set empty?)")
        return itertools.chain([first], batches)

    def __next__(self) -> Batch:
        if self._batches is None:
            self._batches = self._start()
            for _ in itertools.islice(self._batches, self.drawn):  # resumed: skip what the checkpointed run drew
                pass
        batch = next(self._batches, None)
        if batch is None:
            self.epoch, self.drawn = self.epoch + 1, 0
            self._batches = self._start()
            batch = next(self._batches)
        self.drawn += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "drawn": self.drawn}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.drawn = int(state["epoch"]), int(state["drawn"])
        self._batches = None


class AitJointTask(Task):
    """Depth and instance segmentation as tokens of one solver: the weighted sum of the two tasks' losses per step;
    depth metrics and COCO AP at evaluation; best checkpoint by the validation RMSE."""

    Config = AitJointConfig
    data_kinds = ("depth",)
    metric_names = (
        "val_loss",
        "val_depth_loss",
        *(m for m in AitDepthTask.metric_names if m != "val_loss"),
        "val_insseg_loss",
        *(m for m in AitInsSegTask.metric_names if m != "val_loss"),
    )
    best_metric = ("val_rmse", "min")

    def __init__(
        self, config: AitJointConfig, depth: AitDepthTask, insseg: AitInsSegTask, instances: DataBundle
    ) -> None:
        self.config, self.depth, self.insseg = config, depth, insseg
        self.stream = InstanceStream(instances.train_loader, instances.seed)
        self.instances_val: Iterable[Batch] = instances.val_loader

    @classmethod
    def from_config(cls, config: AitJointConfig, data: DataBundle) -> AitJointTask:
        from swinlab.data.build import build

        for key, section in (("depth", config.depth), ("insseg", config.insseg)):
            if section.tokenizer is not None:
                raise ValueError(f"task.{key}.tokenizer: a joint recipe sets task.depth_tokenizer and "
                                 "task.mask_tokenizer instead")  # fmt: skip
        if config.instances_data is None:
            raise ValueError("task.instances_data is required: the instances data, with the keys of data: (e.g. "
                             "{name: procedural_instances, img_size: 64, batch_size: 8})")  # fmt: skip
        require_pycocotools("ait_joint")
        depth_tokenizer, depth_path = load_tokenizer(config.depth_tokenizer, "depth_tokenizer")
        mask_tokenizer, mask_path = load_tokenizer(config.mask_tokenizer, "mask_tokenizer")
        distributed = dist.is_available() and dist.is_initialized()
        world_size = dist.get_world_size() if distributed else 1
        instances = build(config.instances_data, seed=data.seed, rank=data.rank, world_size=world_size)
        if instances.kind != "instances":
            raise ValueError(
                f"task.instances_data.name must be instance segmentation data (coco_instances, procedural_instances), "
                f"got {config.instances_data.name!r} ({instances.kind} batches)"
            )
        depth = AitDepthTask(config.depth, depth_tokenizer, depth_path)
        insseg = AitInsSegTask(
            config.insseg, mask_tokenizer, mask_path, num_classes=instances.num_classes,
            category_ids=instances.category_ids, seed=instances.seed, rank=instances.rank, mean=instances.mean,
            std=instances.std,
        )  # fmt: skip
        return cls(config, depth, insseg, instances)

    def prepare_model(self, model: nn.Module) -> TaskSolver:
        """The recipe's solver, checked by both tasks (codes of both tokenizers, both prompts, classes, length)."""
        if not isinstance(model, TaskSolver):
            raise TypeError(
                f"task ait_joint trains a TaskSolver (model.name: ait_task_solver), got {type(model).__name__}"
            )
        return self.insseg.prepare_model(self.depth.prepare_model(model))

    # -- what a batch means ----------------------------------------------------------------------------------
    def train_step(self, step: Step, batch: Batch) -> Logs:
        """The depth loss of ``batch`` and the instances loss of the stream's next batch, weighted, one update."""
        c = self.config
        with step.update():
            depth_loss, depth_logs = self.depth.loss(step.model, batch)
            step.backward(c.depth_weight * depth_loss)
            insseg_loss, insseg_logs = self.insseg.loss(step.model, next(self.stream))
            step.backward(c.insseg_weight * insseg_loss)
        total = c.depth_weight * depth_loss.detach() + c.insseg_weight * insseg_loss.detach()
        return {
            "loss": total,
            **{f"depth_{k}": v for k, v in depth_logs.items()},
            **{f"insseg_{k}": v for k, v in insseg_logs.items()},
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """The depth task's sums over ``loader`` (the run's validation data) and the instances task's over the
        instances validation loader, keyed ``depth/…`` and ``insseg/…``."""
        sums = {f"depth/{k}": v for k, v in self.depth.evaluate(model, loader).items()}
        return sums | {f"insseg/{k}": v for k, v in self.insseg.evaluate(model, self.instances_val).items()}

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        metrics = {}
        for prefix, task in (("depth", self.depth), ("insseg", self.insseg)):
            part = task.finalize({k.split("/", 1)[1]: v for k, v in sums.items() if k.startswith(f"{prefix}/")})
            if "val_loss" in part:
                part[f"val_{prefix}_loss"] = part.pop("val_loss")
            metrics |= part
        depth, insseg = metrics.get("val_depth_loss"), metrics.get("val_insseg_loss")
        if depth is not None and insseg is not None:
            metrics["val_loss"] = self.config.depth_weight * depth + self.config.insseg_weight * insseg
        return metrics

    # -- what it keeps and leaves behind ---------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, FrozenModule]:
        return {
            "depth_tokenizer": self.depth.frozen_modules()["tokenizer"],
            "mask_tokenizer": self.insseg.frozen_modules()["tokenizer"],
        }

    def state_dict(self) -> dict[str, Any]:
        return {"insseg": self.insseg.state_dict(), "instances": self.stream.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.insseg.load_state_dict(state["insseg"])
        self.stream.load_state_dict(state["instances"])

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        """Both tasks' pictures: ``depth_epoch<N>.png`` and ``insseg_epoch<N>.png``."""
        self.depth.on_epoch_end(model, epoch, run_dir, metrics)
        self.insseg.on_epoch_end(model, epoch, run_dir, metrics)

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        lines = self.depth.summary(metrics, best, epochs) + self.insseg.summary(metrics, None, epochs)
        if "val_loss" in metrics:
            c, m = self.config, metrics
            lines.append(
                f"validation loss {m['val_loss']:.4f} = {c.depth_weight:g} x depth {m['val_depth_loss']:.4f} + "
                f"{c.insseg_weight:g} x insseg {m['val_insseg_loss']:.4f}"
            )
        return lines
