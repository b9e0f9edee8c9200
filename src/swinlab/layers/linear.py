"""A drop-in ``nn.Linear`` whose fp32 CPU GEMMs run through oneDNN where that is faster than MKL.

PyTorch's fp32 ``F.linear`` on CPU calls MKL's sgemm, which is Intel's library: on Intel CPUs it is the faster one
(an AMX Xeon, 2 threads, SwinV2-T's shapes: MKL takes 0.96x oneDNN's time forward, 0.89x for the input gradient,
0.62x for the weight gradient), so there every GEMM stays on MKL. On AMD CPUs MKL takes slower code paths. On an
AVX-512 one (EPYC Zen 5, 2 threads) MKL runs a 2048x2048x2048 GEMM at 143-181 GFLOP/s, while oneDNN's JIT kernels
(the ones inductor emits for CPU linears, ``torch.ops.mkldnn._linear_pointwise``) use AVX-512 and reach 345-405
GFLOP/s; SwinV2-T's own linear shapes gain 1.3-2.4x forward, input- and weight-gradient alike. On an AVX2 CPU (Zen
2) the peaks are close (MKL 115-121, oneDNN 129-147 GFLOP/s): oneDNN still wins the forward and input-gradient GEMMs
of SwinV2-T's shapes (1.1-1.4x, one 0.8x) but loses the weight gradient (0.66-0.98x), so there the weight gradient
stays on MKL. Zen 4 (family 25) runs AVX-512 on 256-bit units, so oneDNN's AVX-512 kernels have no wider datapath
than MKL's AVX2 ones: the weight gradient, whose oneDNN form needs a transposed copy of an activation, is faster on
MKL there too (SwinV2-T and SimMIM training steps 1.05x with it on MKL, 2 threads); oneDNN takes it only on AMD
family 26 (Zen 5) and later (``benchmarks/RESULTS.md``). Results stay fp32 (relative error vs float64 5.7e-7, MKL
2.5e-7); they differ from MKL's only in summation order. The op is internal to torch; a build without it runs
everything through ``F.linear``.

Everything outside that case (Intel CPUs, CUDA, other dtypes, autocast, ``torch.compile``, inputs oneDNN does not
take, a build without oneDNN) goes to ``F.linear`` unchanged. ``SWINLAB_ONEDNN_LINEAR`` in the environment chooses:
``auto`` (the default: as above), ``1`` (every GEMM through oneDNN) or ``0`` (none), e.g. to compare on a new
machine (``benchmarks/bench_swin.py --linear-backends``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ONEDNN_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
"""Whether this torch build has oneDNN's linear op."""


_CHOICE = os.environ.get("SWINLAB_ONEDNN_LINEAR", "auto").strip().lower()
if _CHOICE not in ("auto", "0", "1"):
    raise ValueError(f"SWINLAB_ONEDNN_LINEAR must be auto, 1 or 0, got {_CHOICE!r}")


def _cpuinfo_field(name: str) -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    return None


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ... (``/proc/cpuinfo``'s ``vendor_id`` on Linux, else the platform's)."""
    return _cpuinfo_field("vendor_id") or platform.processor()


def cpu_family() -> int:
    """``/proc/cpuinfo``'s ``cpu family`` (AMD: 23 Zen 1-2, 25 Zen 3-4, 26 Zen 5); 0 where unknown."""
    family = _cpuinfo_field("cpu family")
    return int(family) if family and family.isdigit() else 0


def onednn_policy(choice: str, vendor: str, capability: str, family: int = 0) -> tuple[bool, bool]:
    """``(forward and input gradient on oneDNN, weight gradient too)`` for ``SWINLAB_ONEDNN_LINEAR=choice`` on a CPU
    of this vendor, ``torch.backends.cpu.get_cpu_capability()`` and family: measured, MKL wins everything on Intel;
    on AMD oneDNN wins the forward and input gradient, and the weight gradient only with full-width AVX-512 (Zen 5,
    family 26 on)."""
    if choice != "auto":
        return choice == "1", choice == "1"
    if vendor == "GenuineIntel":
        return False, False
    if vendor == "AuthenticAMD":
        return True, capability.startswith("AVX512") and family >= 26
    return True, capability.startswith("AVX512")


