"""Model registry: every variant of every family is a builder function registered by name.

``create_model(name, pretrained=None, **overrides)`` is the one entry point the CLI, the engine and users
share; builders stay five to eight lines because all the architecture lives in the model classes.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_META: dict[str, dict[str, Any]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, meta: dict[str, Any] | None = None):
    """Register a builder under its function name; use as ``@register_model`` or
    ``@register_model(meta={...})``.

    ``meta`` holds what is known about the variant (parameters, FLOPs, reported accuracy, source).
    """

    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = builder
        _META[name] = dict(meta or {})
        return builder

    return add(fn) if fn is not None else add


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern`` (``fnmatch``), sorted."""
    return sorted(n for n in _BUILDERS if fnmatch.fnmatchcase(n, pattern))


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see swinlab.list_models()"
        raise ValueError(f"unknown model {name!r}{hint}")
    return _BUILDERS[name]


def model_meta(name: str) -> dict[str, Any]:
    """Metadata registered with a variant (a copy)."""
    _builder(name)
    return dict(_META[name])


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; ``overrides`` replace constructor arguments (``num_classes``, ``img_size``,
    ...).

    ``pretrained`` is a checkpoint path: a swinlab ``.safetensors`` file (see
    :func:`swinlab.models.checkpoints.save_checkpoint_weights`) or an official / torch checkpoint, loaded with
    :func:`swinlab.models.checkpoints.load_official` (drops derived buffers, resizes position tables,
    re-initialises a head of another class count with a warning), or by the model's own ``load_pretrained``
    when its family defines one. The
    name and overrides are kept on ``model.model_spec`` so the weights can be saved with them.
    """
    model = _builder(name)(**overrides)
    model.model_spec = {"name": name, "kwargs": dict(overrides)}
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: nn.Module, pretrained: str | Path | Any) -> Any:
    """Load a checkpoint into a built model as ``create_model(pretrained=...)`` does, and return what the loader
    reports (a :class:`~swinlab.models.checkpoints.LoadReport` for Swin): for callers that show the report."""
    # A family with its own checkpoint layout (e.g. Video Swin's backbone.* / cls_head.*) says how to load it.
    loader = getattr(model, "load_pretrained", None)
    if loader is None:
        from swinlab.models.checkpoints import load_official  # imports safetensors only when needed

        loader = functools.partial(load_official, model)
    return loader(pretrained)
