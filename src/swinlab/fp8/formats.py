"""FP8 formats, saturating casts and per-tensor scaling meta (FP8-LM / MS-AMP numerics).

Formats are torch's own dtypes: E4M3 (``float8_e4m3fn``, max 448, no infinities) for weights and activations,
E5M2 (``float8_e5m2``, max 57344, has infinities) for output gradients.

What torch 2.13 does on overflow (measured, CPU): fp32 -> ``float8_e4m3fn`` saturates (anything >= 448, +Inf
included, becomes 448; NaN stays NaN), while fp32 -> ``float8_e5m2`` does not (70000 -> Inf; values that round
to <= 57344 stay finite). Both behaviours hide or create problems, so :func:`saturating_cast` clamps to the
format's range first (uniform saturation for both formats), and overflow detection looks at the amax of the
*source* tensor before any cast (:meth:`ScalingMeta.observe` flags a non-finite source).

Scales follow MS-AMP: a power of two, ``scale = 2**(floor(log2(fmax / amax)) - margin)``, so the scaled amax
lands in ``(fmax / 2**(margin+1), fmax / 2**margin]`` and scaling (and unscaling) is exact in fp32. The stored
payload is ``x * scale``; dequantisation multiplies by ``1 / scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FP8Format:
    """One FP8 encoding: its torch dtype, largest finite magnitude and explicit mantissa bits."""

    name: str
    dtype: torch.dtype
    max: float
    mantissa_bits: int

    @property
    def tiny(self) -> float:
        """Smallest positive subnormal; a scaled magnitude below half of it becomes 0."""
        return torch.finfo(self.dtype).tiny * 2.0**-self.mantissa_bits


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 3)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2)
# Not FP8, but scaled the same way: MS-AMP keeps O2's master weights and second moments as FP16 + per-tensor scale,
# so the power-of-two scale spends FP16's 5 exponent bits on the tensor's actual range.
FP16 = FP8Format("fp16", torch.float16, 65504.0, 10)
FORMATS = {fmt.name: fmt for fmt in (E4M3, E5M2)}


SCALED_DTYPES = {fmt.dtype: fmt for fmt in (E4M3, E5M2, FP16)}


def storage_format(dtype: torch.dtype) -> FP8Format | None:
    """The scaled format a tensor stored in ``dtype`` uses, or None for fp32/bf16 (their range needs no scale)."""
    return SCALED_DTYPES.get(dtype)


def get_format(fmt: FP8Format | str) -> FP8Format:
    """Accept a format or its name (``"e4m3"`` / ``"e5m2"``)."""
    if isinstance(fmt, FP8Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r} (choose one of {', '.join(FORMATS)})")
    return FORMATS[fmt]


def saturating_cast(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Cast to ``fmt`` clamping to ``[-max, max]`` first (Inf -> +-max, NaN stays NaN) for both formats."""
    return x.clamp(-fmt.max, fmt.max).to(fmt.dtype)


