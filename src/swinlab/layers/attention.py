"""Window attention: V2 scaled cosine attention with continuous position bias, and V1 dot-product attention
with a learned bias table (used by Video Swin). Both run through ``F.scaled_dot_product_attention`` on windows
laid out ``(B, num_windows, N, C)``; geometry-dependent parts (masks, indices) come from
:mod:`swinlab.layers.windows`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.layers.bias_attention import chunked_bias_attention, worth_chunking
from swinlab.layers.linear import Linear
from swinlab.layers.position import (
    continuous_position_bias,
    cpb_mlp,
    gather_relative_bias,
    log_spaced_coords,
    relative_bias_table_size,
    relative_position_index,
)
from swinlab.layers.windows import WindowGeometry, window_mask

LOGIT_SCALE_MAX = float(torch.log(torch.tensor(1.0 / 0.01)))
"""Ceiling of the V2 logit scale, ln(100) rounded to float32 exactly like the official constant."""


def _bias_needs_grad(bias: torch.Tensor) -> bool:
    return bias.requires_grad and torch.is_grad_enabled()


NORM_EPS = 1e-12
"""Floor of the q/k norms in the cosine attention, as in ``F.normalize``."""


def _cosine_multiplier(qk: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For stacked raw queries and keys ``qk`` ``(..., 2, h, d)`` and the per-head logit scale ``s`` ``(h, 1)``:
    the factors ``(s, 1)`` ``(2, h, 1)``, the norms ``(..., 2, h, 1)`` and the multiplier ``factor / |x|`` in
    ``qk``'s dtype (autocast computes the norm in float32), so that ``cos(q, k) * s = (q m_q) . (k m_k)``."""
    factor = torch.stack([scale, torch.ones_like(scale)])
    norm = torch.linalg.vector_norm(qk, dim=-1, keepdim=True)
    return factor, norm, (factor / norm.clamp_min(NORM_EPS)).to(qk.dtype)


class _CosineQKV(torch.autograd.Function):
    """``q s / |q|``, ``k / |k|`` and ``v`` as ``(B, nW, h, N, d)`` tensors from one projection output ``(B, nW,
    N, 3, h, d)``, with a hand-written backward.

    The scaled queries and keys are written into one contiguous ``(2, B, nW, h, N, d)`` block (the pass that scales
    them also transposes them), so the logits' matmuls and their backward take them without layout copies. The
    backward writes the three gradients straight into one tensor in the projection's layout, with ``dx = m g - y (y
    . g) m / f^2`` (``y = m x`` the output, ``m = f / |x|``, ``f`` = s or 1; the second term vanishes where the norm
    is clamped) and ``ds = sum (y . g) / s``. Autograd's version of the same few ops allocates five or six tensors
    the size of q and k (norm and division backward, stack, split and layout copies), which on the largest stage
    costs more than the arithmetic.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, scale: torch.Tensor):
        qk = qkv[..., :2, :, :]
        factor, norm, mult = _cosine_multiplier(qk, scale)
        to_heads = (3, 0, 1, 4, 2, 5)  # (B, nW, N, 2, h, .) -> (2, B, nW, h, N, .)
        y = qk.new_empty([qk.shape[i] for i in to_heads])
        torch.mul(qk.permute(to_heads), mult.permute(to_heads), out=y)
        ctx.save_for_backward(
            y, mult.permute(to_heads).contiguous(), factor, (norm > NORM_EPS).permute(to_heads).contiguous()
        )
        return y[0], y[1], qkv[..., 2, :, :].transpose(2, 3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        y, mult, factor, unclamped = ctx.saved_tensors
        b, nw, h, n, d = y.shape[1:]
        grad = y.new_empty(b, nw, n, 3, h, d)
        grad[..., 2, :, :].copy_(dv.transpose(2, 3))
        factor = factor.view(2, 1, 1, h, 1, 1)
        dscale = None
        for i, g in enumerate((dq, dk)):
            dot = torch.linalg.vecdot(g, y[i]).unsqueeze(-1)
            dx = g * mult[i]
            dx.addcmul_(y[i], dot * mult[i] / factor[i].square() * unclamped[i], value=-1)
            grad[..., i, :, :].copy_(dx.transpose(2, 3))
            if i == 0 and ctx.needs_input_grad[1]:
                dscale = (dot / factor[0]).sum((0, 1, 3)).view(h, 1)
        return grad, dscale


def cosine_qkv(qkv: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled-cosine attention inputs from a projection output ``(B, nW, N, 3, h, d)`` and the per-head logit
    scale ``(h, 1)``: ``q s / |q|``, ``k / |k|``, ``v``, each ``(B, nW, h, N, d)``, so that ``q k^T`` are the
    V2 logits. Without autograd the queries and keys are scaled in place."""
    if torch.is_grad_enabled():
        return _CosineQKV.apply(qkv, scale)
    qk = qkv[..., :2, :, :]
    qk.mul_(_cosine_multiplier(qk, scale)[2])
    q, k, v = qkv.unbind(-3)
    return q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)


