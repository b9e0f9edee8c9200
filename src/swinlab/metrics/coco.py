"""COCO box and mask AP by pycocotools, the reference implementation every COCO number is quoted with.

:func:`coco_ap` takes per-image predictions (``boxes`` xyxy, ``scores``, ``labels``, ``masks``) and the ground truth,
either as the targets of the ``instances`` data kind (:mod:`swinlab.data.instances`; evaluated in the pixels of the
transformed image, so the small / medium / large area ranges refer to those pixels) or as an official COCO
annotation file (predictions then in the pixels of the original images: see :func:`rescale_prediction`). Crowd
ground truth (``iscrowd``) is an ignore region, as in pycocotools: a detection on it is neither right nor wrong.

It returns, per IoU type (``segm``, ``bbox``), the 12 summary numbers of ``COCOeval.summarize`` under the names of
:data:`COCO_STATS`: AP over IoU 0.50:0.05:0.95 (101-point interpolated, at most 100 detections an image), AP at IoU
0.5 and 0.75, AP by object size, and AR with 1 / 10 / 100 detections an image and by size. A number is ``nan`` when
it is undefined, i.e. no ground truth falls in that size range (pycocotools' -1), including when there is no ground
truth at all; with ground truth and no prediction, AP and AR are 0. pycocotools' progress printing goes to this
module's logger at DEBUG level.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

COCO_STATS = (
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)  # fmt: skip
"""Names of ``COCOeval.stats`` in its order."""
IOU_TYPES = ("segm", "bbox")

log = logging.getLogger(__name__)


def _pycocotools():
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError('COCO AP needs pycocotools: pip install "swinlab[coco]" (or pycocotools)') from None
    return COCO, COCOeval, mask_utils


@contextlib.contextmanager
def _quiet():
    """pycocotools prints its progress; keep it off stdout and hand it to the logger."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    if text := buffer.getvalue().strip():
        log.debug("pycocotools: %s", text)


def _rle(mask: torch.Tensor | np.ndarray, mask_utils) -> dict[str, Any]:
    """A bool (H, W) mask as a COCO RLE with ``counts`` as text (JSON-ready, as COCO result files store it)."""
    array = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = mask_utils.encode(array)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()


def _ground_truth_from_targets(
    targets: Sequence[Mapping[str, Any]], category_ids: Sequence[int], mask_utils
) -> dict[str, Any]:
    """A COCO annotation dict of ``instances`` targets: sizes from the masks (else ``orig_size``), areas the mask
    pixel counts (box areas without masks), ids from 1 (pycocotools takes id 0 for "unmatched")."""
    ids = [int(target["image_id"]) for target in targets]
    if len(set(ids)) < len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"ground-truth targets repeat image ids {twice[:5]}: each image must appear once")
    images, annotations = [], []
    for target in targets:
        masks = target.get("masks")
        height, width = masks.shape[-2:] if masks is not None else target["orig_size"]
        images.append({"id": int(target["image_id"]), "height": int(height), "width": int(width)})
        boxes = _xywh(target["boxes"])
        crowd = target.get("iscrowd", torch.zeros(len(boxes), dtype=torch.bool))
        for i, (box, label) in enumerate(zip(boxes, target["labels"].tolist(), strict=True)):
            annotation = {
                "id": len(annotations) + 1,
                "image_id": int(target["image_id"]),
                "category_id": int(category_ids[label]),
                "bbox": box,
                "iscrowd": int(bool(crowd[i])),
                "area": float(masks[i].sum()) if masks is not None else box[2] * box[3],
            }
            if masks is not None:
                annotation["segmentation"] = _rle(masks[i], mask_utils)
            annotations.append(annotation)
    categories = [{"id": int(c), "name": str(c)} for c in category_ids]
    return {"images": images, "annotations": annotations, "categories": categories}


def _results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    iou_type: str,
    mask_utils,
) -> list[dict[str, Any]]:
    """COCO result entries of one IoU type (``bbox`` entries carry no mask and ``segm`` entries no box, since
    pycocotools takes a result's area from the box whenever one is present)."""
    results = []
    for prediction, image_id in zip(predictions, image_ids, strict=True):
        scores, labels = prediction["scores"].tolist(), prediction["labels"].tolist()
        if iou_type == "bbox":
            shapes = [{"bbox": box} for box in _xywh(prediction["boxes"])]
        else:
            if "masks" not in prediction:
                raise ValueError("segm AP needs predicted masks: each prediction must have 'masks' (n, H, W)")
            shapes = [{"segmentation": _rle(mask, mask_utils)} for mask in prediction["masks"]]
        if not len(scores) == len(labels) == len(shapes):
            raise ValueError(f"image {image_id}: {len(scores)} scores, {len(labels)} labels, {len(shapes)} {iou_type}")
        for score, label, shape in zip(scores, labels, shapes, strict=True):
            if not 0 <= label < len(category_ids):
                last = len(category_ids) - 1
                raise ValueError(f"image {image_id}: predicted label {label} is not a class index 0..{last}")
            results.append({"image_id": int(image_id), "category_id": int(category_ids[label]), "score": score} | shape)
    return results