def amax(x: torch.Tensor) -> torch.Tensor:
    """Largest magnitude as an fp32 scalar tensor (NaN if ``x`` holds a NaN, 0 for an empty tensor)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # torch has no FP8 max kernel. FP8 bytes are sign-magnitude: with the sign bit cleared their integer order
        # is the order of the magnitudes (Inf and NaN patterns sort last), so the max byte is the amax, exactly.
        top = (x.detach().reshape(-1).view(torch.uint8) & 0x7F).amax()
        return top.view(x.dtype).float()
    return x.detach().abs().amax().float()


def compute_scale(amax: torch.Tensor, fmt: FP8Format, margin: int, previous: torch.Tensor) -> torch.Tensor:
    """Power-of-two scale with ``amax * scale <= fmt.max / 2**margin``; keeps ``previous`` for 0/non-finite amax.

    Works on tensors (no host sync), so it can run every step on any device.
    """
    amax = amax.float()
    usable = torch.isfinite(amax) & (amax > 0)
    safe = torch.where(usable, amax, torch.ones_like(amax))
    # log2 of the ratio computed as a difference so a subnormal amax cannot overflow it; clamp keeps 2**k finite.
    exponent = torch.floor(math.log2(fmt.max) - torch.log2(safe)) - margin
    scale = torch.exp2(exponent.clamp(-126.0, 126.0))
    # fp32 rounding of log2 can land one exponent too high; amax * 2**k is exact, so this check is exact.
    scale = torch.where(safe * scale > fmt.max * 2.0**-margin, scale * 0.5, scale)
    return torch.where(usable, scale, previous.to(scale.dtype))


SCALING_POLICIES = ("delayed", "current")


class ScalingMeta(nn.Module):
    """Per-tensor scaling state for one role (activation, weight, gradient) of one layer.

    Buffers (saved in state dicts): ``scale`` (fp32 scalar), ``amax_history`` (fp32 ``[history_len]``, newest
    first) and ``steps`` (how many amaxes were recorded). Sticky flags (not saved) the training step reads and
    clears, all decided from the source amax before the cast: ``found_nonfinite`` (Inf/NaN in the source),
    ``found_saturation`` (a stale delayed scale pushed the amax past the format's max: values were clipped) and
    ``found_underflow`` (a nonzero tensor whose scaled amax is below half the smallest subnormal: all zeros).

    * ``current`` scaling: each cast uses a scale from its own amax (exact range, one extra reduction).
    * ``delayed`` scaling: each cast uses the scale derived from the max over the previous ``history_len``
      amaxes, then records its own amax; the very first cast (empty history) falls back to current scaling.
      Values beyond the range of a stale scale saturate (never become Inf).

    A non-finite source amax sets ``found_nonfinite``, is not recorded, and resets the history, so the next
    cast re-derives its scale from its own data (MS-AMP keeps the previous scale in the same situation).
    """

    def __init__(self, fmt: FP8Format | str, *, history_len: int = 16, margin: int = 0, policy: str = "delayed"):
        super().__init__()
        if policy not in SCALING_POLICIES:
            raise ValueError(f"unknown scaling policy {policy!r} (choose one of {', '.join(SCALING_POLICIES)})")
        if history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {history_len}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.fmt = get_format(fmt)
        self.margin = margin
        self.policy = policy
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("amax_history", torch.zeros(history_len, dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        for flag in ("found_nonfinite", "found_saturation", "found_underflow"):
            self.register_buffer(flag, torch.zeros((), dtype=torch.bool), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, policy={self.policy}, history_len={self.amax_history.numel()}, margin={self.margin}"

    def next_scale(self, source_amax: torch.Tensor) -> torch.Tensor:
        """The scale the next cast of a tensor with ``source_amax`` uses under this meta's policy."""
        current = compute_scale(source_amax, self.fmt, self.margin, self.scale)
        if self.policy == "current":
            return current
        return torch.where(self.steps > 0, self.scale, current)

    @torch.no_grad()
    def record(self, source_amax: torch.Tensor) -> None:
        """Push ``source_amax`` into the history and refresh ``scale`` from the history's max."""
        finite = torch.isfinite(source_amax)
        self.found_nonfinite |= ~finite
        rolled = torch.roll(self.amax_history, 1)
        rolled[0] = torch.where(finite, source_amax, torch.zeros_like(source_amax))
        # A non-finite amax wipes the history: the old window says nothing trustworthy about the next tensor.
        self.amax_history.copy_(torch.where(finite, rolled, torch.zeros_like(rolled)))
        self.steps.copy_(torch.where(finite, self.steps + 1, torch.zeros_like(self.steps)))
        self.scale.copy_(compute_scale(self.amax_history.max(), self.fmt, self.margin, self.scale))

    def observe(
        self, x: torch.Tensor, *, frozen: bool = False, source_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, amax)`` to cast ``x`` with under this meta's policy; records the amax (once per cast).

        ``frozen`` (evaluation): current scaling from ``x`` alone and no history update, so inference neither
        saturates on a stale scale nor changes the training state; a non-finite source is still flagged.
        ``source_scale``: ``x`` is itself a scaled payload holding ``values * source_scale`` (an FP16 master
        weight); amax and scale then refer to the values.
        """
        source_amax = amax(x) if source_scale is None else amax(x) / source_scale
        if frozen:
            scale = compute_scale(source_amax, self.fmt, self.margin, self.scale)
            self.found_nonfinite |= ~torch.isfinite(source_amax)
        else:
            scale = self.next_scale(source_amax)
            self.record(source_amax)
        scaled_amax = source_amax * scale
        self.found_saturation |= scaled_amax > self.fmt.max
        self.found_underflow |= (source_amax > 0) & (scaled_amax < self.fmt.tiny / 2)
        return scale, source_amax

    def clear_flags(self) -> None:
        for flag in (self.found_nonfinite, self.found_saturation, self.found_underflow):
            flag.zero_()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A checkpoint without FP8 meta (e.g. from an ``nn.Linear`` model) loads: the meta starts fresh."""
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        own = {prefix + name for name in ("scale", "amax_history", "steps")}
        new_missing = missing_keys[before:]
        if set(new_missing) == own:
            del missing_keys[before:]
