"""SimMIM pre-training as a task: masked-image modelling of a Swin V2 through the one engine (``task: simmim``).

The recipe names a plain :class:`~swinlab.models.swin.SwinTransformerV2`; :meth:`SimMIMTask.prepare_model` drops its
head and wraps it in :class:`~swinlab.pretrain.simmim.SimMIM`, so the decoder and the mask token are part of the model
the engine trains, wraps in DDP, converts to FP8 and checkpoints (keys ``encoder.*`` / ``decoder.*``, the official
layout, which a classifier then fine-tunes from with ``model.pretrained: <run folder>``). Image labels are ignored.

Masks are the task's: one :class:`~swinlab.pretrain.simmim.MaskGenerator` draw per micro-batch, from a
``torch.Generator`` seeded by (run seed, rank, masks drawn so far). Only the counter is state, and it is equal on
every rank, so the checkpoint (written by rank 0) lets every rank of a resumed run draw exactly the masks it would
have drawn. Evaluation uses fixed masks (``eval_mask_seed``): the same masks at every evaluation, so ``val_loss``
curves compare epochs and not mask draws.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from swinlab.config import Count, NonNegativeInt, Range, TaskConfig
from swinlab.models.swin import SwinTransformerV2
from swinlab.pretrain.simmim import MaskGenerator, SimMIM, upsample_mask
from swinlab.tasks.base import Batch, Logs, Task, model_device

if TYPE_CHECKING:
    from swinlab.data.build import DataBundle


@dataclass(frozen=True, kw_only=True)
class SimMIMConfig(TaskConfig):
    name: str = "simmim"
    mask_patch_size: Count = 32
    """Side in pixels of the square cells masked together (a multiple of the model's patch size; image sides must be
    multiples of it). The official recipe: 32."""
    mask_ratio: Annotated[float, Range(gt=0, lt=1)] = 0.6
    """Share of the cells masked (rounded up to whole cells)."""
    norm_target: bool = False
    """Predict each pixel normalised by the mean and variance of its neighbourhood rather than the raw pixel (on in
    the official Swin V2 recipe, off by default as the official code)."""
    norm_target_patch_size: Count = 47
    """Side of that neighbourhood (odd)."""
    encoder_stride: Count | None = None
    """The decoder's upsampling factor; ``null``: the encoder's output stride, patch size x 2^(stages - 1) (32 for
    four stages of patch 4), the only value that restores the image size."""
    recon_images: NonNegativeInt = 6
    """Validation images shown in ``recon_epoch<N>.png`` after every evaluation (rows: input, masked input,
    reconstruction, target); 0: no pictures."""
    eval_mask_seed: int = 0
    """Seed of the validation masks."""


def _stream(*words: int) -> torch.Generator:
    """A generator whose seed mixes ``words`` (no two tuples share a stream, unlike a sum or a product would)."""
    seed = np.random.SeedSequence([w % 2**64 for w in words]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(seed))


_TRAIN, _EVAL = 0, 1
"""Stream tags, so a training draw never repeats an evaluation mask."""


class SimMIMTask(Task):
    """Mean L1 error of the reconstructed masked pixels, in training and on the validation set (``val_loss``)."""

    Config = SimMIMConfig
    data_kinds = ("image",)
    metric_names = ("val_loss",)
    best_metric = ("val_loss", "min")

    def __init__(
        self,
        config: SimMIMConfig | None = None,
        *,
        seed: int = 0,
        rank: int = 0,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        self.config = config or SimMIMConfig()
        self.seed, self.rank = seed, rank
        self.mean, self.std = mean, std
        self.masks_drawn = 0
        """Training masks drawn so far (the task's checkpointed state)."""
        self._patch_size = 0
        self._maskers: dict[tuple[int, int], MaskGenerator] = {}
        self._shown: tuple[torch.Tensor, torch.Tensor] | None = None
        """Validation images and masks of the last evaluation, for its picture."""

    @classmethod
    def from_config(cls, config: SimMIMConfig, data: DataBundle) -> SimMIMTask:
        return cls(config, seed=data.seed, rank=data.rank, mean=data.mean, std=data.std)

    def prepare_model(self, model: nn.Module) -> SimMIM:
        """The recipe's Swin V2 without its head, as the encoder of a SimMIM with a fresh decoder and mask token."""
        if not isinstance(model, SwinTransformerV2):
            raise TypeError(
                f"task simmim pre-trains a SwinTransformerV2 encoder (model.name: swinv2_*), got {type(model).__name__}"
            )
        if model.num_classes:
            model.reset_classifier(0)
        patch = model.patch_size[0]
        stride = self.config.encoder_stride or patch * 2 ** (model.num_layers - 1)
        self._patch_size = patch
        return SimMIM(
            model,
            stride,
            in_chans=model.in_chans,
            patch_size=patch,
            norm_target=self.config.norm_target,
            norm_target_window=self.config.norm_target_patch_size,
        )

    def _masks(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        size = (images.shape[-2], images.shape[-1])
        if size not in self._maskers:
            if not self._patch_size:
                raise RuntimeError("SimMIMTask.prepare_model() must build the model before masks are drawn")
            c = self.config
            self._maskers[size] = MaskGenerator(size, c.mask_patch_size, self._patch_size, c.mask_ratio)
        return self._maskers[size](images.shape[0], generator=generator).to(images.device)

    # -- what a batch means ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        images = batch[0].to(model_device(model), non_blocking=True)
        mask = self._masks(images, _stream(_TRAIN, self.seed, self.rank, self.masks_drawn))
        self.masks_drawn += 1
        loss = model(images, mask)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Summed batch losses weighted by batch size: every image masks the same number of pixels, so this is the
        exact mean over all masked pixels of the set."""
        device = model_device(model)
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "count")}
        self._shown = None
        for i, batch in enumerate(loader):
            images = batch[0].to(device, non_blocking=True)
            if images.shape[0] == 0:
                continue
            mask = self._masks(images, _stream(_EVAL, self.config.eval_mask_seed, self.rank, i))
            sums["loss"] += model(images, mask).double() * images.shape[0]
            sums["count"] += images.shape[0]
            if self._shown is None:
                shown = self.config.recon_images
                self._shown = (images[:shown].cpu(), mask[:shown].cpu())
        return sums

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return {"val_loss": sums["loss"] / sums["count"]} if sums["count"] else {}

    # -- what it keeps and leaves behind ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"masks_drawn": self.masks_drawn}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.masks_drawn = int(state["masks_drawn"])

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        """``recon_epoch<N>.png`` after every evaluation."""
        if not metrics or self._shown is None or self.config.recon_images == 0:
            return
        images, mask = (t.to(model_device(model)) for t in self._shown)
        model.eval()
        with torch.no_grad():
            rows = reconstruction_rows(model, images, mask, self.mean, self.std)
        save_picture_grid(rows, run_dir / f"recon_epoch{epoch}.png")

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        target = "locally normalised pixels" if self.config.norm_target else "normalised pixels"
        lines = [f"validation masked L1 {metrics['val_loss']:.4f} ({target})"] if "val_loss" in metrics else []
        if best is not None:
            lines.append(f"best masked L1       {best:.4f} after {epochs} epochs")
        return lines


def _to_unit(x: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> torch.Tensor:
    """Normalised images back to [0, 1]; without the statistics, each image stretched to its own range."""
    if mean is None or std is None:
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
    shape = (1, -1, 1, 1)
    return (x * torch.tensor(std, device=x.device).view(shape) + torch.tensor(mean, device=x.device).view(shape)).clamp(
        0, 1
    )


def reconstruction_rows(
    model: SimMIM,
    images: torch.Tensor,
    mask: torch.Tensor,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> list[torch.Tensor]:
    """Four rows of ``(B, C, H, W)`` pictures in [0, 1]: the input, the input with its masked cells grey, the
    reconstruction (the decoder's prediction in the masked cells, the target elsewhere) and the target.

    The reconstruction is shown in the space the loss compares it in: de-normalised pixels, or, with target
    normalisation, the locally normalised target's range per image (both rows on one scale).
    """
    pixel_mask = upsample_mask(mask, model.patch_size).unsqueeze(1).to(images.dtype)
    target = model.target(images).float()
    reconstruction = model.reconstruct(images, mask).float()
    pasted = target * (1 - pixel_mask) + reconstruction * pixel_mask
    if model.norm_target:
        lo = target.amin(dim=(1, 2, 3), keepdim=True)
        span = (target.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-6)
        shown, wanted = (((t - lo) / span).clamp(0, 1) for t in (pasted, target))
    else:
        shown, wanted = _to_unit(pasted, mean, std), _to_unit(target, mean, std)
    picture = _to_unit(images.float(), mean, std)
    masked = picture * (1 - pixel_mask) + 0.5 * pixel_mask
    return [picture, masked, shown, wanted]


def save_picture_grid(rows: list[torch.Tensor], path: Path, min_side: int = 96, gap: int = 2) -> None:
    """Rows of ``(B, C, H, W)`` pictures in [0, 1] as one PNG (grey for 1 channel, else the first three as RGB),
    small images enlarged by a whole factor so that a side is at least ``min_side`` pixels."""
    b, c, h, w = rows[0].shape
    scale = max(1, -(-min_side // max(h, w)))
    channels = 1 if c < 3 else 3
    canvas = torch.ones(channels, len(rows) * (h * scale + gap) - gap, b * (w * scale + gap) - gap)
    for r, row in enumerate(rows):
        row = row[:, :channels].detach().cpu().float()
        row = row.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        for i in range(b):
            top, left = r * (h * scale + gap), i * (w * scale + gap)
            canvas[:, top : top + h * scale, left : left + w * scale] = row[i]
    pixels = (canvas * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(path)
