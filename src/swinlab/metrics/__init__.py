"""Metrics written as sums/counts so distributed evaluation can all-reduce them before dividing."""

from swinlab.metrics.classification import topk_correct

__all__ = ["topk_correct"]
