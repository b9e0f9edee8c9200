"""Pure functions over tensors. Evaluation metrics are written as sums/counts so distributed evaluation can
all-reduce them before dividing; :func:`relative_l2_error` measures numerical error against a reference."""

from swinlab.metrics.classification import topk_correct
from swinlab.metrics.numerics import relative_l2_error

__all__ = ["relative_l2_error", "topk_correct"]
