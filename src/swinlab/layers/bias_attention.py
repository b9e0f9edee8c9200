"""Window attention with a learned additive bias, trained in cache-sized chunks on the CPU.

``softmax(q kᵀ + bias) v`` with a bias that needs a gradient (Swin's position bias while it trains) rules out the fused
SDPA kernels on the CPU, and the plain formula materialises every window's ``N x N`` logits, probabilities and their
gradients at once: Video Swin-T at 16 frames holds 118 MB of them per block at stage 0, each freshly mapped by malloc
and faulted in page by page, and every elementwise pass (bias, softmax, its backward) streams them from DRAM. Here the
logits are computed a few MB at a time, in one reused buffer that stays in cache, and the backward recomputes them
(one more ``q kᵀ`` per chunk, as flash attention does) instead of keeping the probabilities: the same kernels per
element, so the output is bit-identical to the plain formula and the gradients equal to float32 rounding, at a
fraction of the memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK_BYTES = 1 << 21
"""Logits per chunk and thread: a few heads of a large window, or many windows of a small one, within a core's L2
and its share of L3 (more threads take larger chunks, so that each parallel pass keeps as much work per thread)."""

MIN_BYTES = 1 << 23
"""Below this much logits in total the plain formula is as fast (its tensors stay mostly in cache)."""

Index = tuple[slice, slice, slice]


def worth_chunking(q: torch.Tensor) -> bool:
    """Whether the chunked form pays for ``q`` of shape ``(B, nW, h, N, d)``: float32 on the CPU with large logits,
    outside ``torch.compile`` (which fuses the plain formula its own way and would unroll the chunk loop)."""
    b, nw, h, n, _ = q.shape
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and b * nw * h * n * n * q.element_size() >= MIN_BYTES
    )


def _chunk_bytes() -> int:
    return CHUNK_BYTES * torch.get_num_threads()


def _chunks(q: torch.Tensor) -> Iterator[Index]:
    """(images, windows, heads) slices of about :func:`_chunk_bytes` of logits, never straddling two images' windows
    (a per-window bias is indexed by window)."""
    b, nw, h, n, _ = q.shape
    itemsize = q.element_size()
    limit = _chunk_bytes()
    per_window = h * n * n * itemsize
    if nw * per_window <= limit:
        step = limit // (nw * per_window)
        for b0 in range(0, b, step):
            yield slice(b0, b0 + step), slice(None), slice(None)
    elif per_window <= limit:
        step = limit // per_window
        for i in range(b):
            for w0 in range(0, nw, step):
                yield slice(i, i + 1), slice(w0, w0 + step), slice(None)
    else:
        step = max(1, limit // (n * n * itemsize))
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


def _probabilities(q, k, bias, mask, index: Index, buf: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ + bias + mask)`` of one chunk, written into ``buf``; returns it as ``(m, N, N)``."""
    qc, kc = _rows(q, index), _rows(k, index)
    m, n = qc.shape[:2]
    p = buf[: m * n * n].view(m, n, n)
    torch.bmm(qc, kc.transpose(1, 2), out=p)
    logits = p.view(*q[index].shape[:-1], n)
    logits.add_(_bias_part(bias, index))
    if mask is not None:
        logits.add_(mask[index[1]].unsqueeze(1))
    return torch.ops.aten._softmax.out(p, -1, False, out=p)


def _accumulate_bias_grad(dbias: torch.Tensor, ds: torch.Tensor, index: Index) -> None:
    """Add a chunk's logit gradient ``(kb, kw, kh, N, N)`` to its part of the bias gradient, summed over the images
    (and the windows, for a bias shared by all windows). The first chunk to reach a part writes it, so the gradient
    needs no zero fill; size-1 axes are viewed away rather than summed (a sum over them copies the whole chunk)."""
    shared = 2 if dbias.dim() == 3 else 1
    part = _bias_part(dbias, index)
    axes = [i for i in range(shared) if ds.shape[i] > 1]
    total = (ds.sum(axes) if axes else ds).view(part.shape)
    first = index[0].start == 0 and (dbias.dim() == 4 or not index[1].start)
    if first:
        part.copy_(total)
    else:
        part.add_(total)


class _ChunkedBiasAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask):
        b, nw, h, n, d = q.shape
        out = q.new_empty(b, nw, n, h, d)
        buf = q.new_empty(_buffer_size(q))
        for index in _chunks(q):
            p = _probabilities(q, k, bias, mask, index, buf)
            vc = v[index]
            out_c = torch.bmm(p, vc.reshape(-1, n, d))
            out[index[0], index[1], :, index[2]] = out_c.view(vc.shape).transpose(2, 3)
        ctx.save_for_backward(q, k, v, bias, mask)
        return out.view(b, nw, n, h * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, v, bias, mask = ctx.saved_tensors
        b, nw, h, n, d = q.shape
        grad = grad.reshape(b, nw, n, h, d).transpose(2, 3)
        dq, dk, dv = (q.new_empty(q.shape) for _ in range(3))
        dbias = bias.new_empty(bias.shape) if ctx.needs_input_grad[3] else None
        buf, dbuf = q.new_empty(_buffer_size(q)), q.new_empty(_buffer_size(q))
        for index in _chunks(q):
            p = _probabilities(q, k, bias, mask, index, buf)
            g = grad[index].reshape(p.shape[0], n, d)
            dp = dbuf[: p.numel()].view(p.shape)
            torch.bmm(g, _rows(v, index).transpose(1, 2), out=dp)
            torch.bmm(p.transpose(1, 2), g, out=_rows(dv, index))
            ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, p.dtype, grad_input=dp)
            if dbias is not None:
                _accumulate_bias_grad(dbias, ds.view(*q[index].shape[:-1], n), index)
            torch.bmm(ds, _rows(k, index), out=_rows(dq, index))
            torch.bmm(ds.transpose(1, 2), _rows(q, index), out=_rows(dk, index))
        return dq, dk, dv, dbias, None


def _buffer_size(q: torch.Tensor) -> int:
    b, nw, h, n, _ = q.shape
    return min(b * nw * h, max(1, _chunk_bytes() // (n * n * q.element_size()))) * n * n


def chunked_bias_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``softmax(q kᵀ + bias + mask) v`` for ``(B, nW, h, N, d)`` inputs, a bias ``(h, N, N)`` or ``(nW, h, N, N)``
    and an optional constant per-window mask ``(nW, N, N)``, heads merged to ``(B, nW, N, h * d)``; the same numbers
    as the plain formula (see the module docstring). Keeping the mask apart spares the ``(nW, h, N, N)`` sum of both
    (118 MB per shifted block at Video Swin-T's stage 0) and its backward."""
    return _ChunkedBiasAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, mask)
