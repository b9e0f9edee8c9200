"""Training AiT's tokenizers as tasks: ``task: ait_tokenizer`` — a :class:`~swinlab.ait.SoftVQVAE` of kind ``depth``
learns to reconstruct depth maps (metres, 0 = invalid); ``task: ait_mask_tokenizer`` — one of kind ``mask`` learns to
reconstruct the binary instance masks of ``instances`` data, each cropped to its box and resized to the tokenizer's
``image_size`` (:func:`~swinlab.ait.crop_masks`, as the task-solver's targets are made), scored by mask IoU. Both
share the training step (the tokenizer's own forward), the codebook statistics, the DDP codebook rule and the
pictures; they differ in what a label is and how a reconstruction is scored.

A training step is the tokenizer's own forward (``loss`` = reconstruction on valid pixels + commitment; the EMA
codebook updates in it), optionally on a patch-masked input with the full map as the label (AiT's mask
augmentation, :func:`~swinlab.ait.masking.mask_patches`). The RGB half of each ``(image, depth)`` batch is not used:
the tokenizer sees labels only, as in the official recipe. Masks come from a ``torch.Generator`` seeded by (run seed,
rank, masks drawn so far); the counter is the task's checkpointed state, so a resumed run draws the same masks.

Evaluation follows the official tokenizer validation: each unmasked validation map goes through encode → decode
(the hard ids), and the reconstruction is scored against the map with AiT's depth metrics
(:mod:`swinlab.metrics.depth`, per image then mean), after clipping it to ``>= min_depth`` as AiT's solver test does
(the official validation leaves it unclipped, so one non-positive pixel makes its log metrics NaN). Codebook health
over the whole validation set: ``val_usage`` (share of codes used) and ``val_perplexity``.

DDP and the EMA codebook (its statistics are buffers, updated inside the forward): the codebook all-reduces each
step's code counts and sums over the ranks (:mod:`swinlab.ait.codebook`), so it is the moving average of the whole
global batch and the same on every rank; the encoder and decoder gradients are averaged as usual. Evaluation first
broadcasts rank 0's buffers anyway (a guard that costs one broadcast), so the validated and the saved codebook are
certainly one. (The official script turns DDP's buffer broadcast off, so each GPU there keeps its own drifting
codebook and only rank 0's is validated and saved.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from swinlab.ait import SoftVQVAE, crop_masks, mask_patches
from swinlab.config import Count, NonNegativeInt, Positive, Range, TaskConfig
from swinlab.metrics.depth import DEPTH_METRICS, depth_metrics
from swinlab.tasks.base import Batch, Logs, Task, model_device
from swinlab.tasks.simmim import _stream, save_picture_grid  # one mixing of seed words, one picture grid

if TYPE_CHECKING:
    from swinlab.data.build import DataBundle

EVAL_CROPS = (None, "eigen")
TRAIN_LOGS = ("loss", "recon_loss", "vq_loss", "perplexity", "usage", "reseeded")


@dataclass(frozen=True, kw_only=True)
class AitTokenizerConfig(TaskConfig):
    name: str = "ait_tokenizer"
    mask_ratio: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Share of the ``mask_patch_size`` cells of each training map zeroed in the tokenizer's input (the loss still
    compares with the whole map): AiT's mask augmentation. The released depth recipe: 0.5; 0: off."""
    mask_patch_size: Count = 16
    """Side in pixels of the masked cells (map sides must be multiples of it)."""
    eval_crop: str | None = None
    """``eigen``: score only the Eigen crop (NYUv2's official evaluation; scaled for maps other than 480 x 640);
    ``null``: the whole map."""
    min_depth: Positive = 1e-3
    """Ground truth must be above this to count, and reconstructions are clipped to at least this (metres)."""
    max_depth: Positive = 10.0
    """Ground truth must be below this to count (metres)."""
    recon_images: NonNegativeInt = 6
    """Validation maps drawn in ``depth_epoch<N>.png`` after every evaluation (rows: ground truth, reconstruction,
    on one scale per map, invalid pixels black); 0: no pictures."""


