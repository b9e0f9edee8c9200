"""Training AiT's task-solver on instance segmentation as a task (``task: ait_insseg``): a
:class:`~swinlab.ait.TaskSolver` learns to write every object of an image as box bins, a class and the codes a
trained, frozen mask tokenizer gives its box-cropped mask (:class:`~swinlab.ait.ObjectCoder`), through the one engine.

The tokenizer comes from ``task.tokenizer`` (a run folder of ``task: ait_mask_tokenizer`` or its checkpoint) and is a
frozen helper of the task, as in :mod:`swinlab.tasks.ait_depth`. A training step builds each image's sequence
(objects shuffled, padded to ``num_objects`` with noise objects, input classes corrupted; crowd regions left out),
and the loss is the weighted cross-entropy over the vocabulary (box 1, class 1, mask 0.2) plus ``aux_weight`` x
(dice + MSE) of the real objects' soft-decoded mask logits against their 64 x 64 crops (AiT's auxiliary loss, 5.0).
The sequences' random draws come from a generator seeded by (run seed, rank, sequences built so far); the counter is
the task's checkpointed state, so a resumed run draws the same sequences.

Evaluation decodes each validation image autoregressively with the key/value cache, every position restricted to
the ids it may hold (box -> bins, class -> classes or noise, mask -> codes), nucleus sampling with ``top_p``
(official 0.3) and soft next-token inputs on the mask positions; the sequences become per-image predictions
(class score: softmax over classes and noise with the noise column dropped; masks soft-decoded and pasted into the
boxes) scored with COCO mask and box AP (pycocotools, through :mod:`swinlab.metrics.coco`). Under DDP every rank
gathers all ranks' predictions, so the AP is the one of the whole validation set.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.distributed as dist
from torch import nn

from swinlab.ait import ObjectCoder, SoftVQVAE, TaskSolver, aux_loss, freeze_tokenizer
from swinlab.config import Count, NonNegativeInt, Positive, Range, TaskConfig
from swinlab.tasks.ait_tokenizer import load_run_tokenizer
from swinlab.tasks.base import Batch, FrozenModule, Logs, Task, model_device
from swinlab.tasks.simmim import _stream, save_picture_grid

if TYPE_CHECKING:
    from swinlab.data.build import DataBundle

PROMPT = "insseg"
"""The solver's prompt (start embedding and position table) for this task."""
CODES = "mask"
"""The vocabulary's code range of the mask tokenizer."""
_TRAIN, _EVAL = 0, 1
AP_METRICS = ("mask_ap", "mask_ap50", "box_ap", "box_ap50")


@dataclass(frozen=True, kw_only=True)
class AitInsSegConfig(TaskConfig):
    name: str = "ait_insseg"
    tokenizer: str | None = None
    """Run folder of a ``task: ait_mask_tokenizer`` run (its ``checkpoint.pt``) or such a checkpoint file. Required."""
    num_objects: Count = 100
    """Objects per sequence (official 100): real ones first drawn, then noise objects; 21 tokens each."""
    box_weight: Annotated[float, Range(ge=0)] = 1.0
    class_weight: Annotated[float, Range(ge=0)] = 1.0
    mask_weight: Annotated[float, Range(ge=0)] = 0.2
    """Cross-entropy weights of the box, class and mask-code tokens (official 1, 1, 0.2)."""
    aux_weight: Annotated[float, Range(ge=0)] = 5.0
    """Weight of dice + MSE through the frozen decoder (official 5.0; 0: off)."""
    tau: Positive = 1.0
    """Multiplier of the mask-code logits in the soft decode, ``softmax(tau · logits)`` (an inverse temperature;
    auxiliary loss and evaluation; official 1.0)."""
    duplicate_ratio: Annotated[float, Range(ge=0, le=1)] = 0.5
    """Share of noise objects that are jittered duplicates of real boxes (the rest: random boxes)."""
    jitter: Annotated[float, Range(ge=0)] = 0.1
    """Largest shift of a duplicate's sides, as a share of the real box's width / height."""
    order: str = "random"
    """Order of the real objects in a sequence: ``random`` (official, a fresh permutation every step) or ``area``
    (largest box first; not official, easier for a small solver)."""
    top_p: Annotated[float, Range(ge=0, le=1)] = 0.3
    """Nucleus of the sampling at evaluation (official 0.3; 0: greedy)."""
    soft_input: bool = True
    """Autoregressive decoding feeds the softmax mix of the code embeddings at mask positions (official)."""
    mask_images: NonNegativeInt = 6
    """Validation images drawn in ``insseg_epoch<N>.png`` (rows: image, ground-truth masks, predicted masks scored
    at least ``picture_score``, each object in its own colour on the greyed image); 0: no pictures."""
    picture_score: Annotated[float, Range(ge=0, le=1)] = 0.5


