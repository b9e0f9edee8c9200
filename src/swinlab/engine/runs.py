"""A trained run as a model and its images: what tools that inspect runs (``swinlab erf``) load.

A *source* is an existing path (a run folder or a checkpoint file: its config's model with the trained weights, and
its validation images) or a registered model name (fresh or ``pretrained`` weights, and the embedded Fashion-MNIST
at the model's input size and channels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swinlab import data
from swinlab.config import DataConfig
from swinlab.engine.checkpoint import load_checkpoint
from swinlab.engine.trainer import build_model, checkpoint_path, config_from_checkpoint
from swinlab.models.checkpoints import load_official
from swinlab.models.registry import create_model

INPUTS = ("data", "noise")


@dataclass
class ModelSource:
    """A model to probe (in eval mode) and the data config its images come from."""

    label: str
    model: nn.Module
    data: DataConfig


def load_source(source: str, img_size: int | None = None, pretrained: str | None = None) -> ModelSource:
    """Build the model ``source`` names: an existing path is a run folder or checkpoint file (weights loaded),
    anything else a registered model name (``pretrained`` weights optional)."""
    path = Path(source)
    if path.exists():
        ckpt = load_checkpoint(checkpoint_path(path))
        cfg = config_from_checkpoint(ckpt)
        if img_size is not None:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, img_size=img_size))
        bundle = data.build(dataclasses.replace(cfg.data, val_limit=1), seed=cfg.seed)
        model = build_model(cfg, bundle, torch.device("cpu"), pretrained=None)
        state = ckpt["model"]
        if _is_pretraining_run(state, model):
            load_official(model, state)  # e.g. SimMIM: its encoder, prefix stripped, decoder dropped
        else:
            model.load_state_dict(state)
        return ModelSource(label=str(source), model=model.eval(), data=cfg.data)
    model = create_model(source, pretrained=pretrained, **({"img_size": img_size} if img_size else {}))
    size = img_size or getattr(model, "img_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = DataConfig(name="fashion_mnist_embedded", img_size=size, in_chans=getattr(model, "in_chans", 3))
    return ModelSource(label=source, model=model.eval(), data=cfg)


def _is_pretraining_run(state: dict, model: nn.Module) -> bool:
    """The run trained a wrapper around the recipe's model (keys ``encoder.*``) that the model itself lacks."""
    wrapped = any(k.startswith("encoder.") for k in state)
    return wrapped and not any(k.startswith("encoder.") for k in model.state_dict())


def probe_inputs(source: ModelSource, kind: str = "data", batch: int = 32, seed: int = 0) -> torch.Tensor:
    """``batch`` inputs for ``source``: the first validation images of its data (normalised as in training),
    or standard-normal noise of the same shape (``kind="noise"``, seeded)."""
    if kind not in INPUTS:
        raise ValueError(f"unknown probe inputs {kind!r}; choose one of {INPUTS}")
    if batch < 1:
        raise ValueError(f"the probe batch must be >= 1, got {batch}")
    cfg = dataclasses.replace(source.data, val_limit=batch, eval_batch_size=batch, augment="none")
    images, _ = next(iter(data.build(cfg, seed=seed).val_loader))
    if kind == "noise":
        return torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return images