def windowed_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    dropout_p: float = 0.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over ``(B, nW, h, N, d)`` inputs with an additive ``bias`` of shape ``(h, N, N)`` (same for
    every window) or ``(nW, h, N, N)`` (per window), plus an optional constant window ``mask`` ``(nW, N, N)``, no
    extra scaling. Returns the heads merged, ``(B, nW, N, h * d)``, ready for the output projection.

    Without a gradient for the bias (inference, frozen bias) the fused CPU/CUDA kernels run on 4D views of
    the inputs with windows folded into the batch (5D inputs or 2-3D masks fall back to the unfused path,
    ~3x slower on CPU), so the inputs are never copied into another layout. A bias that needs a gradient
    (training: the CPB MLP or the bias table learns) rules the fused CPU kernel out, and SDPA's unfused
    fallback adds several masking passes over the logits, so the plain formula is used instead (~1.5x faster
    forward + backward on CPU), in cache-sized chunks where the logits are large
    (:mod:`~swinlab.layers.bias_attention`).
    """
    b, nw, h, n, d = q.shape
    if _bias_needs_grad(bias) and dropout_p == 0.0 and worth_chunking(q):
        return chunked_bias_attention(q, k, v, bias.to(q.dtype), None if mask is None else mask.to(q.dtype))
    if mask is not None:
        bias = bias[None] + mask[:, None]
    bias = bias.to(q.dtype)
    if _bias_needs_grad(bias):
        logits = q @ k.transpose(-2, -1)
        logits += bias  # in place: a matmul's backward does not need its output
        attn = torch.softmax(logits, dim=-1)
        out = F.dropout(attn, dropout_p) @ v
        return out.transpose(2, 3).reshape(b, nw, n, h * d)
    # A per-window bias is repeated for every image (the kernel broadcasts size-1 dims only): B copies of
    # (nW, h, N, N) cost less than moving q, k, v into a layout where windows fold into heads.
    mask = bias[None] if bias.dim() == 3 else bias.expand(b, *bias.shape).flatten(0, 1)
    out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask, dropout_p, scale=1.0)
    return out.view(b, nw, h, n, d).transpose(2, 3).reshape(b, nw, n, h * d)


class _WindowAttention(nn.Module):
    """Shared projection / head handling; subclasses define the logits (``_heads``) and the position bias."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the channel count {dim}")
        self.dim, self.num_heads = dim, num_heads
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._bias_cache: dict = {}

    def _qkv_bias(self) -> torch.Tensor | None:
        """A bias added to the ``qkv`` projection's output when it is not part of the module itself."""
        return None

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projection output ``(B, nW, N, 3, h, d)`` -> attention inputs q, k, v ``(B, nW, h, N, d)`` (views
        where possible) whose ``q k^T`` are the logits without the position bias."""
        raise NotImplementedError

    def position_bias(self, window: tuple[int, ...]) -> torch.Tensor:
        """``(heads, N, N)`` additive bias for a window of this shape."""
        raise NotImplementedError

    def _cache_key(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self.parameters())

    def train(self, mode: bool = True) -> _WindowAttention:
        # Every switch of mode starts a fresh cache. The version counters above miss some in-place updates
        # (fused optimizers and writes through ``.data`` do not bump them), so a cache built in one evaluation
        # must not outlive the training steps that follow it.
        self._bias_cache.clear()
        return super().train(mode)

    def attention_bias(
        self, geom: WindowGeometry, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position bias ``(h, N, N)`` and window mask ``(nW, N, N)`` (or None), as :func:`windowed_sdpa` takes them.

        In inference (eval mode, no autograd) their sum, in ``dtype``, is cached per geometry and returned as the
        bias (mask None). The cache is dropped on every
        ``train()`` / ``eval()`` call and when a parameter's version counter moves (``load_state_dict``, in-place
        ops); code that changes weights in eval mode without either (fused optimizer steps, ``.data`` writes)
        must call ``model.eval()`` again.
        """
        cacheable = not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())
        if cacheable:
            key = (geom, device, dtype, self._cache_key())
            cached = self._bias_cache.get(key)
            if cached is not None:
                return cached, None
        bias = self.position_bias(geom.window)
        mask = window_mask(geom, device)
        if not cacheable:
            return bias, mask
        if mask is not None:
            bias = bias[None] + mask[:, None]
        bias = bias.to(dtype)
        if len(self._bias_cache) >= 4:
            self._bias_cache.clear()
        self._bias_cache[key] = bias
        return bias, None

    def forward(self, x: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
        """``x``: windows ``(B, nW, N, C)`` produced for ``geom``; returns the same shape."""
        b, nw, n, _ = x.shape
        # Through the module (not F.linear on its weight) so a swapped projection (e.g. FP8Linear) takes effect.
        qkv = self.qkv(x)
        bias = self._qkv_bias()
        if bias is not None:
            qkv += bias  # in place: a projection's backward never needs its own output
        q, k, v = self._heads(qkv.view(b, nw, n, 3, self.num_heads, -1))
        bias, mask = self.attention_bias(geom, x.device, q.dtype)
        out = windowed_sdpa(q, k, v, bias, self.attn_drop if self.training else 0.0, mask)
        return self.proj_drop(self.proj(out))


class WindowAttentionV2(_WindowAttention):
    """Swin V2 attention: ``cos(q, k) * exp(min(logit_scale, ln 100)) + 16 sigmoid(CPB)``.

    Parameters and names follow the official module (``qkv`` without bias, separate ``q_bias`` / ``v_bias``,
    the key bias fixed at zero, ``logit_scale`` (h, 1, 1), ``cpb_mlp``). ``pretrained_window`` is the window
    the weights were trained with (0 = the current effective window), which sets the CPB coordinate
    normalisation.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window: tuple[int, ...] = (0, 0),
    ) -> None:
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        self.pretrained_window = tuple(pretrained_window)
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))
        self.cpb_mlp = cpb_mlp(num_heads, rank=len(self.pretrained_window))
        self.qkv = Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None

    def _qkv_bias(self) -> torch.Tensor | None:
        if self.q_bias is None:
            return None
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # cos(q, k) * s = (q * s / |q|) . (k / |k|), so SDPA runs with scale=1 and the bias as an additive mask
        return cosine_qkv(qkv, self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp().view(-1, 1))

    def position_bias(self, window: tuple[int, ...]) -> torch.Tensor:
        return continuous_position_bias(self.cpb_mlp, window, self._pretrained_for(window))

    def _pretrained_for(self, window: tuple[int, ...]) -> tuple[int, ...]:
        return self.pretrained_window if any(self.pretrained_window) else (0,) * len(window)

    def coords_table(self, window: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The CPB input for ``window`` (the official ``relative_coords_table`` without its leading 1)."""
        return log_spaced_coords(tuple(window), self._pretrained_for(window), device)


class WindowAttentionV1(_WindowAttention):
    """Swin V1 / Video Swin attention: ``q k^T * d^-0.5 + table[index]`` with a learned per-offset bias table.

    The table is sized for ``window`` (any rank). A smaller effective window (an axis of the grid shorter than
    the window) is served by the index of its true offsets (the matching sub-block of the table); with
    ``sliced_index=True`` instead by the first N x N entries of ``window``'s index, as the official Video Swin
    reads it (``relative_position_index[:N, :N]``: the true offsets only while the shortened axes are the leading
    ones, e.g. time; see swin.md section 6).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: tuple[int, ...],
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        sliced_index: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, attn_drop, proj_drop)
        self.window, self.sliced_index = tuple(window), sliced_index
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(relative_bias_table_size(self.window), num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # split, not indexing: its backward concatenates the gradients instead of zero-filling and adding
        qk, v = qkv.permute(3, 0, 1, 4, 2, 5).split([2, 1])
        factor = qk.new_tensor([self.scale, 1.0]).view(2, *[1] * (qk.dim() - 1))
        qk = qk * factor if torch.is_grad_enabled() else qk.mul_(factor)  # in place: the fresh projection output
        q, k = qk.unbind(0)
        return q, k, v[0]

    def position_bias(self, window: tuple[int, ...]) -> torch.Tensor:
        table = self.relative_position_bias_table
        if self.sliced_index and tuple(window) != self.window:
            n = math.prod(window)
            index = relative_position_index(self.window, table.device)[:n, :n].flatten()
            return table.t().contiguous().index_select(1, index).view(-1, n, n)  # as gather_relative_bias
        if tuple(window) != self.window:
            full = table.view(*(2 * w - 1 for w in self.window), -1)
            crop = tuple(slice(w - e, w + e - 1) for w, e in zip(self.window, window, strict=True))
            table = full[crop].reshape(-1, self.num_heads)
        return gather_relative_bias(table, window)
