"""GMConv: a convolution whose kernel is multiplied by a learnable concentric Gaussian mask.

Chen et al., "GMConv: Modulating Effective Receptive Fields for Convolutional Kernels" (arXiv 2302.04544,
IEEE TNNLS). A unit's effective receptive field is roughly Gaussian while a k x k kernel's is a flat square,
so the kernel is refined by

    M(i, j) = exp(-((i - c_h)^2 / (2 sigma_h^2) + (j - c_w)^2 / (2 sigma_w^2))),   c = ((k_h - 1) / 2, (k_w - 1) / 2)

with sigma learned end to end (sigma_h = sigma_w unless ``anisotropic``). No official code exists and the
paper's finer details could not be read, so the following are this toolkit's choices, each an option:

* sigma is stored as ``log_sigma`` (positive by construction; the name lets ``no_weight_decay_keywords``
  exclude it from weight decay, and the recipe key ``optim.lr_mult: {log_sigma: k}`` give it its own learning
  rate);
* granularity ``out_channel`` (default: one sigma per output filter), ``layer`` (one sigma) or ``kernel``
  (one sigma per (output, input/groups) 2-D kernel slice, i.e. per ``weight[o, i]``);
* initial sigma = max(k_h, k_w) / 2 (per axis k_h / 2, k_w / 2 when anisotropic): the corner of a 3x3 kernel
  starts at exp(-4/9) ~ 0.64, so training starts near the plain conv it replaces;
* non-square kernels have separate centres and, by default, one sigma for both axes (``anisotropic=True``
  learns one per axis; along an axis of size 1 that sigma has no effect);
* the mask lives in kernel-index space, so dilation, stride, groups and padding keep ``nn.Conv2d`` meaning;
* 1x1 kernels get no sigma at all: they are exactly ``nn.Conv2d``;
* ``dynamic=True``: a light branch (global average pool + linear, zero-initialised) predicts a per-sample
  offset to log sigma, and the per-sample kernels run as one grouped convolution.

The mask is k_h x k_w per channel, computed once per forward and folded into the weight; :meth:`GMConv2d.fuse`
folds it for good so inference costs exactly a plain convolution.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

GRANULARITIES = ("layer", "out_channel", "kernel")


class GMConv2d(nn.Conv2d):
    """Drop-in ``nn.Conv2d`` with a Gaussian kernel mask; same arguments, same ``weight`` / ``bias`` names.

    Args (beyond ``nn.Conv2d``'s):
        sigma_init: initial sigma in kernel-index units (> 0), or an ``(h, w)`` pair when ``anisotropic``;
            ``None`` = half the kernel size (see the module docstring).
        granularity: ``"layer"``, ``"out_channel"`` (default) or ``"kernel"``.
        anisotropic: learn separate sigmas along the kernel's height and width.
        dynamic: predict a per-sample offset to log sigma from the input (global pool + linear with one output
            per sigma, so ``dynamic`` with ``granularity="kernel"`` is heavy on wide layers).

    ``mask_enabled = False`` turns the layer into its plain convolution without touching any parameter.
    A plain ``nn.Conv2d`` state dict loads into it: the sigma parameters it lacks keep their current values.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        sigma_init: float | Sequence[float] | None = None,
        granularity: str = "out_channel",
        anisotropic: bool = False,
        dynamic: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        if granularity not in GRANULARITIES:
            raise ValueError(f"unknown sigma granularity {granularity!r}; choose one of {GRANULARITIES}")
        self.granularity = granularity
        self.anisotropic = anisotropic
        self.dynamic = dynamic
        self.mask_enabled = True
        self.has_mask = max(self.kernel_size) > 1
        self.sigma_init = _sigma_init(sigma_init, self.kernel_size, anisotropic)
        if not self.has_mask:
            self.register_parameter("log_sigma", None)
            self.sigma_predictor = None
            return
        axes = 2 if anisotropic else 1
        shape = {
            "layer": (1, 1, axes),
            "out_channel": (out_channels, 1, axes),
            "kernel": (out_channels, in_channels // groups, axes),
        }[granularity]
        init = torch.tensor(self.sigma_init, device=device, dtype=dtype).log()
        self.log_sigma = nn.Parameter(init.expand(shape).clone())
        self.log_sigma.no_weight_decay = True  # honoured by swinlab.engine.param_groups, in any host model
        self.sigma_predictor = None
        if dynamic:
            self.sigma_predictor = nn.Linear(in_channels, math.prod(shape), device=device, dtype=dtype)
            nn.init.zeros_(self.sigma_predictor.weight)
            nn.init.zeros_(self.sigma_predictor.bias)

    def extra_repr(self) -> str:
        gm = f"granularity={self.granularity!r}, sigma_init={self.sigma_init}"
        if self.anisotropic:
            gm += ", anisotropic=True"
        if self.dynamic:
            gm += ", dynamic=True"
        return f"{super().extra_repr()}, {gm}"

    @property
    def sigma(self) -> torch.Tensor | None:
        """Current static sigma, shape ``(n_out or 1, n_in or 1, 1 or 2)``; ``None`` for a 1x1 kernel."""
        return None if self.log_sigma is None else self.log_sigma.exp()

    def gaussian_mask(self, log_sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The mask for ``log_sigma`` (default: the layer's), broadcastable against ``weight``: shape
        ``(..., O or 1, I or 1, k_h, k_w)`` with any leading (per-sample) dims of ``log_sigma`` kept."""
        log_sigma = self.log_sigma if log_sigma is None else log_sigma
        grid = _half_sq_offsets(*self.kernel_size, self.anisotropic, log_sigma.device, log_sigma.dtype)
        inv_var = torch.exp(-2 * log_sigma)[..., None]  # 1 / sigma^2, (..., O, I, axes, 1)
        if self.anisotropic:
            return torch.exp(-(inv_var[..., 0, :, None] * grid[0] + inv_var[..., 1, :, None] * grid[1]))
        return torch.exp(-(inv_var * grid[0]))

    def masked_weight(self) -> torch.Tensor:
        """The weight the convolution uses: ``weight * mask`` (just ``weight`` without a mask)."""
        if not (self.has_mask and self.mask_enabled):
            return self.weight
        return self.weight * self.gaussian_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic and self.has_mask and self.mask_enabled:
            return self._dynamic_forward(x)
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def _dynamic_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels ``(B, O, I, k_h, k_w)`` applied as one convolution with ``B * groups`` groups."""
        if x.ndim != 4:
            raise ValueError(f"dynamic GMConv2d expects a batched (B, C, H, W) input, got shape {tuple(x.shape)}")
        b = x.shape[0]
        offset = self.sigma_predictor(x.mean(dim=(2, 3))).view(b, *self.log_sigma.shape)
        weight = self.weight * self.gaussian_mask(self.log_sigma + offset)
        weight = weight.reshape(b * self.out_channels, *weight.shape[2:])
        bias = None if self.bias is None else self.bias.repeat(b)
        x = x.reshape(1, b * self.in_channels, *x.shape[2:])
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        out = F.conv2d(x, weight, bias, self.stride, padding, self.dilation, b * self.groups)
        return out.view(b, self.out_channels, *out.shape[2:])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        # A plain conv's weights (weight present, GMConv-only keys absent) keep this layer's sigma parameters,
        # so torchvision-layout checkpoints load strictly into GMConv models.
        if prefix + "weight" in state_dict:
            for name, value in self._gm_state().items():
                state_dict.setdefault(prefix + name, value.detach())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)

    def _gm_state(self) -> dict[str, torch.Tensor]:
        state = {} if self.log_sigma is None else {"log_sigma": self.log_sigma}
        if self.sigma_predictor is not None:
            state |= {f"sigma_predictor.{k}": v for k, v in self.sigma_predictor.state_dict().items()}
        return state

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` (same device / dtype / config) whose weight is ``weight * mask``."""
        if self.dynamic and self.has_mask:
            raise ValueError("a dynamic GMConv2d has a per-input mask and cannot be fused into a plain conv")
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        conv.weight.copy_(self.masked_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        conv.train(self.training)
        return conv

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **gm_kwargs) -> GMConv2d:
        """A GMConv2d with ``conv``'s configuration, weights, device and dtype."""
        gm = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **gm_kwargs,
        )
        with torch.no_grad():
            gm.weight.copy_(conv.weight)
            if conv.bias is not None:
                gm.bias.copy_(conv.bias)
        gm.weight.requires_grad_(conv.weight.requires_grad)
        gm.train(conv.training)
        return gm


def _half_sq_offsets(kh: int, kw: int, anisotropic: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Squared offsets from the kernel centre, halved: ``(1, k_h, k_w)`` holding ``(di^2 + dj^2) / 2``, or
    ``(2, k_h, k_w)`` holding ``di^2 / 2`` and ``dj^2 / 2`` for an anisotropic mask. Cached per kernel shape,
    device and dtype in eager mode: building them is most of the mask's cost on small layers (it runs every
    step); a compiled graph bakes them in instead (and dynamo warns about cached functions)."""
    if torch.compiler.is_compiling():
        return _offset_grid(kh, kw, anisotropic, device, dtype)
    return _cached_offset_grid(kh, kw, anisotropic, device, dtype)


def _offset_grid(kh: int, kw: int, anisotropic: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Built outside inference mode, so a grid first made under torch.inference_mode can be saved for backward.
    with torch.inference_mode(False):
        rows = (torch.arange(kh, device=device, dtype=dtype) - (kh - 1) / 2)[:, None] ** 2 / 2
        cols = (torch.arange(kw, device=device, dtype=dtype) - (kw - 1) / 2)[None, :] ** 2 / 2
        rows, cols = torch.broadcast_tensors(rows, cols)
        return torch.stack([rows, cols]) if anisotropic else (rows + cols)[None]


_cached_offset_grid = functools.cache(_offset_grid)


def _sigma_init(
    value: float | Sequence[float] | None, kernel_size: tuple[int, int], anisotropic: bool
) -> tuple[float, ...]:
    """Initial sigma per axis (one value unless anisotropic), checked positive."""
    if value is None:
        values = tuple(k / 2 for k in kernel_size) if anisotropic else (max(kernel_size) / 2,)
    elif isinstance(value, (int, float)):
        values = (float(value),) * (2 if anisotropic else 1)
    else:
        values = tuple(float(v) for v in value)
        if len(values) != (2 if anisotropic else 1):
            raise ValueError(f"sigma_init {value!r}: give one number, or an (h, w) pair with anisotropic=True")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"sigma_init must be positive and finite, got {value!r}")
    return values


def conv2d_factory(kind: str = "plain", **gm_kwargs) -> Callable[..., nn.Conv2d]:
    """A constructor with ``nn.Conv2d``'s signature: ``"plain"`` builds ``nn.Conv2d``; ``"gmconv"`` builds
    :class:`GMConv2d` for kernels larger than 1x1 and ``nn.Conv2d`` for 1x1 (a mask would be identically 1)."""
    if kind == "plain":
        if gm_kwargs:
            raise ValueError(f"GMConv options {sorted(gm_kwargs)} given with conv='plain'")
        return nn.Conv2d
    if kind != "gmconv":
        raise ValueError(f"unknown conv kind {kind!r}; choose 'plain' or 'gmconv'")

    def make(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], *args, **kwargs) -> nn.Conv2d:
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if max(ks) == 1:
            return nn.Conv2d(in_channels, out_channels, kernel_size, *args, **kwargs)
        return GMConv2d(in_channels, out_channels, kernel_size, *args, **kwargs, **gm_kwargs)

    return make


# -- model surgery --


@dataclass
class ConversionReport:
    """What :func:`convert_to_gmconv` did: qualified names converted, and skipped with the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} conv(s): {', '.join(self.converted) or '-'}"]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def convert_to_gmconv(
    model: nn.Module,
    min_kernel: int = 3,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    **gm_kwargs,
) -> ConversionReport:
    """Replace, in place, every plain ``nn.Conv2d`` of ``model`` (any module, third-party included) whose
    largest kernel side is ``>= min_kernel`` by a :class:`GMConv2d` with the same weights, device and dtype.

    ``include`` / ``exclude`` are ``fnmatch`` patterns on qualified names (``"layer*.conv2"``); with
    ``include`` only matching convs are candidates. A pattern that matches no conv warns with the list of the
    model's conv names (a typo would otherwise silently convert nothing). ``gm_kwargs`` go to GMConv2d.
    Subclasses of ``nn.Conv2d`` (including GMConv2d itself) are left alone.
    """
    if min_kernel < 1:
        raise ValueError(f"min_kernel must be >= 1, got {min_kernel}")
    includes, excludes = _patterns(include), _patterns(exclude)
    # remove_duplicate=False: a conv shared under two names is swapped under both, for the same GMConv2d.
    convs = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.Conv2d) and n]
    names = [name for name, _ in convs]
    for pattern in (*includes, *excludes):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            warnings.warn(
                f"convert_to_gmconv: pattern {pattern!r} matches no conv; available: {', '.join(names) or 'none'}",
                stacklevel=2,
            )
    report = ConversionReport()
    swapped: dict[int, GMConv2d] = {}
    for name, conv in convs:  # convs are leaves and the list is taken before any swap, so order is free
        if type(conv) is not nn.Conv2d:
            reason = "already a GMConv2d" if isinstance(conv, GMConv2d) else f"subclass {type(conv).__name__}"
        elif includes and not any(fnmatch.fnmatchcase(name, p) for p in includes):
            reason = "not included"
        elif any(fnmatch.fnmatchcase(name, p) for p in excludes):
            reason = "excluded"
        elif max(conv.kernel_size) < min_kernel:
            reason = f"kernel {tuple(conv.kernel_size)} < min_kernel {min_kernel}"
        else:
            if id(conv) not in swapped:
                swapped[id(conv)] = GMConv2d.from_conv(conv, **gm_kwargs)
            _set_submodule(model, name, swapped[id(conv)])
            report.converted.append(name)
            continue
        report.skipped[name] = reason
    return report


def fuse_gmconv(model: nn.Module) -> list[str]:
    """Replace, in place, every static :class:`GMConv2d` below ``model`` by its fused plain conv (a layer
    shared under several names by one conv); returns the fused names."""
    fused: dict[int, nn.Conv2d] = {}
    names = []
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if name and isinstance(m, GMConv2d) and not (m.dynamic and m.has_mask):
            if id(m) not in fused:
                fused[id(m)] = m.fuse()
            _set_submodule(model, name, fused[id(m)])
            names.append(name)
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)

