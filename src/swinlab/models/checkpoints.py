"""Loading checkpoints: the official repositories' key layout (with window / resolution adaptation) and
swinlab's own weight files (safetensors + JSON metadata).

The conversion is a pure function, :func:`adapt_state_dict`, so it can be tested without touching a model's
weights; :func:`load_official` wraps it with file reading and ``load_state_dict``.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from swinlab.models.hf_keys import hf_to_official, is_hf_swinv2

DERIVED_SUFFIXES = ("relative_position_index", "relative_coords_table", "attn_mask")
"""Official buffers that depend on window and input size; swinlab rebuilds them, so they are dropped."""

_METADATA_KEY = "swinlab"


@dataclass
class LoadReport:
    """What happened to each key. ``resized``: adapted by interpolation; ``reinitialised``: left at a fresh
    init."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    """Checkpoint keys discarded on purpose (checkpoint names), e.g. SimMIM's ``encoder.mask_token`` and
    ``decoder.*`` when a classifier is fine-tuned from a pre-training checkpoint."""
    stripped_prefix: str = ""
    """A prefix removed from every kept checkpoint key (``"encoder."`` for a SimMIM checkpoint)."""


def _is_safetensors(path: Path) -> bool:
    # A safetensors file starts with a little-endian u64 header length followed by the JSON header's '{'.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_checkpoint(path: str | Path) -> Any:
    """Read a torch checkpoint (``weights_only``) or a safetensors file, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if _is_safetensors(path):
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise several types for truncated or foreign files
        raise ValueError(f"could not read checkpoint {path}: {type(err).__name__}: {err}") from err


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or one nested under ``model`` / ``state_dict`` / ``weights`` (AiT's tokenizer
    training scripts); strip a DDP ``module.``
    prefix; convert transformers' Swinv2 layouts to the official one (:mod:`swinlab.models.hf_keys`)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "weights"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise TypeError(f"checkpoint is not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"checkpoint is not a state dict: entries {bad[:5]} are not name -> tensor")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return hf_to_official(obj) if is_hf_swinv2(obj) else dict(obj)


_SIMMIM_PARTS = ("encoder.", "decoder.")
_PRETRAIN_ONLY = ("mask_token",)
"""Encoder parameters that only pre-training uses: dropped when the target model does not have them."""


