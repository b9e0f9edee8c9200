"""FP8 GEMMs: a checked ``torch._scaled_mm`` wrapper and ``FP8Linear`` (FP8-LM O1 compute).

Forward: E4M3 activations x E4M3 weights. Backward: the output gradient is cast to E5M2 and both the input
gradient (E5M2 x E4M3 weight) and the weight gradient (E5M2^T x E4M3 input) are FP8 GEMMs with fp32
accumulation. The weight gradient is re-quantised to E4M3 with a per-tensor scale and leaves the layer as a
:class:`ScaledFP8` (see :class:`FP8Linear` for where it is stored).

CUDA (Hopper) requires the first operand row-major, the second column-major, the inner and output dims multiples of
16 and not both operands E5M2. :func:`scaled_mm` lays the operands out by those rules on every device (zero-padding
odd dims) so CPU tests cannot hide GPU failures. On a GPU the GEMM is ``torch._scaled_mm``; on CPU it is
:func:`dequantized_mm`, the same product as an fp32 GEMM of the dequantised operands, because torch's CPU
``_scaled_mm`` can fall to oneDNN's reference kernel (measured 2.1 s against 2.2 ms for that fp32 GEMM at
256x512x384 on an AMX Xeon; on AMD guests it ran at dequantise-then-GEMM speed).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.fp8.formats import E4M3, E5M2, FP8Format, ScalingMeta, storage_format
from swinlab.fp8.tensor import ScaledFP8, quantize, quantize_current

ALIGN = 16
MIN_CUDA_CAPABILITY = (8, 9)
"""FP8 tensor cores arrived with Ada (sm_89) and Hopper (sm_90); older GPUs have no FP8 ``_scaled_mm``."""


def require_fp8_gemm(device: torch.device | str) -> None:
    """Refuse, before any training, a GPU that cannot run FP8 GEMMs (CPU emulates ``_scaled_mm``: accepted).

    Without this, an A100 or V100 fails deep inside cuBLAS on the first forward pass.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CUDA_CAPABILITY:
        raise ValueError(
            f"FP8 GEMMs need a GPU of compute capability {'.'.join(map(str, MIN_CUDA_CAPABILITY))} or newer "
            f"(Ada, Hopper, Blackwell); {torch.cuda.get_device_name(device)} ({device}) is "
            f"{capability[0]}.{capability[1]}: train it with precision bf16 instead"
        )


def _round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def _padded_row_major(data: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Row-major copy of a 2-D FP8 payload zero-padded to ``rows x cols`` (byte 0 is +0.0 in both formats)."""
    data = data.contiguous()
    if data.shape == (rows, cols):
        return data
    # F.pad has no FP8 kernel; padding the raw bytes is exact.
    padded = F.pad(data.view(torch.uint8), (0, cols - data.shape[1], 0, rows - data.shape[0]))
    return padded.view(data.dtype)


def scaled_mm(a: ScaledFP8, b: ScaledFP8, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``a.dequantize() @ b.dequantize()`` as one FP8 GEMM; ``a`` is ``(M, K)``, ``b`` is ``(K, N)``, any layout.

    Lays ``a`` out row-major and ``b`` column-major, zero-pads K and N to multiples of 16 (exact: padded products
    are 0) and slices the result back, so the call is valid under CUDA's rules as well as on CPU.
    """
    if a.data.dim() != 2 or b.data.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"scaled_mm needs (M, K) x (K, N) operands, got {tuple(a.shape)} x {tuple(b.shape)}")
    if a.fmt == E5M2 and b.fmt == E5M2:
        raise ValueError("scaled_mm: both operands are e5m2, which CUDA's FP8 GEMM does not support")
    m, k = a.shape
    n = b.shape[1]
    k_pad, n_pad = _round_up(k), _round_up(n)
    mat_a = _padded_row_major(a.data, m, k_pad)
    mat_b = _padded_row_major(b.data.t(), n_pad, k_pad).t()  # column-major (K, N)
    gemm = dequantized_mm if mat_a.device.type == "cpu" else torch._scaled_mm
    out = gemm(mat_a, mat_b, scale_a=a.scale_inv, scale_b=b.scale_inv, out_dtype=out_dtype)
    return out[:, :n] if n_pad != n else out


