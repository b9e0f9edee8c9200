"""Weights for Video Swin: official 3D checkpoints (mmaction recognizers or bare backbones) and 2D ImageNet
Swin V1 checkpoints inflated to 3D the official way (``SwinTransformer3D.inflate_weights``).

Inflation makes a temporally constant clip behave like the image: the patch kernel is repeated over its ``Pt``
time steps and divided by ``Pt``, and every temporal offset of the 3D bias table gets the 2D (spatial) bias.
One deliberate difference: a 2D table of another window size is resized to the 3D model's spatial window per
head (bicubic, as official) for any H/W window, not only square ones.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.models.checkpoints import (
    DERIVED_SUFFIXES,
    LoadReport,
    adapt_state_dict,
    read_checkpoint,
    unwrap_state_dict,
)

_TABLE = "relative_position_bias_table"
_HEAD = "cls_head."
_BACKBONE = "backbone."


def _backbone(model: nn.Module) -> nn.Module:
    """The ``SwinTransformer3D`` inside a classifier, or the model itself."""
    return getattr(model, "backbone", model)


def _state(path_or_state_dict: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    raw = path_or_state_dict if isinstance(path_or_state_dict, Mapping) else read_checkpoint(path_or_state_dict)
    return unwrap_state_dict(raw)


def _to_model_names(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename recognizer keys (``backbone.*`` / ``cls_head.*``) or bare backbone keys to ``model``'s layout;
    returns the renamed dict and the keys that have no place in the model (a head given to a bare backbone)."""
    is_classifier = _backbone(model) is not model
    recognizer = any(k.startswith(_BACKBONE) for k in state)
    out, unplaced = {}, []
    for name, value in state.items():
        if is_classifier and not recognizer:
            name = _BACKBONE + name
        elif not is_classifier and recognizer:
            if not name.startswith(_BACKBONE):
                unplaced.append(name)
                continue
            name = name[len(_BACKBONE) :]
        out[name] = value
    return out, unplaced


def load_official_video(
    model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any], *, strict: bool = False
) -> LoadReport:
    """Load an official Video Swin checkpoint (file or dict; bare, under ``state_dict`` / ``model``, with or
    without the recognizer's ``backbone.`` / ``cls_head.`` prefixes) into a ``SwinTransformer3D`` or a
    ``VideoSwinClassifier``.

    ``relative_position_index`` buffers are dropped (rebuilt here). A head with another class count is
    re-initialised (normal, std ``init_std``) with a warning. Bias tables must match the model's window (a
    3D table cannot be resized unambiguously): build the model with the checkpoint's ``window_size``. With
    ``strict=True`` any missing or unexpected key raises ``ValueError``.
    """
    state, unplaced = _to_model_names(_state(path_or_state_dict), model)
    target = model.state_dict()
    reinitialised = [k for k, v in state.items() if k.startswith(_HEAD) and k in target and v.shape != target[k].shape]
    tables = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k.endswith(_TABLE) and k in target and v.shape != target[k].shape
    ]
    if tables:
        raise ValueError(
            "relative_position_bias_table shapes differ (the checkpoint was trained with another window_size; "
            "build the model with that window):\n  " + "\n  ".join(tables)
        )
    state = {k: v for k, v in state.items() if k not in reinitialised}
    state, report = adapt_state_dict(state, model)
    report.unexpected += unplaced
    report.reinitialised = reinitialised
    report.missing = [k for k in report.missing if k not in reinitialised]
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"strict load failed: missing {report.missing}, unexpected {report.unexpected}")
    model.load_state_dict(state, strict=False)
    if reinitialised:
        warnings.warn(
            f"checkpoint head does not match num_classes={getattr(model, 'num_classes', '?')}; "
            f"re-initialised {reinitialised}",
            stacklevel=2,
        )
        model.get_submodule("cls_head").init_weights()
    return report


@dataclass
class InflateReport:
    """What :func:`inflate_from_2d` did with each 2D key (names as in the 2D checkpoint / the backbone).

    ``inflated``: patch kernel and bias tables turned 3D; ``copied``: loaded unchanged; ``skipped``: key ->
    reason (derived buffers, the 2D head, unmatched shapes); ``missing``: backbone keys left at their init.
    """

    inflated: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


