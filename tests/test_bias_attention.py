"""The chunked training attention computes what the plain formula computes, in every chunking regime."""

import pytest
import torch

import swinlab.layers.bias_attention as bias_attention
from swinlab.layers.bias_attention import chunked_bias_attention


def plain(q, k, v, bias, mask=None):
    b, nw, h, n, d = q.shape
    if mask is not None:
        bias = bias + mask[:, None]
    attn = torch.softmax(q @ k.transpose(-2, -1) + bias, dim=-1)
    return (attn @ v).transpose(2, 3).reshape(b, nw, n, h * d)


@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3 * 4 * 16 * 16 * 2, 4 * 16 * 16 * 2, 1])
@pytest.mark.parametrize("per_window", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_chunked_attention_matches_the_plain_formula(monkeypatch, chunk_bytes, per_window, with_mask):
    # whole images per chunk, windows of one image, heads of one window, one head: each regime of _chunks
    monkeypatch.setattr(bias_attention, "CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(0)
    b, nw, h, n, d = 3, 4, 3, 16, 8
    qkv = torch.randn(b, nw, n, 3, h, d, requires_grad=True)
    q, k, v = (qkv[..., i, :, :].transpose(2, 3) for i in range(3))  # strided, as the attention modules give them
    bias = torch.randn(*((nw,) if per_window else ()), h, n, n, requires_grad=True)
    mask = torch.where(torch.rand(nw, n, n) < 0.3, -100.0, 0.0) if with_mask else None
    grad = torch.randn(b, nw, n, h * d)
    results = []
    for f in (plain, chunked_bias_attention):
        out = f(q, k, v, bias, mask)
        qkv_grad, bias_grad = torch.autograd.grad(out, (qkv, bias), grad)
        results.append((out, qkv_grad, bias_grad))
    # The output is bit-identical without a mask (added in another order with one); the gradients take their
    # products and sums in another order.
    for ref, new, atol in zip(*results, (1e-6 if with_mask else 0.0, 1e-6, 1e-6), strict=True):
        torch.testing.assert_close(new, ref, rtol=0, atol=atol)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_attention_modules_train_the_same_through_either_form(monkeypatch, version):
    from swinlab.layers import WindowAttentionV1, WindowAttentionV2
    from swinlab.layers.windows import window_geometry

    torch.manual_seed(0)
    attn = (WindowAttentionV2(16, 2) if version == "v2" else WindowAttentionV1(16, 2, (4, 4))).train()
    geom = window_geometry((8, 8), (4, 4), (2, 2))
    x = torch.randn(2, geom.num_windows, 16, 16)
    results = []
    for min_bytes in (1 << 60, 0):  # the plain formula, then the chunked form
        monkeypatch.setattr(bias_attention, "MIN_BYTES", min_bytes)
        attn.zero_grad()
        out = attn(x, geom)
        out.square().sum().backward()
        results.append([out] + [p.grad.clone() for p in attn.parameters()])
    for ref, new in zip(*results, strict=True):
        torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
