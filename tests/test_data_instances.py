"""Instance segmentation data (swinlab.data.instances): COCO JSON on generated fixtures (polygons, uncompressed and
compressed RLE, a crowd region), the mask decoders against hand counts and pycocotools, resize/flip of boxes and
masks, the procedural rooms, the ``instances`` kind through ``data.build``, and the errors."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from swinlab.config import DataConfig
from swinlab.data import build
from swinlab.data.depth import PROCEDURAL_SIZES
from swinlab.data.depth_scenes import OBJECT_KINDS, render_scene
from swinlab.data.instances import (
    CocoInstances,
    InstanceTransform,
    ProceduralInstances,
    boxes_from_masks,
    collate_instances,
    polygons_to_mask,
    rle_counts_from_string,
    rle_to_mask,
    segmentation_to_mask,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SQUARE = [[4, 2, 14, 2, 14, 10, 4, 10]]  # x 4..14, y 2..10: 10 x 8 = 80 pixels
TRIANGLE = [[16.3, 3.7, 28.2, 6.1, 20.8, 17.9]]


def _crowd_rle(height, width):
    """An uncompressed RLE (counts a list, as COCO stores crowds) of rows 12..15, columns 2..9: 4 x 8 = 32 pixels."""
    mask = np.zeros((height, width), bool)
    mask[12:16, 2:10] = True
    flat = mask.T.reshape(-1)
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = [0, *changes.tolist(), flat.size]
    counts = np.diff(bounds).tolist()
    return {"size": [height, width], "counts": counts if not flat[0] else [0, *counts]}, mask


def _write_coco(tmp_path, split="val2017", compressed=None):
    """``tmp_path/annotations/instances_<split>.json`` and ``tmp_path/<split>/*.png``: image 1 (20 x 30) with a
    polygon square, a polygon triangle and a crowd RLE; image 2 (24 x 16) with nothing; image 3 (20 x 30) with the
    ``compressed`` RLE dict when given. Categories 5 ("cat") and 9 ("dog"), listed out of order."""
    folder = tmp_path / split
    folder.mkdir(parents=True, exist_ok=True)
    (tmp_path / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images = [(1, "a.png", 20, 30), (2, "b.png", 24, 16), (3, "c.png", 20, 30)]
    for _, name, h, w in images:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    crowd, _ = _crowd_rle(20, 30)
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 9, "bbox": [4, 2, 10, 8], "segmentation": SQUARE, "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 5, "bbox": [16.3, 3.7, 11.9, 14.2], "segmentation": TRIANGLE},
        {"id": 13, "image_id": 1, "category_id": 5, "bbox": [2, 12, 8, 4], "segmentation": crowd, "iscrowd": 1},
    ]
    if compressed is not None:
        annotations.append(
            {"id": 14, "image_id": 3, "category_id": 9, "bbox": [0, 0, 1, 1], "segmentation": compressed}
        )
    data = {
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images],
        "annotations": annotations,
        "categories": [{"id": 9, "name": "dog"}, {"id": 5, "name": "cat"}],
    }
    path = tmp_path / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(data))
    return path, data


def test_uncompressed_rle_by_hand():
    # column-major: 2 background pixels, 3 object pixels (last of column 0, first two of column 1), 7 background
    mask = rle_to_mask({"size": [3, 4], "counts": [2, 3, 7]})
    expected = np.zeros((3, 4), bool)
    expected[2, 0] = expected[0, 1] = expected[1, 1] = True
    np.testing.assert_array_equal(mask, expected)
    crowd, hand = _crowd_rle(20, 30)
    np.testing.assert_array_equal(rle_to_mask(crowd), hand)


def test_compressed_rle_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(1)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        if trial % 7 == 0:
            mask[:] = trial % 2 == 0  # all object / all background
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        counts = rle["counts"].decode()
        got = rle_to_mask({"size": [h, w], "counts": counts})
        np.testing.assert_array_equal(got, mask)
        assert sum(rle_counts_from_string(counts)) == h * w


def test_polygons_cover_pixel_centres():
    square = polygons_to_mask(SQUARE, 20, 30)
    assert square.sum() == 80 and square[2:10, 4:14].all()
    two = polygons_to_mask([*SQUARE, [20, 12, 22, 12, 22, 15, 20, 15]], 20, 30)  # an object in two parts: union
    assert two.sum() == 80 + 6
    # a right triangle with legs 10: 45 pixel centres lie strictly inside, 10 on the hypotenuse (half-open rule)
    triangle = polygons_to_mask([[0, 0, 10, 0, 0, 10]], 12, 12)
    assert 45 <= triangle.sum() <= 55 and not triangle[:, 10:].any()
    clipped = polygons_to_mask([[-5, -5, 5, -5, 5, 5, -5, 5]], 10, 10)  # corners outside the image are clipped
    assert clipped.sum() == 25 and clipped[:5, :5].all()


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_polygons_agree_with_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    for polygon in (SQUARE, TRIANGLE, [[3.5, 2.2, 28.1, 6.6, 22, 19.3, 8.4, 18.8, 1.2, 12.7]]):
        ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, 20, 30))).astype(bool)
        mine = polygons_to_mask(polygon, 20, 30)
        iou = (ref & mine).sum() / (ref | mine).sum()
        assert iou > 0.97, iou  # pycocotools rasterises on a 5x grid: differences are boundary pixels only
        if polygon is SQUARE:
            np.testing.assert_array_equal(mine, ref)


def test_coco_samples(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    truth = np.zeros((20, 30), np.uint8)
    truth[3:17, 5:9] = 1
    truth[0, :] = 1
    compressed = mask_utils.encode(np.asfortranarray(truth))
    compressed["counts"] = compressed["counts"].decode()
    path, _ = _write_coco(tmp_path, compressed=compressed)
    coco = CocoInstances(path, [tmp_path, tmp_path / "val2017"])
    assert coco.image_root == tmp_path / "val2017"
    assert coco.category_ids == [5, 9] and coco.class_names == ["cat", "dog"]
    assert len(coco) == 3
    rgb, target = coco[0]
    assert rgb.shape == (3, 20, 30) and rgb.dtype == torch.uint8
    assert target["labels"].tolist() == [1, 0, 0]  # dog = 9 -> 1, cat = 5 -> 0
    assert target["iscrowd"].tolist() == [False, False, True]
    torch.testing.assert_close(target["boxes"][0], torch.tensor([4.0, 2.0, 14.0, 10.0]))
    torch.testing.assert_close(target["boxes"][1], torch.tensor([16.3, 3.7, 28.2, 17.9]))
    assert target["masks"].shape == (3, 20, 30) and target["masks"].dtype == torch.bool
    assert target["masks"].flatten(1).sum(1).tolist()[::2] == [80, 32]
    assert target["image_id"] == 1 and target["orig_size"] == (20, 30)
    _, empty = coco[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 24, 16) and empty["labels"].shape == (0,)
    _, third = coco[2]
    np.testing.assert_array_equal(third["masks"][0].numpy(), truth.astype(bool))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under numpy 2
def test_coco_masks_match_ann_to_mask(tmp_path):
    mask_utils = pytest.importorskip("pycocotools.mask")
    from pycocotools.coco import COCO

    truth = np.zeros((20, 30), np.uint8)
    truth[4:9, 11:25] = 1
    compressed = mask_utils.encode(np.asfortranarray(truth))
    compressed["counts"] = compressed["counts"].decode()
    path, _ = _write_coco(tmp_path, compressed=compressed)
    reference = COCO(str(path))
    coco = CocoInstances(path, tmp_path / "val2017")
    for index, image in enumerate(coco.images):
        annotations = reference.loadAnns(reference.getAnnIds(imgIds=[image["id"]]))
        masks = coco[index][1]["masks"].numpy()
        assert len(masks) == len(annotations)
        for mask, annotation in zip(masks, annotations, strict=True):
            expected = reference.annToMask(annotation).astype(bool)
            assert (mask & expected).sum() / (mask | expected).sum() > 0.97
            if annotation["id"] != 12:  # the triangle is rasterised differently on its boundary (see above)
                np.testing.assert_array_equal(mask, expected)


def _flip_seeds():
    """A seed whose first draw flips and one whose first draw does not."""
    draws = {seed: random.Random(seed).random() < 0.5 for seed in range(20)}
    return next(s for s, f in draws.items() if f), next(s for s, f in draws.items() if not f)


def test_transform_resizes_and_flips_boxes_and_masks():
    masks = torch.zeros(1, 20, 40, dtype=torch.bool)
    masks[0, 4:12, 2:10] = True
    target = {
        "boxes": torch.tensor([[2.0, 4.0, 10.0, 12.0]]),
        "labels": torch.tensor([3]),
        "masks": masks,
        "iscrowd": torch.tensor([False]),
        "image_id": 7,
        "orig_size": (20, 40),
    }
    rgb = torch.zeros(3, 20, 40, dtype=torch.uint8)
    rgb[:, :, :20] = 255
    val = InstanceTransform(16, train=False, mean=MEAN, std=STD)
    image, out = val(rgb, target)
    assert image.shape == (3, 16, 16) and out["masks"].shape == (1, 16, 16)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.8, 3.2, 4.0, 9.6]]))  # x * 16/40, y * 16/20
    torch.testing.assert_close(boxes_from_masks(out["masks"]), torch.tensor([[1.0, 3.0, 4.0, 10.0]]))
    assert out["image_id"] == 7 and out["orig_size"] == (20, 40) and out["labels"].tolist() == [3]
    flip_seed, keep_seed = _flip_seeds()
    train = InstanceTransform(16, train=True, mean=MEAN, std=STD)
    flipped_image, flipped = train(rgb, target, random.Random(flip_seed))
    torch.testing.assert_close(flipped["boxes"], torch.tensor([[12.0, 3.2, 15.2, 9.6]]))
    torch.testing.assert_close(flipped["masks"], out["masks"].flip(-1))
    torch.testing.assert_close(flipped_image, image.flip(-1))
    assert flipped_image[0, 0, 0] < 0 < flipped_image[0, 0, -1]  # the white half moved right
    _, kept = train(rgb, target, random.Random(keep_seed))
    torch.testing.assert_close(kept["boxes"], out["boxes"])


def test_transform_drops_objects_that_vanish_and_keeps_empty_targets():
    masks = torch.zeros(2, 40, 40, dtype=torch.bool)
    masks[0, 10:30, 10:30] = True
    masks[1, 1, 1] = True  # one pixel: gone at a quarter of the size
    target = {
        "boxes": torch.tensor([[10.0, 10, 30, 30], [1, 1, 2, 2]]),
        "labels": torch.tensor([0, 1]),
        "masks": masks,
        "iscrowd": torch.tensor([False, True]),
        "image_id": 0,
        "orig_size": (40, 40),
    }
    transform = InstanceTransform(10, train=False, mean=MEAN, std=STD)
    _, out = transform(torch.zeros(3, 40, 40, dtype=torch.uint8), target)
    assert out["labels"].tolist() == [0] and out["iscrowd"].tolist() == [False] and out["masks"].shape == (1, 10, 10)
    empty = {**target, "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    empty.update(masks=torch.zeros(0, 40, 40, dtype=torch.bool), iscrowd=torch.zeros(0, dtype=torch.bool))
    _, out = transform(torch.zeros(3, 40, 40, dtype=torch.uint8), empty)
    assert out["masks"].shape == (0, 10, 10) and out["boxes"].shape == (0, 4)


def test_procedural_instances_follow_the_instance_map():
    data = ProceduralInstances(12, 48, seed=0)
    assert data.class_names == list(OBJECT_KINDS) == ["sphere", "box"]
    hidden = 0
    for index in range(len(data)):
        rgb, target = data[index]
        scene = render_scene(48, 0, index)
        np.testing.assert_array_equal(rgb.permute(1, 2, 0).numpy(), scene.rgb)
        visible = [k for k in range(1, len(scene.kinds) + 1) if (scene.instances == k).any()]
        hidden += len(scene.kinds) - len(visible)
        assert target["labels"].tolist() == [OBJECT_KINDS.index(scene.kinds[k - 1]) for k in visible]
        for mask, box, k in zip(target["masks"], target["boxes"], visible, strict=True):
            np.testing.assert_array_equal(mask.numpy(), scene.instances == k)
            rows, cols = np.nonzero(scene.instances == k)
            assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        assert target["image_id"] == index and not target["iscrowd"].any()
        again = data[index][1]
        assert all(torch.equal(again[key], target[key]) for key in ("boxes", "labels", "masks"))
    assert hidden > 0  # some objects are fully hidden at this size, and none of them became an empty annotation


def test_build_procedural_instances():
    cfg = DataConfig(name="procedural_instances", img_size=32, batch_size=4, train_limit=6, val_limit=5)
    bundle = build(cfg, seed=0)
    assert bundle.kind == "instances" and bundle.num_classes == 2 and bundle.class_names == ["sphere", "box"]
    assert bundle.category_ids == (0, 1) and bundle.train_size == 6 and bundle.val_size == 5
    assert bundle.model_kwargs == {"image_size": 32}
    images, targets = next(iter(bundle.val_loader))
    assert images.shape == (4, 3, 32, 32) and len(targets) == 4
    assert abs(images.mean().item()) < 3  # normalised, not 0-255
    for target in targets:
        assert target["masks"].shape[1:] == (32, 32) and target["masks"].flatten(1).any(1).all()
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    second = next(iter(bundle.val_loader))[1]
    assert all(torch.equal(a["masks"], b["masks"]) for a, b in zip(targets, second, strict=True))
    default = build(DataConfig(name="procedural_instances", img_size=16), seed=0)
    assert (default.train_size, default.val_size) == PROCEDURAL_SIZES


def test_build_coco_instances_default_layout(tmp_path):
    _write_coco(tmp_path, "train2017")
    _write_coco(tmp_path, "val2017")
    cfg = DataConfig(name="coco_instances", root=str(tmp_path), img_size=16, batch_size=2)
    bundle = build(cfg, seed=0)
    assert bundle.kind == "instances" and bundle.class_names == ["cat", "dog"] and bundle.category_ids == (5, 9)
    assert bundle.train_size == bundle.val_size == 3
    batches = list(bundle.val_loader)
    assert [len(targets) for _, targets in batches] == [2, 1]
    images, targets = batches[0]
    assert images.shape == (2, 3, 16, 16)
    assert [t["image_id"] for t in targets] == [1, 2] and targets[1]["boxes"].shape == (0, 4)
    torch.testing.assert_close(targets[0]["boxes"][0], torch.tensor([4 * 16 / 30, 2 * 16 / 20, 14 * 16 / 30, 8.0]))
    listed = build(
        DataConfig(
            name="coco_instances", root=str(tmp_path), img_size=16, batch_size=2,
            train_list=str(tmp_path / "annotations" / "instances_train2017.json"),
            val_list="annotations/instances_val2017.json",
        ),
        seed=0,
    )  # fmt: skip
    assert listed.val_size == 3


def test_unreadable_image_is_skipped(tmp_path):
    path, _ = _write_coco(tmp_path)
    (tmp_path / "val2017" / "b.png").write_bytes(b"not a png")
    coco = CocoInstances(path, tmp_path / "val2017")
    with pytest.warns(RuntimeWarning, match="b.png"):
        assert coco[1] is None
    images, targets = collate_instances([coco[0], None], image_shape=(3, 20, 30))
    assert images.shape == (1, 3, 20, 30) and len(targets) == 1
    images, targets = collate_instances([None], image_shape=(3, 8, 8))
    assert images.shape == (0, 3, 8, 8) and targets == []


def _rewrite(path, data, **changes):
    path.write_text(json.dumps({**data, **changes}))


def _add_annotation(path, data, **fields):
    """Rewrite the file with one more annotation: the first one with ``fields`` changed."""
    _rewrite(path, data, annotations=[*data["annotations"], {**data["annotations"][0], **fields}])


def test_errors(tmp_path):
    path, data = _write_coco(tmp_path)
    root = tmp_path / "val2017"
    with pytest.raises(FileNotFoundError, match=r"annotation file not found: .*nope\.json"):
        CocoInstances(tmp_path / "nope.json", root)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=r"instances_val2017\.json: not valid JSON"):
        CocoInstances(path, root)
    _rewrite(path, {"images": data["images"], "annotations": data["annotations"]})
    with pytest.raises(ValueError, match="missing or not a list: categories"):
        CocoInstances(path, root)
    _add_annotation(path, data, id=99, category_id=3)
    with pytest.raises(ValueError, match=r"annotation 99: category_id 3 is not in categories \[5, 9\]"):
        CocoInstances(path, root)
    _add_annotation(path, data, id=98, segmentation={"polygon": [1, 2]})
    with pytest.raises(ValueError, match="annotation 98: segmentation of unknown format"):
        CocoInstances(path, root)
    _add_annotation(path, data, id=97, image_id=42)
    with pytest.raises(ValueError, match="annotation 97: image_id 42 is not in images"):
        CocoInstances(path, root)
    _add_annotation(path, data, id=96, segmentation={"size": [20, 30], "counts": [5]})
    with pytest.raises(ValueError, match="annotation 96: RLE runs sum to 5"):
        CocoInstances(path, root)[0]
    _rewrite(path, data)
    with pytest.raises(FileNotFoundError, match="first image not found"):
        CocoInstances(path, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="ends inside a run"):
        rle_counts_from_string("0P")  # 'P' carries the "another character follows" bit
    with pytest.raises(ValueError, match="character outside"):
        rle_counts_from_string("0~")
    with pytest.raises(ValueError, match="RLE size"):
        segmentation_to_mask({"size": [2, 2], "counts": [4]}, 3, 3)
    with pytest.raises(ValueError, match=r"data\.root"):
        build(DataConfig(name="coco_instances"), seed=0)
