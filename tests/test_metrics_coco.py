"""COCO AP (swinlab.metrics.coco): perfect, hand-computed and all-wrong cases on tiny crafted targets, crowd regions
as ignore regions, a COCO annotation dict as ground truth, empty cases, quiet pycocotools and the errors."""

import math
import sys

import pytest
import torch

from swinlab.metrics.coco import COCO_STATS, coco_ap, rescale_prediction

pytest.importorskip("pycocotools")

SIZE = 64
ONE_OF_TWO = 51 / 101
"""AP of a class with two objects of which only one is found, first in the ranking: precision 1 on the recall points
0, 0.01, ..., 0.5 of the 101 and 0 after."""


def _square(top, left, side, size=SIZE):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


def _target(image_id, squares, labels, crowd=None):
    """A target of ``instances`` squares ``(top, left, side)`` on a ``SIZE`` x ``SIZE`` image."""
    masks = torch.stack([_square(*s) for s in squares]) if squares else torch.zeros(0, SIZE, SIZE, dtype=torch.bool)
    boxes = torch.tensor([[x, y, x + s, y + s] for y, x, s in squares], dtype=torch.float32).reshape(-1, 4)
    return {
        "boxes": boxes,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": masks,
        "iscrowd": torch.tensor(crowd or [False] * len(labels), dtype=torch.bool),
        "image_id": image_id,
        "orig_size": (SIZE, SIZE),
    }


def _prediction(squares, labels, scores):
    target = _target(0, squares, labels)
    return {key: target[key] for key in ("boxes", "labels", "masks")} | {"scores": torch.tensor(scores)}


def _as_prediction(target, scores=None):
    n = len(target["labels"])
    return _prediction([], [], []) if not n else {
        "boxes": target["boxes"], "labels": target["labels"], "masks": target["masks"],
        "scores": torch.ones(n) if scores is None else torch.tensor(scores),
    }  # fmt: skip


@pytest.fixture
def targets():
    """Image 3: a medium (40 x 40 = 1600 px) and a small (10 x 10) object of class 0; image 8: a small one of
    class 1."""
    return [_target(3, [(2, 2, 40), (50, 50, 10)], [0, 0]), _target(8, [(5, 20, 12)], [1])]


def test_perfect_predictions_score_one(targets):
    result = coco_ap([_as_prediction(t) for t in targets], targets)
    assert set(result) == {"segm", "bbox"}
    for stats in result.values():
        assert list(stats) == list(COCO_STATS)
        for name in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ar10", "ar100", "ar_small", "ar_medium"):
            assert stats[name] == pytest.approx(1.0), name
        assert math.isnan(stats["ap_large"]) and math.isnan(stats["ar_large"])  # no large object: undefined


def test_one_of_two_found(targets):
    found_medium = _prediction([(2, 2, 40)], [0], [0.9])
    result = coco_ap([found_medium, _as_prediction(targets[1])], targets)
    for stats in result.values():
        assert stats["ap"] == pytest.approx((ONE_OF_TWO + 1.0) / 2)  # class 0: one of two, class 1: perfect
        assert stats["ap_medium"] == pytest.approx(1.0) and stats["ap_small"] == pytest.approx((0.0 + 1.0) / 2)
        assert stats["ar100"] == pytest.approx((0.5 + 1.0) / 2)
    # a wrong detection ranked first halves the precision at the one true positive
    with_false_first = _prediction([(40, 2, 20), (2, 2, 40)], [0, 0], [0.95, 0.9])
    result = coco_ap([with_false_first], targets[:1], iou_types=("bbox",))
    assert result["bbox"]["ap"] == pytest.approx(ONE_OF_TWO / 2)
    assert set(result) == {"bbox"}


def test_all_wrong_scores_zero(targets):
    wrong_class = [{**_as_prediction(t), "labels": 1 - t["labels"]} for t in targets]
    elsewhere = [_prediction([(30, 30, 8)], [0], [1.0]), _prediction([(40, 40, 12)], [1], [1.0])]
    for predictions in (wrong_class, elsewhere):
        for stats in coco_ap(predictions, targets).values():
            assert stats["ap"] == stats["ap50"] == stats["ar100"] == 0.0


def test_crowd_regions_are_ignored():
    # a small detection inside a crowd region, ranked first: its crowd IoU (overlap / its own area) is 1, so it is
    # ignored; against the same region as an ordinary object (IoU 100 / 900) it is a false positive
    crowd = _target(1, [(2, 2, 20), (30, 30, 30)], [0, 0], crowd=[False, True])
    detections = _prediction([(35, 35, 10), (2, 2, 20)], [0, 0], [0.99, 0.5])
    for stats in coco_ap([detections], [crowd]).values():
        assert stats["ap"] == pytest.approx(1.0)
    ordinary = _target(1, [(2, 2, 20), (30, 30, 30)], [0, 0])
    for stats in coco_ap([detections], [ordinary]).values():
        assert stats["ap"] == pytest.approx(ONE_OF_TWO / 2)


