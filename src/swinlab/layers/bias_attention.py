"""Window attention with a learned additive bias, trained in cache-sized chunks on the CPU.

``softmax(q kᵀ + bias) v`` with a bias that needs a gradient (Swin's position bias while it trains) rules out the fused
SDPA kernels on the CPU, and the plain formula materialises every window's ``N x N`` logits, probabilities and their
gradients at once: Video Swin-T at 16 frames holds 118 MB of them per block at stage 0, each freshly mapped by malloc
and faulted in page by page, and every elementwise pass (bias, softmax, its backward) streams them from DRAM. Here the
logits are computed a few MB at a time, in one reused buffer that stays in cache, and the backward recomputes them
(one more ``q kᵀ`` per chunk, as flash attention does) instead of keeping the probabilities: the same kernels in the
same order per element, so the result is bit-identical to the plain formula, at a fraction of the memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_BYTES = 1 << 21
"""Logits per chunk: a few heads of a large window, or many windows of a small one, within a core's L2 + share of L3."""

MIN_BYTES = 1 << 23
"""Below this much logits in total the plain formula is as fast (its tensors stay mostly in cache)."""

Index = tuple[slice, slice, slice]


def worth_chunking(q: torch.Tensor) -> bool:
    """Whether the chunked form pays for ``q`` of shape ``(B, nW, h, N, d)``: float32 on the CPU with large logits."""
    b, nw, h, n, _ = q.shape
    return q.device.type == "cpu" and q.dtype == torch.float32 and b * nw * h * n * n * q.element_size() >= MIN_BYTES


def _chunks(b: int, nw: int, h: int, n: int, itemsize: int) -> Iterator[Index]:
    """(images, windows, heads) slices of about ``CHUNK_BYTES`` of logits, never straddling two images' windows (a
    per-window bias is indexed by window)."""
    per_window = h * n * n * itemsize
    if nw * per_window <= CHUNK_BYTES:
        step = CHUNK_BYTES // (nw * per_window)
        for b0 in range(0, b, step):
            yield slice(b0, b0 + step), slice(None), slice(None)
    elif per_window <= CHUNK_BYTES:
        step = CHUNK_BYTES // per_window
        for i in range(b):
            for w0 in range(0, nw, step):
                yield slice(i, i + 1), slice(w0, w0 + step), slice(None)
    else:
        step = max(1, CHUNK_BYTES // (n * n * itemsize))
        for i in range(b):
            for w in range(nw):
                for h0 in range(0, h, step):
                    yield slice(i, i + 1), slice(w, w + 1), slice(h0, h0 + step)


def _rows(x: torch.Tensor, index: Index) -> torch.Tensor:
    """The chunk of a contiguous ``(B, nW, h, N, d)`` tensor as an ``(m, N, d)`` view (the chunks are contiguous)."""
    part = x[index]
    return part.view(-1, *part.shape[-2:])


def _bias_part(bias: torch.Tensor, index: Index) -> torch.Tensor:
    """The part of a ``(h, N, N)`` or ``(nW, h, N, N)`` bias that a chunk's logits add (a view)."""
    return bias[index[2]] if bias.dim() == 3 else bias[index[1], index[2]]


def _probabilities(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, index: Index, buf: torch.Tensor):
    """``softmax(q kᵀ + bias)`` of one chunk, written into ``buf``; returns it as ``(m, N, N)``."""
    qc, kc = _rows(q, index), _rows(k, index)
    m, n = qc.shape[:2]
    p = buf[: m * n * n].view(m, n, n)
    torch.bmm(qc, kc.transpose(1, 2), out=p)
    p.view(*q[index].shape[:-1], n).add_(_bias_part(bias, index))
    return torch.ops.aten._softmax.out(p, -1, False, out=p)


class _ChunkedBiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, nw, h, n, d = q.shape
        out = q.new_empty(b, nw, n, h, d)
        buf = q.new_empty(_buffer_size(q))
        for index in _chunks(b, nw, h, n, q.element_size()):
            p = _probabilities(q, k, bias, index, buf)
            vc = v[index]
            out_c = torch.bmm(p, vc.reshape(-1, n, d))
            out[index[0], index[1], :, index[2]] = out_c.view(vc.shape).transpose(2, 3)
        ctx.save_for_backward(q, k, v, bias)
        return out.view(b, nw, n, h * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q, k, v, bias = ctx.saved_tensors
        b, nw, h, n, d = q.shape
        grad = grad.reshape(b, nw, n, h, d).transpose(2, 3)
        dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
        dbias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        buf, dbuf = q.new_empty(_buffer_size(q)), q.new_empty(_buffer_size(q))
        for index in _chunks(b, nw, h, n, q.element_size()):
            p = _probabilities(q, k, bias, index, buf)
            g = grad[index].reshape(p.shape[0], n, d)
            dp = dbuf[: p.numel()].view(p.shape)
            torch.bmm(g, _rows(v, index).transpose(1, 2), out=dp)
            torch.bmm(p.transpose(1, 2), g, out=_rows(dv, index))
            ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, p.dtype, grad_input=dp)
            if dbias is not None:  # summed over the images (and windows, for a bias shared by all windows)
                shared = (0, 1) if bias.dim() == 3 else (0,)
                _bias_part(dbias, index).add_(ds.view(*q[index].shape[:-1], n).sum(shared))
            torch.bmm(ds, _rows(k, index), out=_rows(dq, index))
            torch.bmm(ds.transpose(1, 2), _rows(q, index), out=_rows(dk, index))
        return dq, dk, dv, dbias


def _buffer_size(q: torch.Tensor) -> int:
    b, nw, h, n, _ = q.shape
    return min(b * nw * h, max(1, CHUNK_BYTES // (n * n * q.element_size()))) * n * n


def chunked_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ + bias) v`` for ``(B, nW, h, N, d)`` inputs and a bias ``(h, N, N)`` or ``(nW, h, N, N)``, heads
    merged to ``(B, nW, N, h * d)``; the same numbers as the plain formula (see the module docstring)."""
    return _ChunkedBiasAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias)