def strip_pretraining_parts(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A SimMIM checkpoint (``encoder.*``, ``decoder.*``) loaded into a bare encoder, e.g. a classifier to
    fine-tune: keep the encoder with its prefix stripped, drop the decoder and the mask token (unless the model
    has one), as the official ``utils_simmim.load_pretrained`` does. Anything else passes unchanged.

    Applied only when the checkpoint is laid out as SimMIM and the model has no ``encoder.`` keys of its own,
    so models with real ``encoder`` / ``decoder`` submodules (a SimMIM, AiT's VQ-VAE) are never rewritten.
    """
    report = LoadReport()
    target = model.state_dict()
    simmim_layout = any(k.startswith("encoder.") for k in state_dict) and all(
        k.startswith(_SIMMIM_PARTS) for k in state_dict
    )
    if not simmim_layout or any(k.startswith("encoder.") for k in target):
        return dict(state_dict), report
    report.stripped_prefix = "encoder."
    out = {}
    for name, value in state_dict.items():
        inner = name[len("encoder.") :]
        if name.startswith("decoder.") or (inner in _PRETRAIN_ONLY and inner not in target):
            report.dropped.append(name)
        else:
            out[inner] = value
    return out, report


def _resize_bias_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """V1 table ``(S*S, heads)`` -> ``(rows, heads)`` by bicubic resizing of each head's square offset map."""
    src, dst = math.isqrt(table.shape[0]), math.isqrt(rows)
    grid = table.T.reshape(1, -1, src, src).float()
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.reshape(-1, rows).T.to(table.dtype)


def _resize_pos_embed(pos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``absolute_pos_embed`` ``(1, S*S, C)`` -> the target's (square) token count, bicubically."""
    src, dst = math.isqrt(pos.shape[1]), math.isqrt(target.shape[1])
    grid = pos.reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(target.shape).to(pos.dtype)


def _adaptable(name: str, src: torch.Tensor, dst: torch.Tensor) -> bool:
    if src.ndim != dst.ndim:
        return False
    if name.endswith("relative_position_bias_table"):
        return src.shape[1] == dst.shape[1] and all(math.isqrt(n) ** 2 == n for n in (src.shape[0], dst.shape[0]))
    if name.endswith("absolute_pos_embed"):
        return src.shape[2] == dst.shape[2] and all(math.isqrt(n) ** 2 == n for n in (src.shape[1], dst.shape[1]))
    return False


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Map an official-layout state dict onto ``model``'s parameters (pure: ``model`` is only read).

    Drops derived buffers, strips a SimMIM checkpoint down to its encoder when ``model`` is a bare encoder
    (:func:`strip_pretraining_parts`), resizes V1 bias tables and absolute position embeddings, skips a head of
    another class count (reported as ``reinitialised``); raises ``ValueError`` listing every other shape that
    cannot be adapted.
    """
    check = getattr(model, "check_state_dict", None)
    if check is not None:  # a family that can name a foreign checkpoint (AiT's tokenizers) does so before key checks
        check(state_dict)
    target = model.state_dict()
    state_dict, report = strip_pretraining_parts(state_dict, model)
    out: dict[str, torch.Tensor] = {}
    unadaptable = []
    for name, value in state_dict.items():
        if name.endswith(DERIVED_SUFFIXES):
            continue
        if name not in target:
            report.unexpected.append(name)
            continue
        want = target[name]
        if value.shape == want.shape:
            out[name] = value
        elif name.startswith("head."):
            report.reinitialised.append(name)
        elif _adaptable(name, value, want):
            resize = _resize_bias_table if name.endswith("relative_position_bias_table") else None
            out[name] = resize(value, want.shape[0]) if resize else _resize_pos_embed(value, want)
            report.resized.append(name)
        else:
            unadaptable.append(f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(want.shape)}")
    if unadaptable:
        raise ValueError("checkpoint shapes cannot be adapted to the model:\n  " + "\n  ".join(unadaptable))
    report.missing = [k for k in target if k not in out and k not in report.reinitialised]
    return out, report


def load_official(
    model: nn.Module, path_or_state_dict: str | Path | Mapping[str, Any], *, strict: bool = False
) -> LoadReport:
    """Load an official Swin checkpoint (file or dict, bare or under ``model`` / ``state_dict``) into
    ``model``.

    A head with a different class count is re-initialised (truncated normal, std 0.02) with a warning. A SimMIM
    checkpoint loads into a ``SimMIM`` as is, or into a bare encoder / classifier without its decoder and mask
    token (``report.dropped``). With ``strict=True`` any missing or unexpected key raises ``ValueError``; a
    checkpoint of which no key matches the model always does (a load that silently loads nothing).
    """
    raw = path_or_state_dict if isinstance(path_or_state_dict, Mapping) else read_checkpoint(path_or_state_dict)
    state, report = adapt_state_dict(unwrap_state_dict(raw), model)
    if not state:
        theirs = sorted(report.unexpected)[:3]
        ours = sorted(model.state_dict())[:3]
        raise ValueError(
            f"no checkpoint key matches the model ({len(report.unexpected)} unexpected keys such as {theirs}; "
            f"the model's keys look like {ours})"
        )
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"strict load failed: missing {report.missing}, unexpected {report.unexpected}")
    model.load_state_dict(state, strict=False)
    if report.reinitialised:
        warnings.warn(
            f"checkpoint head does not match num_classes={getattr(model, 'num_classes', '?')}; "
            f"re-initialised {report.reinitialised}",
            stacklevel=2,
        )
        head = model.get_submodule("head")
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    return report


def save_checkpoint_weights(model: nn.Module, path: str | Path) -> None:
    """Write the weights as safetensors with the model name and constructor overrides as JSON metadata."""
    spec = getattr(model, "model_spec", {"name": type(model).__name__, "kwargs": {}})
    metadata = {_METADATA_KEY: json.dumps(spec, default=repr)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def read_weights_metadata(path: str | Path) -> dict[str, Any]:
    """The ``{"name": ..., "kwargs": ...}`` entry of a swinlab weight file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(_METADATA_KEY, "{}"))


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a swinlab weight file strictly (every key and shape must match); returns its metadata."""
    state = read_checkpoint(path)
    _, report = adapt_state_dict(state, model)
    if report.reinitialised:
        raise ValueError(f"{path}: head shape does not match the model ({report.reinitialised})")
    model.load_state_dict(state, strict=True)
    return read_weights_metadata(path)