@dataclass(frozen=True, kw_only=True)
class AitMaskTokenizerConfig(TaskConfig):
    name: str = "ait_mask_tokenizer"
    threshold: Annotated[float, Range(gt=0, lt=1)] = 0.5
    """A reconstructed crop is binarised at this value for the mask IoU."""
    max_masks: NonNegativeInt = 0
    """Train on at most this many masks of a batch (the first ones; 0: all)."""
    recon_images: NonNegativeInt = 8
    """Validation masks drawn in ``masks_epoch<N>.png`` after every evaluation (rows: ground-truth crop,
    reconstruction); 0: no pictures."""


def _code_key(k: int) -> str:
    return f"code_{k:05d}"


class _TokenizerTask(Task):
    """What both tokenizer tasks share. A subclass says what the labels of a batch are (:meth:`labels`), how a
    reconstruction is scored (:meth:`score`: per-label values, summed here and averaged in :meth:`finalize`) and
    drawn (:meth:`pictures`)."""

    kind: ClassVar[str]
    model_name: ClassVar[str]
    picture: ClassVar[str]
    """File name stem of the pictures, ``<picture>_epoch<N>.png``."""
    scores: ClassVar[tuple[str, ...]]

    def __init__(self, config: TaskConfig, *, seed: int = 0, rank: int = 0) -> None:
        self.config = config
        self.seed, self.rank = seed, rank
        self._shown: torch.Tensor | None = None
        """Labels and reconstructions of the last evaluation, for its picture."""

    @classmethod
    def from_config(cls, config: TaskConfig, data: DataBundle) -> _TokenizerTask:
        return cls(config, seed=data.seed, rank=data.rank)

    def prepare_model(self, model: nn.Module) -> SoftVQVAE:
        if not isinstance(model, SoftVQVAE) or model.kind != self.kind:
            what = f"a {model.kind} tokenizer" if isinstance(model, SoftVQVAE) else type(model).__name__
            raise TypeError(
                f"task {self.config.name} trains a {self.kind} SoftVQVAE (model.name: {self.model_name}), got {what}"
            )
        return model

    # -- what a batch means ----------------------------------------------------------------------------------
    def labels(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The ``(N, 1, H, W)`` maps of a batch the tokenizer learns to reconstruct, on the model's device."""
        raise NotImplementedError

    def train_input(self, labels: torch.Tensor) -> torch.Tensor:
        """What the encoder sees in a training step (default: the labels themselves)."""
        return labels

    def reconstruction(self, output: torch.Tensor) -> torch.Tensor:
        """The decoded maps as they are scored and drawn."""
        return output

    def score(self, recon: torch.Tensor, labels: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """Per-label values of each of :attr:`scores`."""
        raise NotImplementedError

    def pictures(self, labels: torch.Tensor, recon: torch.Tensor) -> list[torch.Tensor]:
        """Rows of ``(B, 1, H, W)`` pictures in [0, 1]."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        labels = self.labels(model, batch)
        out = model(self.train_input(labels), labels)
        return out["loss"], {k: torch.as_tensor(out[k], dtype=torch.float32).detach() for k in TRAIN_LOGS}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Per-label sums of the scores and losses, and the set's code histogram (one key per code)."""
        _share_codebook(model)
        device = model_device(model)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = {k: zero.clone() for k in ("count", "loss", "recon_loss", *self.scores)}
        histogram = torch.zeros(model.num_codes, dtype=torch.float64, device=device)
        shown = self.config.recon_images
        self._shown = None
        for batch in loader:
            labels = self.labels(model, batch)
            n = labels.shape[0]
            if n == 0:
                continue
            out = model(labels)
            recon = self.reconstruction(out["output"])
            for name, values in self.score(recon, labels).items():
                sums[name] += values.double().sum()
            sums["loss"] += out["loss"].double() * n
            sums["recon_loss"] += out["recon_loss"].double() * n
            sums["count"] += n
            histogram.index_add_(0, out["ids"].flatten(), torch.ones_like(out["ids"].flatten(), dtype=torch.float64))
            if self._shown is None and shown:
                self._shown = torch.stack([labels[:shown], recon[:shown]]).cpu()
        sums.update({_code_key(k): histogram[k] for k in range(model.num_codes)})
        return sums

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums["count"]
        if not n:
            return {}
        metrics = {f"val_{k}": sums[k] / n for k in ("loss", "recon_loss", *self.scores)}
        counts = torch.tensor([v for k, v in sorted(sums.items()) if k.startswith("code_")], dtype=torch.float64)
        probs = counts / counts.sum()
        metrics["val_usage"] = float((counts > 0).double().mean())
        metrics["val_perplexity"] = float(torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
        return metrics

    # -- what it leaves behind -------------------------------------------------------------------------------
    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        """``<picture>_epoch<N>.png`` after every evaluation: ground truth above, reconstruction below."""
        if not metrics or self._shown is None:
            return
        save_picture_grid(self.pictures(*self._shown), run_dir / f"{self.picture}_epoch{epoch}.png")

    def codebook_line(self, m: Mapping[str, float]) -> str:
        return (
            f"codebook: {m['val_usage']:.0%} of codes used on the validation set, perplexity {m['val_perplexity']:.1f}"
        )


class AitTokenizerTask(_TokenizerTask):
    """Reconstruction of depth maps through the tokenizer's codes; best checkpoint by reconstruction RMSE."""

    Config = AitTokenizerConfig
    data_kinds = ("depth",)
    metric_names = ("val_loss", "val_recon_loss", *(f"val_{m}" for m in DEPTH_METRICS), "val_usage", "val_perplexity")
    best_metric = ("val_rmse", "min")
    kind, model_name, picture, scores = "depth", "ait_depth_vqvae", "depth", DEPTH_METRICS

    def __init__(self, config: AitTokenizerConfig | None = None, *, seed: int = 0, rank: int = 0) -> None:
        super().__init__(config or AitTokenizerConfig(), seed=seed, rank=rank)
        if self.config.eval_crop not in EVAL_CROPS:
            raise ValueError(f"task.eval_crop must be null or 'eigen', got {self.config.eval_crop!r}")
        if self.config.min_depth >= self.config.max_depth:
            raise ValueError(f"task.min_depth {self.config.min_depth} must be below task.max_depth")
        self.masks_drawn = 0
        """Training masks drawn so far (the task's checkpointed state)."""

    def labels(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return batch[1].to(model_device(model), non_blocking=True)

    def train_input(self, labels: torch.Tensor) -> torch.Tensor:
        if self.config.mask_ratio <= 0:
            return labels
        generator = _stream(self.seed, self.rank, self.masks_drawn)
        masked, _ = mask_patches(labels, self.config.mask_ratio, self.config.mask_patch_size, generator)
        self.masks_drawn += 1
        return masked

    def reconstruction(self, output: torch.Tensor) -> torch.Tensor:
        return output.clamp_min(self.config.min_depth)

    def score(self, recon: torch.Tensor, labels: torch.Tensor) -> Mapping[str, torch.Tensor]:
        c = self.config
        return depth_metrics(recon, labels, min_depth=c.min_depth, max_depth=c.max_depth, crop=c.eval_crop)

    def pictures(self, labels: torch.Tensor, recon: torch.Tensor) -> list[torch.Tensor]:
        return list(depth_pictures(labels, recon))

    def state_dict(self) -> dict[str, Any]:
        return {"masks_drawn": self.masks_drawn}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.masks_drawn = int(state["masks_drawn"])

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        if "val_rmse" not in metrics:
            return []
        lines = [depth_line("reconstruction", metrics), self.codebook_line(metrics)]
        if best is not None:
            lines.append(f"best reconstruction RMSE {best:.4f} m after {epochs} epochs")
        return lines


class AitMaskTokenizerTask(_TokenizerTask):
    """Reconstruction of box-cropped instance masks through the tokenizer's codes (plain MSE on ±1, official);
    best checkpoint by the mean mask IoU of the binarised reconstructions."""

    Config = AitMaskTokenizerConfig
    data_kinds = ("instances",)
    metric_names = ("val_loss", "val_recon_loss", "val_mask_iou", "val_usage", "val_perplexity")
    best_metric = ("val_mask_iou", "max")
    kind, model_name, picture, scores = "mask", "ait_insseg_vqvae", "masks", ("mask_iou",)

    def __init__(self, config: AitMaskTokenizerConfig | None = None, *, seed: int = 0, rank: int = 0) -> None:
        super().__init__(config or AitMaskTokenizerConfig(), seed=seed, rank=rank)

    def labels(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Every object's mask of the batch cropped to its box, ``(n, 1, S, S)`` in {0, 1} (S: the tokenizer's
        ``image_size``)."""
        crops = [crop_masks(t["masks"], t["boxes"], model.image_size) for t in batch[1]]
        crops = torch.cat(crops) if crops else torch.zeros(0, model.image_size, model.image_size)
        if self.config.max_masks:
            crops = crops[: self.config.max_masks]
        return crops[:, None].to(model_device(model), non_blocking=True)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        if not any(len(t["labels"]) for t in batch[1]):
            raise ValueError("task ait_mask_tokenizer: a training batch holds no object mask")
        return super().loss(model, batch)

    def reconstruction(self, output: torch.Tensor) -> torch.Tensor:
        return output.clamp(0, 1)

    def score(self, recon: torch.Tensor, labels: torch.Tensor) -> Mapping[str, torch.Tensor]:
        return {"mask_iou": mask_iou(recon >= self.config.threshold, labels >= 0.5)}

    def pictures(self, labels: torch.Tensor, recon: torch.Tensor) -> list[torch.Tensor]:
        return [labels, recon]

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        if "val_mask_iou" not in metrics:
            return []
        lines = [f"reconstruction mask IoU {metrics['val_mask_iou']:.4f}", self.codebook_line(metrics)]
        if best is not None:
            lines.append(f"best reconstruction mask IoU {best:.4f} after {epochs} epochs")
        return lines


def load_run_tokenizer(
    source: str | None, kind: str, task: str, trainer: str, key: str = "tokenizer"
) -> tuple[SoftVQVAE, Path]:
    """The ``kind`` tokenizer of a run folder (or checkpoint) of ``task: <trainer>``, frozen, for ``task: <task>``;
    errors name the config key ``task.<key>`` (a missing file, a checkpoint that is no run, another kind of
    tokenizer)."""
    from swinlab.engine.checkpoint import load_checkpoint  # the engine imports tasks: resolve it at call time
    from swinlab.models.registry import create_model

    if not source:
        raise ValueError(f"task.{key} is required: the run folder (or checkpoint.pt) of a 'task: {trainer}' run")
    path = Path(source)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"task.{key}: no tokenizer checkpoint at {path}")
    ckpt = load_checkpoint(path)
    config = ckpt.get("config") or {}
    model_cfg, data_cfg = config.get("model") or {}, config.get("data") or {}
    if "name" not in model_cfg or "model" not in ckpt:
        raise ValueError(f"task.{key}: {path} is not a swinlab run checkpoint (no model config and weights)")
    kwargs = {"image_size": data_cfg["img_size"]} if "img_size" in data_cfg else {}
    tokenizer = create_model(model_cfg["name"], **{**kwargs, **(model_cfg.get("kwargs") or {})})
    if not isinstance(tokenizer, SoftVQVAE) or tokenizer.kind != kind:
        what = f"a {tokenizer.kind} tokenizer" if isinstance(tokenizer, SoftVQVAE) else type(tokenizer).__name__
        raise TypeError(f"task.{key}: {path} holds {what}; task {task} needs a {kind} tokenizer")
    tokenizer.load_state_dict(ckpt["model"])
    return tokenizer.eval().requires_grad_(False), path


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-mask IoU of boolean masks (leading index = mask); two empty masks agree fully (IoU 1)."""
    p, t = pred.flatten(1), target.flatten(1)
    union = (p | t).sum(1)
    return torch.where(union > 0, (p & t).sum(1) / union.clamp_min(1), 1.0)


def depth_line(what: str, m: Mapping[str, float]) -> str:
    """The summary line of the validation depth metrics, e.g. ``depth RMSE 0.2860 m, AbsRel ...``."""
    return (
        f"{what} RMSE {m['val_rmse']:.4f} m, AbsRel {m['val_abs_rel']:.4f}, d1 {m['val_d1']:.4f}, "
        f"log10 {m['val_log10']:.4f}, SILog {m['val_silog']:.4f}"
    )


def depth_pictures(depth: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of ``(B, 1, H, W)`` grey pictures in [0, 1]: each map and its reconstruction divided by the map's
    largest valid depth (near = dark), invalid ground-truth pixels black in both."""
    valid = (depth > 0).to(depth.dtype)
    top = depth.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    return (depth / top).clamp(0, 1), (recon / top).clamp(0, 1) * valid


def _share_codebook(model: nn.Module) -> None:
    """Rank 0's buffers (the EMA codebook) on every rank: the run's one codebook, before it is evaluated."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
