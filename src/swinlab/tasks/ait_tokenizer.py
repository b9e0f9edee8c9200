"""Training AiT's depth tokenizer as a task (``task: ait_tokenizer``): a :class:`~swinlab.ait.SoftVQVAE` of kind
``depth`` learns to reconstruct depth maps (metres, 0 = invalid) through the one engine.

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

DDP and the EMA codebook (its statistics are buffers, updated inside the forward): the engine's DDP broadcasts
rank 0's buffers at every forward, so every rank quantises with rank 0's codebook and the codebook is the moving
average of rank 0's share of each batch; the other ranks' local updates are overwritten at their next forward.
The encoder and decoder gradients are averaged over all ranks as usual. So that evaluation and the checkpoint see
one codebook, :meth:`AitTokenizerTask.evaluate` first broadcasts rank 0's codebook to every rank. (The official
script turns the broadcast off, so each GPU there keeps its own drifting codebook and only rank 0's is validated
and saved; all-reducing the EMA statistics instead would need a hook inside the codebook's update.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import torch.distributed as dist
from torch import nn

from swinlab.ait import SoftVQVAE, mask_patches
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


def _code_key(k: int) -> str:
    return f"code_{k:05d}"


class AitTokenizerTask(Task):
    """Reconstruction of depth maps through the tokenizer's codes; best checkpoint by reconstruction RMSE."""

    Config = AitTokenizerConfig
    data_kinds = ("depth",)
    metric_names = ("val_loss", "val_recon_loss", *(f"val_{m}" for m in DEPTH_METRICS), "val_usage", "val_perplexity")
    best_metric = ("val_rmse", "min")

    def __init__(self, config: AitTokenizerConfig | None = None, *, seed: int = 0, rank: int = 0) -> None:
        self.config = config or AitTokenizerConfig()
        if self.config.eval_crop not in EVAL_CROPS:
            raise ValueError(f"task.eval_crop must be null or 'eigen', got {self.config.eval_crop!r}")
        if self.config.min_depth >= self.config.max_depth:
            raise ValueError(f"task.min_depth {self.config.min_depth} must be below task.max_depth")
        self.seed, self.rank = seed, rank
        self.masks_drawn = 0
        """Training masks drawn so far (the task's checkpointed state)."""
        self._shown: torch.Tensor | None = None
        """Validation maps of the last evaluation, for its picture."""

    @classmethod
    def from_config(cls, config: AitTokenizerConfig, data: DataBundle) -> AitTokenizerTask:
        return cls(config, seed=data.seed, rank=data.rank)

    def prepare_model(self, model: nn.Module) -> SoftVQVAE:
        if not isinstance(model, SoftVQVAE) or model.kind != "depth":
            what = f"a {model.kind} tokenizer" if isinstance(model, SoftVQVAE) else type(model).__name__
            raise TypeError(f"task ait_tokenizer trains a depth SoftVQVAE (model.name: ait_depth_vqvae), got {what}")
        return model

    # -- what a batch means ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        depth = batch[1].to(model_device(model), non_blocking=True)
        x = depth
        if self.config.mask_ratio > 0:
            generator = _stream(self.seed, self.rank, self.masks_drawn)
            x, _ = mask_patches(depth, self.config.mask_ratio, self.config.mask_patch_size, generator)
            self.masks_drawn += 1
        out = model(x, depth)
        return out["loss"], {k: torch.as_tensor(out[k], dtype=torch.float32).detach() for k in TRAIN_LOGS}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Per-image sums of the depth metrics and losses, and the set's code histogram (one key per code)."""
        _share_codebook(model)
        c = self.config
        device = model_device(model)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums = {k: zero.clone() for k in ("count", "loss", "recon_loss", *DEPTH_METRICS)}
        histogram = torch.zeros(model.num_codes, dtype=torch.float64, device=device)
        self._shown = None
        for batch in loader:
            depth = batch[1].to(device, non_blocking=True)
            n = depth.shape[0]
            if n == 0:
                continue
            out = model(depth)
            recon = out["output"].clamp_min(c.min_depth)
            scores = depth_metrics(recon, depth, min_depth=c.min_depth, max_depth=c.max_depth, crop=c.eval_crop)
            for name, values in scores.items():
                sums[name] += values.double().sum()
            sums["loss"] += out["loss"].double() * n
            sums["recon_loss"] += out["recon_loss"].double() * n
            sums["count"] += n
            histogram.index_add_(0, out["ids"].flatten(), torch.ones_like(out["ids"].flatten(), dtype=torch.float64))
            if self._shown is None and c.recon_images:
                self._shown = torch.stack([depth[: c.recon_images], recon[: c.recon_images]]).cpu()
        sums.update({_code_key(k): histogram[k] for k in range(model.num_codes)})
        return sums

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        n = sums["count"]
        if not n:
            return {}
        metrics = {f"val_{k}": sums[k] / n for k in ("loss", "recon_loss", *DEPTH_METRICS)}
        counts = torch.tensor([v for k, v in sorted(sums.items()) if k.startswith("code_")], dtype=torch.float64)
        probs = counts / counts.sum()
        metrics["val_usage"] = float((counts > 0).double().mean())
        metrics["val_perplexity"] = float(torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
        return metrics

    # -- what it keeps and leaves behind ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks_drawn": self.masks_drawn}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.masks_drawn = int(state["masks_drawn"])

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        """``depth_epoch<N>.png`` after every evaluation: ground truth above, reconstruction below."""
        if not metrics or self._shown is None:
            return
        save_picture_grid(list(depth_pictures(*self._shown)), run_dir / f"depth_epoch{epoch}.png")

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        if "val_rmse" not in metrics:
            return []
        m = metrics
        lines = [
            depth_line("reconstruction", m),
            f"codebook: {m['val_usage']:.0%} of codes used on the validation set, perplexity {m['val_perplexity']:.1f}",
        ]
        if best is not None:
            lines.append(f"best reconstruction RMSE {best:.4f} m after {epochs} epochs")
        return lines


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