class AitInsSegTask(Task):
    """Instance segmentation as tokens: weighted CE + auxiliary mask loss; best checkpoint by COCO mask AP."""

    Config = AitInsSegConfig
    data_kinds = ("instances",)
    metric_names = ("val_loss", *(f"val_{m}" for m in AP_METRICS))
    best_metric = ("val_mask_ap", "max")

    def __init__(
        self,
        config: AitInsSegConfig,
        tokenizer: SoftVQVAE,
        source: Path | None = None,
        *,
        num_classes: int = 0,
        category_ids: Sequence[int] = (),
        seed: int = 0,
        rank: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if tokenizer.kind != CODES:
            raise TypeError(f"task.tokenizer: task ait_insseg needs a mask tokenizer, got a {tokenizer.kind} tokenizer")
        self.config, self.tokenizer, self.source = config, freeze_tokenizer(tokenizer), source
        self.num_classes, self.category_ids, self.seed, self.rank = num_classes, tuple(category_ids), seed, rank
        self.mean, self.std = mean, std
        self.sequences_built = 0
        """Training batches turned into sequences so far (the task's checkpointed state)."""
        self.coder: ObjectCoder | None = None
        self._shown: list[tuple[torch.Tensor, dict, dict]] = []

    @classmethod
    def from_config(cls, config: AitInsSegConfig, data: DataBundle) -> AitInsSegTask:
        require_pycocotools("ait_insseg")
        tokenizer, path = load_run_tokenizer(config.tokenizer, CODES, "ait_insseg", "ait_mask_tokenizer")
        return cls(config, tokenizer, path, num_classes=data.num_classes, category_ids=data.category_ids,
                   seed=data.seed, rank=data.rank, mean=data.mean, std=data.std)  # fmt: skip

    def prepare_model(self, model: nn.Module) -> TaskSolver:
        """The recipe's solver, checked against the tokenizer and the data: mask codes, classes, prompt, length."""
        if not isinstance(model, TaskSolver):
            raise TypeError(
                f"task ait_insseg trains a TaskSolver (model.name: ait_task_solver), got {type(model).__name__}"
            )
        vocabulary = model.vocabulary
        have = vocabulary.num_codes(CODES) if CODES in vocabulary.tasks else 0
        if have != self.tokenizer.num_codes:
            raise ValueError(
                f"the solver's vocabulary has {have} mask codes but the tokenizer has {self.tokenizer.num_codes}: "
                f"set model.kwargs.codes.mask: {self.tokenizer.num_codes}"
            )
        classes = vocabulary.span("classes")
        if self.num_classes and classes[1] - classes[0] != self.num_classes:
            raise ValueError(
                f"the solver's vocabulary has {classes[1] - classes[0]} classes but the data has {self.num_classes}: "
                f"set model.kwargs.num_classes: {self.num_classes}"
            )
        if PROMPT not in model.prompts:
            raise ValueError(f"the solver has no {PROMPT} prompt: add '{PROMPT}' to model.kwargs.prompts")
        c = self.config
        self.coder = ObjectCoder(
            vocabulary, self.tokenizer, c.num_objects, (c.box_weight, c.class_weight, c.mask_weight),
            c.duplicate_ratio, c.jitter, c.order,
        )  # fmt: skip
        if self.coder.length > model.max_length:
            raise ValueError(
                f"{c.num_objects} objects of {self.coder.per_object} tokens need {self.coder.length} positions: set "
                f"model.kwargs.max_length >= {self.coder.length} (now {model.max_length}) or lower task.num_objects"
            )
        return model

    def _coder(self, model: nn.Module) -> ObjectCoder:
        if self.coder is None:
            self.prepare_model(getattr(model, "module", model))
        return self.coder

    # -- what a batch means ----------------------------------------------------------------------------------
    def _loss(
        self, model: nn.Module, images: torch.Tensor, targets: Sequence[Mapping], generator: torch.Generator
    ) -> tuple[torch.Tensor, Logs]:
        coder = self._coder(model)
        device = model_device(model)
        seq = coder.encode([_without_crowd(t) for t in targets], *images.shape[-2:], generator)
        logits = model(images.to(device), PROMPT, seq.targets.to(device), seq.inputs.to(device))
        seq = seq.to(device)
        ce = coder.token_loss(logits, seq)
        loss, logs = ce, {"ce": ce.detach()}
        if self.config.aux_weight > 0 and seq.real.any():
            aux = aux_loss(self.tokenizer, coder.mask_logits(logits, seq.real), seq.crops, self.config.tau)
            loss = ce + self.config.aux_weight * aux
            logs["aux_mask"] = aux.detach()
        return loss, {"loss": loss.detach(), **logs}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        generator = _stream(self.seed, self.rank, _TRAIN, self.sequences_built)
        self.sequences_built += 1
        return self._loss(model, batch[0], batch[1], generator)

    def predict(self, solver: TaskSolver, images: torch.Tensor, generator: torch.Generator | None = None) -> list[dict]:
        """Per-image predictions (``boxes``, ``scores``, ``labels``, ``masks``; see :meth:`ObjectCoder.decode`)."""
        coder, c = self._coder(solver), self.config
        soft = coder.soft_positions() if c.soft_input else None
        logits, ids = solver.generate_tokens(
            images, PROMPT, coder.length, coder.allowed(), soft=soft, top_p=c.top_p, generator=generator
        )
        return coder.decode(logits, ids, *images.shape[-2:], tau=c.tau)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Sums of the teacher-forced loss per image, and the set's COCO AP times the local image count."""
        c = self.config
        device = model_device(model)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = {k: zero.clone() for k in ("count", "loss", *AP_METRICS)}
        predictions, truths = [], []
        self._shown = []
        for index, (images, targets) in enumerate(loader):
            n = images.shape[0]
            if n == 0:
                continue
            images = images.to(device)
            generator = _stream(self.seed, self.rank, _EVAL, index)  # the same sequences at every evaluation
            sums["loss"] += self._loss(model, images, targets, generator)[0].double() * n
            found = self.predict(model, images, _stream(self.seed, self.rank, _EVAL, index, 1))
            found = [{k: v.cpu() for k, v in p.items()} for p in found]
            predictions += found
            truths += [{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
            sums["count"] += n
            for i in range(min(n, c.mask_images - len(self._shown))):
                self._shown.append((images[i].cpu(), truths[-n + i], found[i]))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (predictions, truths))
            predictions = [p for part, _ in gathered for p in part]
            truths = [t for _, part in gathered for t in part]
        if predictions:
            for name, value in average_precision(predictions, truths, self.category_ids).items():
                sums[name] += value * sums["count"]
        return sums

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums["count"]
        return {f"val_{k}": sums[k] / n for k in ("loss", *AP_METRICS)} if n else {}

    # -- what it keeps and leaves behind ---------------------------------------------------------------------
    def frozen_modules(self) -> dict[str, FrozenModule]:
        return {"tokenizer": FrozenModule(self.tokenizer, None if self.source is None else str(self.source))}

    def state_dict(self) -> dict[str, Any]:
        return {"sequences_built": self.sequences_built}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sequences_built = int(state["sequences_built"])

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        """``insseg_epoch<N>.png`` after every evaluation: rows image, ground-truth masks, predicted masks."""
        if not metrics or not self._shown:
            return
        rows = [[], [], []]
        for image, truth, found in self._shown:
            picture = self._picture(image)
            rows[0].append(picture)
            rows[1].append(overlay(picture, truth["masks"]))
            rows[2].append(overlay(picture, found["masks"][found["scores"] >= self.config.picture_score]))
        save_picture_grid([torch.stack(row) for row in rows], run_dir / f"insseg_epoch{epoch}.png")

    def _picture(self, image: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return (image - image.min()) / (image.max() - image.min()).clamp_min(1e-6)
        mean, std = torch.tensor(self.mean).view(-1, 1, 1), torch.tensor(self.std).view(-1, 1, 1)
        return (image * std + mean).clamp(0, 1)

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        if "val_mask_ap" not in metrics:
            return []
        m = metrics
        lines = [
            f"COCO mask AP {m['val_mask_ap']:.4f} (AP50 {m['val_mask_ap50']:.4f}), box AP {m['val_box_ap']:.4f} "
            f"(AP50 {m['val_box_ap50']:.4f}); decoding top_p {self.config.top_p:g}"
        ]
        if best is not None:
            lines.append(f"best mask AP {best:.4f} after {epochs} epochs")
        return lines


PALETTE = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.7, 0.2], [0.2, 0.4, 0.9], [0.9, 0.8, 0.1], [0.8, 0.3, 0.8],
                        [0.1, 0.8, 0.8], [1.0, 0.5, 0.0], [0.5, 0.5, 0.5]])  # fmt: skip


