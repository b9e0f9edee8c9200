"""Top-k correct counts (the sums distributed evaluation all-reduces) and the relative L2 error."""

import pytest
import torch

from swinlab.metrics import relative_l2_error, topk_correct


def test_topk_correct_counts():
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    target = torch.tensor([1, 1, 0, 2])
    counts = topk_correct(logits, target, ks=(1, 2, 3))
    assert counts.dtype == torch.int64 and counts.tolist() == [1, 3, 4]


def test_topk_correct_counts_add_up_over_shards():
    logits, target = torch.randn(10, 6), torch.randint(0, 6, (10,))
    whole = topk_correct(logits, target, ks=(1, 5))
    parts = topk_correct(logits[:3], target[:3], ks=(1, 5)) + topk_correct(logits[3:], target[3:], ks=(1, 5))
    assert torch.equal(whole, parts)


def test_topk_correct_rejects_bad_input():
    with pytest.raises(ValueError, match=r"k=\[5\]"):
        topk_correct(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), ks=(1, 5))
    with pytest.raises(ValueError, match="logits must be"):
        topk_correct(torch.randn(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be"):
        topk_correct(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))


def test_flop_counter_counts_fused_cpu_attention_like_matmuls():
    """torch's FlopCounterMode reports 0 for SDPA on CPU; swinlab's counter must give what the matmuls cost."""
    from swinlab.metrics.flops import flop_counter

    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    bias = torch.randn(16, 16)
    with flop_counter() as fused:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with flop_counter() as explicit:
        torch.softmax(q @ k.transpose(-2, -1) / 8**0.5 + bias, dim=-1) @ v
    assert fused.get_total_flops() == explicit.get_total_flops() == 2 * (2 * 2 * 3 * 16 * 16 * 8)


def test_flop_counter_counts_onednn_linears_forward_and_backward_like_f_linear(monkeypatch):
    import swinlab.layers.linear
    from swinlab.layers import Linear
    from swinlab.metrics.flops import flop_counter

    if not swinlab.layers.linear.ONEDNN_AVAILABLE:
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(swinlab.layers.linear, "ONEDNN_LINEAR", True)  # whatever this CPU's default
    monkeypatch.setattr(swinlab.layers.linear, "ONEDNN_WEIGHT_GRAD", True)

    layer, x = Linear(8, 5), torch.randn(3, 4, 8, requires_grad=True)
    with flop_counter() as counted:
        layer(x).sum().backward()
    with flop_counter() as reference:
        torch.nn.functional.linear(x, layer.weight, layer.bias).sum().backward()
    assert counted.get_total_flops() == reference.get_total_flops() == 3 * 2 * 12 * 8 * 5


def test_relative_l2_error_is_the_norm_of_the_difference_over_the_reference_norm():
    reference = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    assert relative_l2_error(reference + torch.tensor([[0.0, 0.3], [0.4, 0.0]]), reference) == pytest.approx(0.1)
    assert relative_l2_error(reference, reference) == 0.0
    assert relative_l2_error(torch.ones(2), torch.zeros(2)) == float("inf")
