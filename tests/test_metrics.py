"""Top-k correct counts (the sums distributed evaluation all-reduces)."""

import pytest
import torch

from swinlab.metrics import topk_correct


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