def overlay(picture: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``picture`` (3, H, W) in [0, 1] greyed, with each mask (n, H, W) painted over in its own colour."""
    out = picture.mean(0, keepdim=True).expand(3, -1, -1) * 0.6
    for k, mask in enumerate(masks.bool()):
        colour = PALETTE[k % len(PALETTE)].view(3, 1, 1)
        out = torch.where(mask, 0.3 * out + 0.7 * colour, out)
    return out


def require_pycocotools(task: str) -> None:
    """Fail before training, not at the first evaluation, when COCO AP cannot be scored."""
    if importlib.util.find_spec("pycocotools") is None:
        raise ImportError(f'task {task} scores COCO AP with pycocotools: pip install "swinlab[coco]"')


def _without_crowd(target: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A target without its crowd regions (COCO ``iscrowd``): they are not objects to write out."""
    crowd = target.get("iscrowd")
    if crowd is None or not crowd.any():
        return target
    keep = ~crowd.bool()
    return {**target, **{k: target[k][keep] for k in ("boxes", "labels", "masks")}}


def average_precision(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    truths: Sequence[Mapping[str, Any]],
    category_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """COCO mask and box AP and AP50 of per-image predictions against the ``instances`` targets of the same images
    (:func:`swinlab.metrics.coco.coco_ap`, pycocotools; ``nan`` where no ground truth makes it undefined)."""
    from swinlab.metrics.coco import coco_ap

    found = coco_ap(predictions, truths, category_ids=category_ids or None)
    return {
        f"{kind}_{stat}": found[iou][stat]
        for kind, iou in (("mask", "segm"), ("box", "bbox"))
        for stat in ("ap", "ap50")
    }
