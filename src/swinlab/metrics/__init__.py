"""Pure functions over tensors. Evaluation metrics are written as sums/counts so distributed evaluation can
all-reduce them before dividing; :func:`relative_l2_error` measures numerical error against a reference;
:func:`depth_metrics` gives AiT's official depth figures per image; :func:`coco_ap` COCO's box and mask AP
(pycocotools, extra ``coco``)."""

from swinlab.metrics.classification import topk_correct
from swinlab.metrics.coco import coco_ap, rescale_prediction
from swinlab.metrics.depth import DEPTH_METRICS, depth_metrics, mean_depth_metrics
from swinlab.metrics.numerics import relative_l2_error

__all__ = [
    "DEPTH_METRICS",
    "coco_ap",
    "depth_metrics",
    "mean_depth_metrics",
    "relative_l2_error",
    "rescale_prediction",
    "topk_correct",
]
