"""A scaled FP8 tensor: 1-byte payload + one fp32 scale, the unit FP8-LM stores gradients and states in.

A plain dataclass, not a ``torch.Tensor`` subclass: nothing here needs to flow through autograd or arbitrary
torch ops as a tensor (FP8 elementwise math is mostly unimplemented anyway), and a container makes every
quantise/dequantise explicit and easy to account for. A wrapper subclass becomes worth its dispatch machinery
only where FSDP2/DTensor must see a tensor (O3 weights, later).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from swinlab.fp8.formats import FP8Format, amax, compute_scale, get_format, saturating_cast


@dataclass
class ScaledFP8:
    """``data`` (FP8 dtype) holds ``x * scale``; ``scale`` is an fp32 scalar tensor on the same device."""

    data: torch.Tensor
    scale: torch.Tensor
    fmt: FP8Format

    def __post_init__(self) -> None:
        if self.data.dtype != self.fmt.dtype:
            raise TypeError(f"payload dtype {self.data.dtype} does not match format {self.fmt.name}")
        if self.scale.dtype != torch.float32 or self.scale.numel() != 1:
            shape = tuple(self.scale.shape)
            raise TypeError(f"scale must be one fp32 value, got dtype {self.scale.dtype} shape {shape}")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def t(self) -> ScaledFP8:
        """Transposed view sharing payload and scale (a row-major payload becomes column-major)."""
        return ScaledFP8(self.data.t(), self.scale, self.fmt)

    @property
    def scale_inv(self) -> torch.Tensor:
        """The dequantisation factor (what ``torch._scaled_mm`` takes); exact for power-of-two scales."""
        return self.scale.reciprocal()

    @property
    def nbytes(self) -> int:
        """Storage of payload plus scale: ``numel`` bytes + 4."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data / scale`` computed in fp32 (the order ``_scaled_mm`` uses on CPU), then cast to ``dtype``."""
        return (self.data.float() * self.scale_inv).to(dtype)


def quantize(x: torch.Tensor, fmt: FP8Format | str, scale: torch.Tensor | float) -> ScaledFP8:
    """Saturating cast of ``x * scale`` to ``fmt`` (math in fp32); ``x`` may be any float dtype and device."""
    fmt = get_format(fmt)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(())
    data = saturating_cast(x.detach().float() * scale, fmt)
    return ScaledFP8(data, scale, fmt)


def quantize_current(x: torch.Tensor, fmt: FP8Format, previous: torch.Tensor | None = None) -> ScaledFP8:
    """Quantise ``x`` with a scale from its own amax (current scaling, margin 0: MS-AMP's rule for optimizer
    states and master weights); a zero or non-finite amax keeps ``previous`` (default 1)."""
    if previous is None:
        previous = torch.ones((), dtype=torch.float32, device=x.device)
    return quantize(x, fmt, compute_scale(amax(x), fmt, 0, previous))