def test_coco_annotation_dict_and_category_ids(targets):
    dataset = {
        "images": [{"id": 3, "height": SIZE, "width": SIZE}, {"id": 8, "height": SIZE, "width": SIZE}],
        "categories": [{"id": 9, "name": "dog"}, {"id": 5, "name": "cat"}],  # index 0 = category 5, 1 = category 9
        "annotations": [
            {"id": 1, "image_id": 3, "category_id": 5, "bbox": [2, 2, 40, 40], "area": 1600, "iscrowd": 0,
             "segmentation": [[2, 2, 42, 2, 42, 42, 2, 42]]},
            {"id": 2, "image_id": 3, "category_id": 5, "bbox": [50, 50, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[50, 50, 60, 50, 60, 60, 50, 60]]},
            {"id": 3, "image_id": 8, "category_id": 9, "bbox": [20, 5, 12, 12], "area": 144, "iscrowd": 0,
             "segmentation": [[20, 5, 32, 5, 32, 17, 20, 17]]},
        ],
    }  # fmt: skip
    found_medium = _prediction([(2, 2, 40)], [0], [0.9])
    predictions = [{**found_medium, "image_id": 3}, {**_as_prediction(targets[1]), "image_id": 8}]
    from_dict = coco_ap(predictions, dataset)
    from_targets = coco_ap(predictions, targets)  # the same numbers from the file as from the targets
    for iou_type, stats in from_dict.items():
        assert stats == pytest.approx(from_targets[iou_type], nan_ok=True)
    assert from_dict["segm"]["ap"] == pytest.approx((ONE_OF_TWO + 1.0) / 2)
    swapped = coco_ap(predictions, dataset, category_ids=[9, 5])
    assert swapped["bbox"]["ap"] == 0.0


def test_rescale_prediction_to_the_original_size():
    prediction = _prediction([(8, 4, 16)], [0], [0.5])
    out = rescale_prediction(prediction, (SIZE, SIZE), (32, 128))
    torch.testing.assert_close(out["boxes"], torch.tensor([[8.0, 4.0, 40.0, 12.0]]))
    assert out["masks"].shape == (1, 32, 128) and out["masks"].sum() == 8 * 32
    assert out["masks"][0, 4:12, 8:40].all() and out["scores"] is prediction["scores"]
    empty = rescale_prediction(_prediction([], [], []), (SIZE, SIZE), (32, 128))
    assert empty["masks"].shape == (0, 32, 128) and empty["boxes"].shape == (0, 4)


def test_empty_cases(targets):
    nothing = [_prediction([], [], []) for _ in targets]
    for stats in coco_ap(nothing, targets).values():
        assert stats["ap"] == stats["ar100"] == 0.0 and math.isnan(stats["ap_large"])
    no_objects = [_target(t["image_id"], [], []) for t in targets]
    for predictions in (nothing, [_as_prediction(t) for t in targets]):
        for stats in coco_ap(predictions, no_objects).values():
            assert all(math.isnan(v) for v in stats.values())


def test_pycocotools_prints_nothing(targets, capsys):
    coco_ap([_as_prediction(t) for t in targets], targets)
    assert capsys.readouterr().out == ""


def test_without_pycocotools(monkeypatch, targets):
    for name in ("pycocotools", "pycocotools.mask", "pycocotools.coco", "pycocotools.cocoeval"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "swinlab\[coco\]"'):
        coco_ap([_as_prediction(t) for t in targets], targets)


def test_errors(targets):
    predictions = [_as_prediction(t) for t in targets]
    with pytest.raises(ValueError, match="1 predictions for 2 ground-truth images"):
        coco_ap(predictions[:1], targets)
    with pytest.raises(ValueError, match="unknown IoU types"):
        coco_ap(predictions, targets, iou_types=("keypoints",))
    with pytest.raises(ValueError, match=r"predicted label 2 is not a class index 0\.\.1"):
        coco_ap([{**predictions[0], "labels": torch.tensor([0, 2])}, predictions[1]], targets, category_ids=(0, 1))
    with pytest.raises(ValueError, match="segm AP needs predicted masks"):
        coco_ap([{k: v for k, v in p.items() if k != "masks"} for p in predictions], targets)
    assert coco_ap([{k: v for k, v in p.items() if k != "masks"} for p in predictions], targets, ("bbox",))
    with pytest.raises(ValueError, match="every prediction needs its 'image_id'"):
        coco_ap(predictions, {"images": [], "annotations": [], "categories": []})
    with pytest.raises(ValueError, match=r"images \[7\] that the ground truth does not have"):
        coco_ap([{**predictions[0], "image_id": 7}, predictions[1]], targets)
    with pytest.raises(ValueError, match=r"repeat image ids \[3\]"):
        coco_ap(predictions, [targets[0], targets[0]])
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        coco_ap(predictions, "/nonexistent/instances_val2017.json")