def inflate_patch_kernel(weight: torch.Tensor, frames: int) -> torch.Tensor:
    """2D patch kernel ``(C, C_in, kh, kw)`` -> 3D ``(C, C_in, frames, kh, kw)``: repeated over time and divided
    by ``frames``, so a clip of identical frames gives the 2D response."""
    return weight.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames


def inflate_bias_table(table: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """2D bias table ``(S*S, heads)`` -> 3D ``((2Wd-1)(2Wh-1)(2Ww-1), heads)`` for ``window`` (Wd, Wh, Ww).

    Each head's S x S offset map is bicubically resized to (2Wh-1) x (2Ww-1) if needed, then the whole table is
    tiled over the 2Wd-1 temporal offsets (rows are temporal-major), so every temporal offset gets the spatial
    bias.
    """
    rows, heads = table.shape
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"a 2D bias table has a square number of rows, got {rows}")
    spatial = (2 * window[1] - 1, 2 * window[2] - 1)
    if (side, side) != spatial:
        grid = table.T.reshape(1, heads, side, side).float()
        grid = F.interpolate(grid, size=spatial, mode="bicubic", align_corners=False)
        table = grid.reshape(heads, -1).T.to(table.dtype)
    return table.repeat(2 * window[0] - 1, 1)


def _check_swin_2d(state: Mapping[str, torch.Tensor], source: object) -> None:
    """Refuse what is not a 2D Swin backbone before anything is loaded (otherwise every key would be skipped and
    the model silently left at its random init)."""
    where = source if isinstance(source, (str, Path)) else "the state dict"
    kernel = state.get("patch_embed.proj.weight")
    blocks = any(k.startswith("layers.") and ".blocks." in k for k in state)
    if kernel is None or not blocks:
        keys = ", ".join(list(state)[:4])
        raise ValueError(
            f"{where} is not a 2D Swin checkpoint in the official layout (needs patch_embed.proj.weight and "
            f"layers.*.blocks.* keys; starts with {keys})"
        )
    if kernel.ndim == 5:
        raise ValueError(
            f"{where} already holds 3D (Video Swin) weights: load it with load_official_video "
            f"(pretrained2d=False), not by inflation"
        )
    if kernel.ndim != 4:
        raise ValueError(f"{where}: patch_embed.proj.weight has shape {tuple(kernel.shape)}, not a 2D conv kernel")


def inflate_from_2d(model3d: nn.Module, state_dict_2d: str | Path | Mapping[str, Any]) -> InflateReport:
    """Initialise a Video Swin backbone (or the backbone of a classifier) from a 2D Swin V1 checkpoint (file or
    dict; official ones keep the weights under ``model``) as the official ``inflate_weights`` does.

    Derived buffers (``relative_position_index``, ``attn_mask``) and keys the 3D backbone lacks (the 2D
    ``head``) are skipped; a bias table with another head count is skipped with a warning; everything else of
    matching shape is copied. The classifier head is left untouched. A checkpoint that is not a 2D Swin (no
    patch embedding or blocks in the official layout, or already 3D) raises ``ValueError``.
    """
    backbone = _backbone(model3d)
    window, frames = tuple(backbone.window_size), backbone.patch_size[0]
    target = backbone.state_dict()
    state = _state(state_dict_2d)
    _check_swin_2d(state, state_dict_2d)
    report = InflateReport()
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        want = target.get(name)
        if name.endswith(DERIVED_SUFFIXES):
            report.skipped[name] = "derived buffer (rebuilt by the 3D model)"
            continue
        if want is None:
            report.skipped[name] = "not in the 3D backbone"
            continue
        kind = report.copied
        if name == "patch_embed.proj.weight" and value.ndim == 4:
            value, kind = inflate_patch_kernel(value, frames), report.inflated
        elif name.endswith(_TABLE) and value.shape != want.shape:
            if value.shape[1] != want.shape[1]:
                warnings.warn(f"{name}: {value.shape[1]} heads in 2D vs {want.shape[1]} in 3D; skipped", stacklevel=2)
                report.skipped[name] = f"head count {value.shape[1]} vs {want.shape[1]}"
                continue
            value, kind = inflate_bias_table(value, window), report.inflated
        if value.shape != want.shape:
            report.skipped[name] = f"shape {tuple(value.shape)} vs 3D {tuple(want.shape)}"
            continue
        kind.append(name)
        out[name] = value
    backbone.load_state_dict(out, strict=False)
    report.missing = [k for k in target if k not in out]
    return report