_POLICY = onednn_policy(_CHOICE, cpu_vendor(), torch.backends.cpu.get_cpu_capability(), cpu_family())
ONEDNN_LINEAR = ONEDNN_AVAILABLE and _POLICY[0]
"""Whether fp32 CPU linears run their forward and input gradient through oneDNN (decided once at import)."""
ONEDNN_WEIGHT_GRAD = ONEDNN_AVAILABLE and _POLICY[1]
"""Whether their weight gradient does too."""


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: str | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2D ``x`` (strided operands are fine), optionally followed by GELU (``gelu`` =
    its ``approximate``: ``"none"`` or ``"tanh"``) in the same kernel."""
    if gelu is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], gelu)


def _matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``; oneDNN is fastest with the operand of more rows in the weight slot, so the product is
    transposed when that is ``a``."""
    if a.shape[0] > b.shape[0]:
        return _onednn(b, a, None).t()
    return _onednn(a, b, None)


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """``x W^T + b`` for 2D ``x``, through oneDNN or ``F.linear``."""
    return _onednn(x, weight, bias) if onednn else F.linear(x, weight, bias)


def linear_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    needs: tuple[bool, bool, bool],
    onednn: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dW, db) = (dy W, dy^T x, sum dy)`` of a 2D linear, each only where ``needs`` says; on the oneDNN
    path the weight gradient stays on MKL unless :data:`ONEDNN_WEIGHT_GRAD`."""
    dx = (_onednn(dy, weight.t(), None) if onednn else dy.mm(weight)) if needs[0] else None
    dw = None
    if needs[1]:
        dw = _matmul_nt(dy.t(), x.t()) if onednn and ONEDNN_WEIGHT_GRAD else dy.t().mm(x)
    return dx, dw, dy.sum(0) if needs[2] else None


class _OneDNNLinear(torch.autograd.Function):
    """``y = x W^T + b`` on 2D ``x``; backward ``dx = dy W``, ``dW = dy^T x``, ``db = sum dy``; the GEMMs through
    oneDNN (``dW`` on MKL unless :data:`ONEDNN_WEIGHT_GRAD`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        return linear_grads(dy, x, weight, (needs[0], needs[1], ctx.has_bias and needs[2]), onednn=True)


def _takes_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        ONEDNN_LINEAR
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.dim() >= 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _on_rows(fn, x: torch.Tensor, weight: torch.Tensor, *args) -> torch.Tensor:
    """``fn`` (a 2D linear) applied to the rows of an N-D ``x``.

    The result is reshaped with ``_unsafe_view`` (as ``torch.matmul`` does), not ``view``: autograd then does not
    treat it as a view of the 2D product, so an in-place op on it (``qkv += bias``) is recorded as a plain op
    instead of a ``CopySlices`` whose backward clones the whole gradient twice (5 % of a SwinV2-T training step).
    """
    out = fn(x.reshape(-1, x.shape[-1]), weight, *args)
    return torch.ops.aten._unsafe_view(out, (*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with fp32 CPU GEMMs (forward and backward) through oneDNN; see the module docstring."""
    if not _takes_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    return _on_rows(_OneDNNLinear.apply if _records_grad(x, weight, bias) else _onednn, x, weight, bias)


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none"
) -> torch.Tensor:
    """``GELU(x W^T + b)``. Without autograd it costs no pass of its own: on the oneDNN path the GELU runs in the
    GEMM's epilogue, elsewhere it overwrites the linear's output (the widest activation of a transformer block,
    whose fresh pages are costly to touch twice)."""
    if _records_grad(x, weight, bias):
        return F.gelu(linear(x, weight, bias), approximate=approximate)
    if _takes_onednn(x, weight, bias):
        return _on_rows(_onednn, x, weight, bias, approximate)
    return torch.ops.aten.gelu_(F.linear(x, weight, bias), approximate=approximate)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and init) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