def _load_ground_truth(ground_truth: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    if isinstance(ground_truth, Mapping):
        return dict(ground_truth)
    path = Path(ground_truth)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    return json.loads(path.read_text())


def coco_ap(
    predictions: Sequence[Mapping[str, Any]],
    ground_truth: Sequence[Mapping[str, Any]] | Mapping[str, Any] | str | Path,
    iou_types: Sequence[str] = IOU_TYPES,
    *,
    category_ids: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """COCO AP / AR of ``predictions`` per IoU type: ``{"segm": {"ap": ..., "ap50": ..., ...}, "bbox": {...}}``.

    ``predictions``: one mapping per image with ``boxes`` (n, 4) xyxy, ``scores`` (n,), ``labels`` (n,) class
    indices and, for ``segm``, ``masks`` (n, H, W) bool; ``image_id`` is taken from the prediction, else from the
    target at the same position. ``ground_truth``: the ``instances`` targets of the same images in the same order
    (predictions in the same pixels), or a COCO annotation dict or file (predictions in the original images' pixels,
    ``image_id`` required). ``category_ids[label]`` is the category a class index means: by default the identity for
    targets, and the file's category ids in ascending order for a COCO file (as :class:`swinlab.data.instances.
    CocoInstances` numbers them); pass ``bundle.category_ids``.
    """
    coco_cls, coco_eval_cls, mask_utils = _pycocotools()
    if unknown := sorted(set(iou_types) - set(IOU_TYPES)):
        raise ValueError(f"unknown IoU types {unknown} (choose from {', '.join(IOU_TYPES)})")
    if isinstance(ground_truth, (Mapping, str, Path)):
        dataset = _load_ground_truth(ground_truth)
        if category_ids is None:
            category_ids = sorted(int(c["id"]) for c in dataset.get("categories", []))
        if any("image_id" not in p for p in predictions):
            raise ValueError("with a COCO annotation file as ground truth, every prediction needs its 'image_id'")
        image_ids = [int(p["image_id"]) for p in predictions]
    else:
        if len(predictions) != len(ground_truth):
            raise ValueError(f"{len(predictions)} predictions for {len(ground_truth)} ground-truth images")
        if category_ids is None:
            labels = [t["labels"] for t in ground_truth] + [p["labels"] for p in predictions]
            category_ids = range(1 + max((int(x.max()) for x in labels if len(x)), default=-1))
        dataset = _ground_truth_from_targets(ground_truth, category_ids, mask_utils)
        image_ids = [int(p.get("image_id", t["image_id"])) for p, t in zip(predictions, ground_truth, strict=True)]
    known = {int(image["id"]) for image in dataset["images"]}
    if missing := sorted(set(image_ids) - known):
        raise ValueError(f"predictions for images {missing[:5]} that the ground truth does not have")
    with _quiet():
        gt = coco_cls()
        gt.dataset = dataset
        gt.createIndex()
    out = {}
    for iou_type in iou_types:
        results = _results(predictions, image_ids, category_ids, iou_type, mask_utils)
        with _quiet():
            if results:
                dt = gt.loadRes(results)
            else:  # loadRes cannot take an empty list: no detection anywhere
                dt = coco_cls()
                dt.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
                dt.createIndex()
            evaluation = coco_eval_cls(gt, dt, iou_type)
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        stats = zip(COCO_STATS, evaluation.stats, strict=True)
        out[iou_type] = {name: (math.nan if value < 0 else float(value)) for name, value in stats}
    return out


def rescale_prediction(
    prediction: Mapping[str, Any], from_size: tuple[int, int], to_size: tuple[int, int]
) -> dict[str, Any]:
    """``prediction`` moved from an image of ``from_size`` (H, W) to one of ``to_size``, e.g. from the model's input
    to a target's ``orig_size`` before comparing with an official annotation file: boxes scaled, masks (if any)
    resized by nearest neighbour."""
    (h, w), (h0, w0) = from_size, to_size
    out = dict(prediction)
    out["boxes"] = torch.as_tensor(prediction["boxes"], dtype=torch.float32) * torch.tensor([w0 / w, h0 / h] * 2)
    masks = prediction.get("masks")
    if masks is not None and len(masks):
        out["masks"] = F.interpolate(masks[:, None].to(torch.uint8), size=(h0, w0), mode="nearest-exact")[:, 0] > 0
    elif masks is not None:
        out["masks"] = torch.zeros(0, h0, w0, dtype=torch.bool)
    return out
