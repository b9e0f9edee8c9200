"""Pure functions over tensors. Evaluation metrics are written as sums/counts so distributed evaluation can
all-reduce them before dividing; :func:`relative_l2_error` measures numerical error against a reference;
:func:`depth_metrics` gives AiT's official depth figures per image."""

from swinlab.metrics.classification import topk_correct
from swinlab.metrics.depth import DEPTH_METRICS, depth_metrics, mean_depth_metrics
from swinlab.metrics.numerics import relative_l2_error

__all__ = ["DEPTH_METRICS", "depth_metrics", "mean_depth_metrics", "relative_l2_error", "topk_correct"]