def dequantized_mm(
    mat_a: torch.Tensor,
    mat_b: torch.Tensor,
    *,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``torch._scaled_mm``'s product (``(mat_a * scale_a) @ (mat_b * scale_b)``, fp32 accumulation) as an fp32 GEMM:
    FP8 values widen to fp32 exactly and swinlab's scales are powers of two, so only the summation order (the fp32
    GEMM kernel's) can differ from another implementation's."""
    return ((mat_a.float() * scale_a) @ (mat_b.float() * scale_b)).to(out_dtype)


def _cast(
    meta: ScalingMeta, x: torch.Tensor, frozen: bool = False, source_scale: torch.Tensor | None = None
) -> tuple[ScaledFP8, torch.Tensor]:
    """Quantise ``x`` with ``meta``; also return whether its source was finite (a bool tensor, no sync).

    ``source_scale``: ``x`` is a scaled payload (``values * source_scale``, e.g. an FP16 master weight); it is
    re-scaled straight to FP8 (both scales are powers of two, so no rounding is added).
    """
    scale, source_amax = meta.observe(x, frozen=frozen, source_scale=source_scale)
    if source_scale is None:
        return quantize(x, meta.fmt, scale), torch.isfinite(source_amax)
    return ScaledFP8(quantize(x, meta.fmt, scale / source_scale).data, scale, meta.fmt), torch.isfinite(source_amax)


def _poison(result: torch.Tensor, *finite: torch.Tensor) -> torch.Tensor:
    """NaN-fill ``result`` if a source was non-finite: saturating casts must not launder Inf/NaN into numbers."""
    ok = torch.stack(finite).all()
    return torch.where(ok, result, torch.full_like(result, float("nan")))


class _FP8LinearFunction(torch.autograd.Function):
    """Autograd for :class:`FP8Linear`; the layer is passed in for its scaling metas and weight-grad slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: FP8Linear):
        q_x, x_finite = _cast(layer.input_meta, x, frozen=not layer.training)
        q_w, w_finite = layer._quantize_weight(weight)
        out = _poison(scaled_mm(q_x, q_w.t()), x_finite, w_finite)
        if bias is not None:
            out = out + bias.float()
        # Only FP8 copies are kept for backward (1 byte/element each) plus their scales.
        ctx.save_for_backward(q_x.data, q_x.scale, q_w.data, q_w.scale, x_finite, w_finite)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        # A scaled FP16/FP8 master holds its gradient in FP32 (``weight.grad_dtype``, set by the FP8 optimizer).
        grad_w_dtype = getattr(weight, "grad_dtype", None) or weight.dtype
        ctx.dtypes = (x.dtype, grad_w_dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x_data, x_scale, w_data, w_scale, x_finite, w_finite = ctx.saved_tensors
        layer: FP8Linear = ctx.layer
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        q_g, g_finite = _cast(layer.grad_output_meta, grad_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _poison(scaled_mm(q_g, ScaledFP8(w_data, w_scale, E4M3)), g_finite, w_finite).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _poison(scaled_mm(q_g.t(), ScaledFP8(x_data, x_scale, E4M3)), g_finite, x_finite)
            grad_w = layer._store_weight_grad(grad_w, w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.float().sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 (E4M3 forward, E5M2 output gradients) with per-tensor scales.

    State dict: ``weight``/``bias`` exactly as ``nn.Linear`` plus the scaling metas' buffers
    (``input_meta.*``, ``weight_meta.*``, ``grad_output_meta.*``, ``grad_weight_meta.*``) so delayed-scaling
    histories survive a resume; a plain ``nn.Linear`` state dict loads too (metas start fresh). When an FP8
    optimizer keeps the weight as a scaled FP16/FP8 master (:attr:`master_scale`), ``weight`` is saved as FP32
    values (exact) plus ``weight_scale``, which restores the payload bit for bit.

    Weight gradient (``grad_mode``):
      * ``"fp8"`` (O1 design): the gradient is stored as a :class:`ScaledFP8` (E4M3 + fp32 scale, 1 byte/element)
        in ``self.weight.fp8_grad``; autograd gets no weight gradient, so ``weight.grad`` stays ``None``.
        Successive backwards accumulate (dequantise, add in fp32, re-quantise). Clear with :meth:`zero_fp8_grad`.
      * ``"dequantized"`` (compatibility with stock optimizers): the same FP8-quantised gradient is handed to
        autograd dequantised, so ``weight.grad`` holds exactly the values an FP8 optimizer would read.

    ``grad_format`` is the output gradients' format: E5M2 (FP8-LM / MS-AMP, range first) or E4M3 (precision
    first, as torchao's row-wise recipes). E5M2's round trip alone costs ~5.3% relative L2 on Gaussian data (E4M3:
    ~2.7%), which bounds the input/weight-gradient accuracy.

    ``scaling`` is the activations' and output gradients' policy: ``"delayed"`` (FP8-LM / MS-AMP and Transformer
    Engine's DelayedScaling: the max of the last ``history_len`` amaxes, values past a stale scale saturate) or
    ``"current"`` (torchao's dynamic and Transformer Engine's current scaling: each cast from its own amax).
    Weights and weight gradients always use current scaling. In eval mode every cast uses current scaling and the
    histories are left untouched. Dims that are not multiples of 16 are zero-padded in every GEMM (with a warning here).
    """

    GRAD_MODES = ("fp8", "dequantized")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        history_len: int = 16,
        margin: int = 0,
        grad_mode: str = "fp8",
        grad_format: FP8Format | str = E5M2,
        scaling: str = "delayed",
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if grad_mode not in self.GRAD_MODES:
            raise ValueError(f"unknown grad_mode {grad_mode!r} (choose one of {', '.join(self.GRAD_MODES)})")
        self.grad_mode = grad_mode
        self.weight.fp8_weight = True
        self.input_meta = ScalingMeta(E4M3, history_len=history_len, margin=margin, policy=scaling)
        self.weight_meta = ScalingMeta(E4M3, history_len=1, margin=margin, policy="current")
        self.grad_output_meta = ScalingMeta(grad_format, history_len=history_len, margin=margin, policy=scaling)
        self.grad_weight_meta = ScalingMeta(E4M3, history_len=1, margin=margin, policy="current")
        if self.weight.device.type != "meta":
            for meta in self.metas():
                meta.to(self.weight.device)
        if in_features % ALIGN or out_features % ALIGN:
            warnings.warn(
                f"FP8Linear({in_features}, {out_features}): dims not multiples of {ALIGN} are zero-padded in every "
                "FP8 GEMM (an extra copy per call); prefer aligned dims or keep this layer in high precision",
                stacklevel=2,
            )

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameter objects (optimizers holding them stay valid)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs)
        layer.weight = linear.weight
        layer.weight.fp8_weight = True
        layer.bias = linear.bias
        for meta in layer.metas():
            meta.to(linear.weight.device)
        layer.train(linear.training)
        return layer

    def metas(self) -> tuple[ScalingMeta, ...]:
        return (self.input_meta, self.weight_meta, self.grad_output_meta, self.grad_weight_meta)

    def found_nonfinite(self) -> torch.Tensor:
        """True if any cast since the last :meth:`clear_flags` saw Inf/NaN in its source (bool tensor, no sync)."""
        flags = torch.stack([meta.found_nonfinite for meta in self.metas()])
        return flags.any()

    def clear_flags(self) -> None:
        for meta in self.metas():
            meta.clear_flags()

    @property
    def master_scale(self) -> torch.Tensor | None:
        """Scale of the weight when an FP8 optimizer stores it as a scaled low-precision master (FP16/FP8 payload
        ``values * master_scale``, see :mod:`swinlab.fp8.optim`); None while it holds plain values."""
        return getattr(self.weight, "master_scale", None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A scaled master is saved as its values (exact: the scale is a power of two), so the checkpoint loads
        into ``nn.Linear`` too, plus ``weight_scale``, which restores the payload bit for bit."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        scale = self.master_scale
        if scale is not None:
            fmt = storage_format(self.weight.dtype)
            destination[prefix + "weight"] = ScaledFP8(self.weight.detach(), scale.detach(), fmt).dequantize()
            destination[prefix + "weight_scale"] = scale.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Values (any float dtype) are re-quantised into a scaled master with the saved ``weight_scale`` (or a
        fresh current scale when the file has none, e.g. an ``nn.Linear`` checkpoint)."""
        key = prefix + "weight"
        saved_scale = state_dict.pop(prefix + "weight_scale", None)
        scale = self.master_scale
        if scale is not None and key in state_dict:
            fmt = storage_format(self.weight.dtype)
            values = state_dict[key].to(scale.device)
            if saved_scale is None:
                q = quantize_current(values, fmt, scale)
            else:
                q = quantize(values, fmt, saved_scale.to(scale.device))
            state_dict[key] = q.data
            scale.copy_(q.scale)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def zero_fp8_grad(self) -> None:
        self.weight.fp8_grad = None

    def _quantize_weight(self, weight: torch.Tensor) -> tuple[ScaledFP8, torch.Tensor]:
        """The E4M3 weight this call's GEMMs use and whether its source was finite (FP8 O3 all-gathers it)."""
        return _cast(self.weight_meta, weight, frozen=not self.training, source_scale=self.master_scale)

    def _store_weight_grad(self, grad_w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """Quantise the fp32 weight gradient to E4M3; keep it (``"fp8"``) or return it dequantised."""
        previous = getattr(self.weight, "fp8_grad", None) if self.grad_mode == "fp8" else None
        if previous is not None:
            grad_w = grad_w + previous.dequantize()
        q_grad, finite = _cast(self.grad_weight_meta, grad_w)
        if self.grad_mode == "dequantized":
            return _poison(q_grad.dequantize(dtype), finite)
        # A non-finite source poisons the scale (the payload saturated silently): the gradient dequantises to NaN
        # everywhere, so an optimizer or norm that reads it cannot take it for a number.
        nan = torch.full_like(q_grad.scale, float("nan"))
        self.weight.fp8_grad = ScaledFP8(q_grad.data, torch.where(finite, q_grad.scale, nan), q_grad.fmt)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear expects last dim {self.in_features}, got input shape {tuple(x.shape)}")
        out = _FP8LinearFunction.apply(x.reshape(-1, self.in_features), self.weight, self.bias, self)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grad_mode={self.grad_mode}"
