"""Instance segmentation data as ``(images, targets)`` batches: the ``instances`` data kind (AiT's second task).

Interface (what a task gets from ``data.build`` when ``bundle.kind == "instances"``):

- a batch is ``(images, targets)``: ``images`` float32 ``(B, 3, S, S)``, normalised with ``bundle.mean`` /
  ``bundle.std`` (ImageNet unless ``data.mean`` / ``data.std`` say otherwise), ``S = data.img_size``;
  ``targets`` a list of B dicts (:func:`collate_instances`), each with
  ``boxes`` float32 ``(n, 4)`` xyxy in pixels of the ``S x S`` image (x2, y2 are the far pixel edges, so a one-pixel
  object is ``[x, y, x + 1, y + 1]``), ``labels`` int64 ``(n,)`` contiguous class indices ``0 .. C - 1``,
  ``masks`` bool ``(n, S, S)``, ``iscrowd`` bool ``(n,)`` (COCO crowd regions, kept so that AP can treat them as
  ignore regions; a training loss should usually skip them), ``image_id`` int (the COCO image id, or the scene index)
  and ``orig_size`` ``(H0, W0)`` of the image on disk (boxes scale back by ``W0 / S``, ``H0 / S``). ``n`` may be 0.
- ``bundle.num_classes`` = C, ``bundle.class_names`` the category names in index order and ``bundle.category_ids``
  the COCO category id of each index (what :func:`swinlab.metrics.coco.coco_ap` needs to compare with an official
  JSON); the sources carry the same as ``.class_names`` / ``.category_ids``, and :class:`CocoInstances` also the
  ``annotation_file`` it read.
- unreadable images are skipped with one warning (as :mod:`swinlab.data.imagefolder`), so a batch may be short.

Datasets:

- ``coco_instances``: a COCO instances JSON (``images``, ``annotations``, ``categories``). ``data.train_list`` /
  ``data.val_list`` name the annotation files (absolute or relative to ``data.root``; default
  ``annotations/instances_{train,val}2017.json``); images are ``file_name`` under ``data.root`` or under the folder
  named after the JSON (``instances_val2017.json`` -> ``val2017/``), whichever holds the first image. Segmentations
  may be polygons, uncompressed RLE (``counts`` a list, as crowd regions are stored) or compressed RLE (``counts`` a
  string); all three are decoded here with numpy alone (pycocotools is needed only for AP). Category ids map to
  indices in ascending id order.
- ``procedural_instances``: the rooms of :func:`swinlab.data.depth_scenes.render_scene` (the same streams and sizes
  as ``procedural_depth``), with two classes, ``sphere`` and ``box``; an object hidden by nearer ones is left out.

Transforms are deliberately simple: the image is resized to ``S x S`` (bilinear; aspect ratio not kept), masks by
nearest neighbour, boxes scaled; training adds a horizontal flip (``data.hflip``); validation is deterministic. There
is no large-scale jitter yet (AiT's recipe: scale 0.1-3.0 and a 640 crop). An object whose mask vanishes at ``S``
pixels is dropped.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from swinlab.config import DataConfig
from swinlab.data.depth import IMAGENET_MEAN, IMAGENET_STD, PROCEDURAL_SIZES, PROCEDURAL_STREAMS
from swinlab.data.depth_scenes import OBJECT_KINDS, render_scene
from swinlab.data.images import read_image
from swinlab.data.transforms import resize

INSTANCE_DATASETS = ("coco_instances", "procedural_instances")
COCO_ANNOTATIONS = ("annotations/instances_train2017.json", "annotations/instances_val2017.json")
"""Annotation files of ``coco_instances`` under ``data.root`` when ``data.train_list`` / ``data.val_list`` are unset."""

Target = dict[str, Any]


def rle_counts_from_string(counts: str) -> np.ndarray:
    """The run lengths (int64) of a compressed COCO RLE string.

    Each run is a little-endian group of 6-bit characters (value = ord - 48): 5 payload bits, bit 0x20 "another
    character follows", and in the last character bit 0x10 the sign. From the third run on, a run is stored as its
    difference to the run two places back (the run of the same colour before).
    """
    c = np.frombuffer(counts.encode("latin-1"), dtype=np.uint8).astype(np.int64) - 48
    if ((c < 0) | (c > 63)).any():
        raise ValueError(f"compressed RLE string has a character outside '0'..'o': {counts!r}")
    if not len(c):
        return np.zeros(0, dtype=np.int64)
    last = (c & 0x20) == 0  # the character that ends its run's group
    if not last[-1]:
        raise ValueError(f"compressed RLE string ends inside a run: {counts!r}")
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    shift = 5 * (np.arange(len(c)) - np.repeat(starts, np.diff(np.append(starts, len(c)))))
    values = np.add.reduceat((c & 0x1F) << shift, starts)
    ends = np.flatnonzero(last)
    values -= np.where(c[ends] & 0x10, np.int64(1) << (shift[ends] + 5), 0)
    # undo the differences: runs 1, 3, 5, ... and runs 2, 4, 6, ... are each a running sum of what is stored
    values[1::2] = np.cumsum(values[1::2])
    values[2::2] = np.cumsum(values[2::2])
    return values


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """A COCO RLE (``size`` [h, w], ``counts`` a list of run lengths or a compressed string) as a bool (h, w) mask.

    Runs alternate background / object starting with background and walk the pixels column by column (COCO's
    column-major order).
    """
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    runs = rle_counts_from_string(counts) if isinstance(counts, str) else np.asarray(counts, dtype=np.int64)
    if (runs < 0).any() or runs.sum() != height * width:
        raise ValueError(f"RLE runs sum to {runs.sum()} (or hold a negative run) for a {height}x{width} mask")
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(width, height).T


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """The union of COCO polygons (``[x1, y1, x2, y2, ...]`` in pixel coordinates, 0 at the image's top-left corner)
    as a bool (height, width) mask: a pixel is in a polygon when its centre is (even-odd rule), so the polygon
    ``[a, b, c, b, c, d, a, d]`` with integer corners covers exactly ``(c - a) * (d - b)`` pixels."""
    mask = np.zeros((height, width), dtype=bool)
    for polygon in polygons:
        xy = np.asarray(polygon, dtype=np.float64)
        if xy.ndim != 1 or len(xy) < 6 or len(xy) % 2:
            raise ValueError(f"a polygon needs at least 3 (x, y) pairs as a flat list, got {len(xy)} numbers")
        x0, y0 = xy[0::2], xy[1::2]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        top, bottom = max(0, int(np.floor(y0.min()))), min(height, int(np.ceil(y0.max())))  # rows it can cover
        if top >= bottom:
            continue
        centres = np.arange(top, bottom) + 0.5
        # crossings of every edge with every row's centre line (half-open in y, so a vertex is counted once)
        crosses = (y0[None] <= centres[:, None]) != (y1[None] <= centres[:, None])
        rows, edges = np.nonzero(crosses)
        t = (centres[rows] - y0[edges]) / (y1[edges] - y0[edges])
        x = x0[edges] + t * (x1[edges] - x0[edges])
        # toggle inside/outside from the first column whose centre lies right of the crossing
        first = np.clip(np.ceil(x - 0.5), 0, width).astype(np.int64)
        toggles = np.zeros((bottom - top, width + 1), dtype=np.int32)
        np.add.at(toggles, (rows, first), 1)
        mask[top:bottom] |= (np.cumsum(toggles, axis=1)[:, :width] % 2).astype(bool)
    return mask


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) as a bool (height, width) mask."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(v) for v in segmentation["size"]] != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image's [{height}, {width}]")
        return rle_to_mask(segmentation)
    raise ValueError(_unknown_segmentation(segmentation))


def _unknown_segmentation(segmentation: Any) -> str:
    shape = sorted(segmentation) if isinstance(segmentation, dict) else type(segmentation).__name__
    return f"segmentation of unknown format {shape} (expected a polygon list or an RLE dict with counts and size)"


def _check_segmentation(segmentation: Any) -> None:
    """Raise on a segmentation :func:`segmentation_to_mask` cannot read (a cheap check of its outer form)."""
    if isinstance(segmentation, list) and all(isinstance(p, list) for p in segmentation):
        return
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, list)):
        size = segmentation.get("size")
        if isinstance(size, list) and len(size) == 2:
            return
    raise ValueError(_unknown_segmentation(segmentation))


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes ``(n, 4)`` float32 of non-empty bool masks ``(n, H, W)``, far edges exclusive."""
    if not len(masks):
        return torch.zeros(0, 4)
    rows, cols = masks.any(2), masks.any(1)
    h, w = masks.shape[-2:]
    top, left = rows.float().argmax(1), cols.float().argmax(1)
    bottom = h - rows.flip(1).float().argmax(1)
    right = w - cols.flip(1).float().argmax(1)
    return torch.stack([left, top, right, bottom], 1).float()


def _target(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor,
    iscrowd: torch.Tensor,
    image_id: int,
    size: tuple[int, int],
) -> Target:
    return {
        "boxes": boxes.float().reshape(-1, 4),
        "labels": labels.long(),
        "masks": masks.bool(),
        "iscrowd": iscrowd.bool(),
        "image_id": int(image_id),
        "orig_size": (int(size[0]), int(size[1])),
    }


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a COCO annotation file is a JSON object, got a {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{path}: missing or not a list: {', '.join(missing)} (is this a COCO instances file?)")
    return data


class CocoInstances(Dataset):
    """A COCO instances JSON and its images: ``(rgb uint8 (3, H, W), target)`` samples at the size on disk (the
    target as in the module docstring, masks ``(n, H, W)``), or ``None`` for an unreadable image.

    ``image_root``: the images' folder, or a list of candidate folders (the first holding the first image is used).
    Annotations are checked when the file is read (unknown category, unknown image, unreadable segmentation form), so
    a broken file fails at start, naming itself, not hours into a run.
    """

    def __init__(self, annotation_file: str | Path, image_root: str | Path | Sequence[str | Path]) -> None:
        self.annotation_file = Path(annotation_file)
        data = _load_json(self.annotation_file)
        where = str(self.annotation_file)
        try:
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            self.category_ids = [int(c["id"]) for c in categories]
            self.class_names = [str(c.get("name", c["id"])) for c in categories]
            self.images = [
                {"id": int(im["id"]), "file_name": str(im["file_name"]), "size": (int(im["height"]), int(im["width"]))}
                for im in data["images"]
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: malformed category or image entry ({type(e).__name__}: {e})") from None
        if not self.images:
            raise ValueError(f"{where}: no images")
        index = {cid: i for i, cid in enumerate(self.category_ids)}
        self._annotations: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in data["annotations"]:
            what = f"{where}: annotation {ann.get('id', '?')}"
            try:
                image_id, category_id, bbox = int(ann["image_id"]), int(ann["category_id"]), ann["bbox"]
                segmentation = ann["segmentation"]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{what}: missing or malformed {e}") from None
            if category_id not in index:
                raise ValueError(f"{what}: category_id {category_id} is not in categories {self.category_ids}")
            if image_id not in self._annotations:
                raise ValueError(f"{what}: image_id {image_id} is not in images")
            if not (isinstance(bbox, list) and len(bbox) == 4):
                raise ValueError(f"{what}: bbox must be [x, y, w, h], got {bbox!r}")
            try:
                _check_segmentation(segmentation)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
            self._annotations[image_id].append(
                {
                    "id": ann.get("id", "?"),
                    "label": index[category_id],
                    "bbox": [float(v) for v in bbox],
                    "segmentation": segmentation,
                    "iscrowd": bool(ann.get("iscrowd", 0)),
                }
            )
        roots = [Path(image_root)] if isinstance(image_root, (str, Path)) else [Path(r) for r in image_root]
        first = self.images[0]["file_name"]
        self.image_root = next((r for r in roots if (r / first).is_file()), None)
        if self.image_root is None:
            tried = ", ".join(str(r / first) for r in roots)
            raise FileNotFoundError(f"{where}: first image not found (tried {tried}); is data.root the COCO folder?")
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target] | None:
        image = self.images[index]
        path = self.image_root / image["file_name"]
        try:
            rgb = read_image(path, 3)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if path not in self._warned:
                self._warned.add(path)
                warnings.warn(f"skipping unreadable image {path}: {e}", RuntimeWarning, stacklevel=2)
            return None
        height, width = image["size"]
        if rgb.shape[:2] != (height, width):
            found = f"{rgb.shape[0]}x{rgb.shape[1]}"
            raise ValueError(f"{path}: image is {found} but {self.annotation_file} says {height}x{width}")
        annotations = self._annotations[image["id"]]
        masks = np.zeros((len(annotations), height, width), dtype=bool)
        for i, ann in enumerate(annotations):
            try:
                masks[i] = segmentation_to_mask(ann["segmentation"], height, width)
            except ValueError as e:
                raise ValueError(f"{self.annotation_file}: annotation {ann['id']}: {e}") from None
        boxes = torch.tensor([ann["bbox"] for ann in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = _target(
            boxes,
            torch.tensor([ann["label"] for ann in annotations], dtype=torch.int64),
            torch.from_numpy(masks),
            torch.tensor([ann["iscrowd"] for ann in annotations], dtype=torch.bool),
            image["id"],
            (height, width),
        )
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))), target


class ProceduralInstances(Dataset):
    """``count`` rendered rooms of ``size`` pixels (stream ``seed``) as ``(rgb, target)``: one instance per object
    with at least one visible pixel, labelled by its shape (:data:`~swinlab.data.depth_scenes.OBJECT_KINDS`), its box
    the tight box of its mask; ``image_id`` is the scene index."""

    def __init__(self, count: int, size: int, seed: int) -> None:
        self.count, self.size, self.seed = count, size, seed
        self.class_names = list(OBJECT_KINDS)
        self.category_ids = list(range(len(OBJECT_KINDS)))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        if not 0 <= index < self.count:
            raise IndexError(f"scene {index} out of range for {self.count} scenes")
        scene = render_scene(self.size, self.seed, index)
        visible = [k for k in range(1, len(scene.kinds) + 1) if (scene.instances == k).any()]
        instances = torch.from_numpy(scene.instances)
        masks = instances[None] == torch.tensor(visible, dtype=torch.int64).view(-1, 1, 1)
        labels = torch.tensor([OBJECT_KINDS.index(scene.kinds[k - 1]) for k in visible], dtype=torch.int64)
        crowd = torch.zeros(len(visible), dtype=torch.bool)
        target = _target(boxes_from_masks(masks), labels, masks, crowd, index, scene.depth.shape)
        return torch.from_numpy(np.ascontiguousarray(scene.rgb.transpose(2, 0, 1))), target


class InstanceTransform:
    """``(rgb uint8 (3, H, W), target)`` -> ``(normalised float32 (3, S, S), target at S x S)``: resize (image
    bilinear, masks nearest, boxes scaled), then in training a horizontal flip with probability 0.5 when ``hflip``.
    Objects whose mask is empty after the resize are dropped."""

    def __init__(
        self, img_size: int, *, train: bool, mean: Sequence[float], std: Sequence[float], hflip: bool = True
    ) -> None:
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"instance images are RGB: need 3 means and 3 positive stds, got {mean}, {std}")
        self.img_size, self.hflip = img_size, hflip and train
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1) * 255.0

    @property
    def is_random(self) -> bool:
        return self.hflip

    def __call__(
        self, rgb: torch.Tensor, target: Target, rng: random.Random | None = None
    ) -> tuple[torch.Tensor, Target]:
        size = self.img_size
        h, w = rgb.shape[-2:]
        image = resize(rgb, (size, size))
        masks = target["masks"]
        if len(masks) and (h, w) != (size, size):
            masks = F.interpolate(masks[:, None].to(torch.uint8), size=(size, size), mode="nearest-exact")[:, 0] > 0
        elif not len(masks):
            masks = torch.zeros(0, size, size, dtype=torch.bool)
        boxes = target["boxes"] * torch.tensor([size / w, size / h, size / w, size / h])
        if self.hflip:
            if rng is None:
                raise ValueError("a random transform needs rng=random.Random(seed)")
            if rng.random() < 0.5:
                image, masks = image.flip(-1), masks.flip(-1)
                boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
        keep = masks.flatten(1).any(1)
        out = _target(
            boxes[keep].clamp(0, size), target["labels"][keep], masks[keep], target["iscrowd"][keep],
            target["image_id"], target["orig_size"],
        )  # fmt: skip
        return (image - self._mean) / self._std, out


class InstanceSamples(Dataset):
    """A source of ``(rgb, target)`` (or ``None``) with its transform, first ``limit`` samples, keyed by index or by
    ``(index, seed)`` as the train sampler gives (:mod:`swinlab.data.samplers`)."""

    def __init__(self, source: Dataset, transform: InstanceTransform, limit: int | None = None) -> None:
        self.source, self.transform = source, transform
        self.size = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Target] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        sample = self.source[index]
        if sample is None:
            return None
        rng = None
        if self.transform.is_random:
            rng = random.Random(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)
        return self.transform(*sample, rng)


def collate_instances(
    batch: list[tuple[torch.Tensor, Target] | None], image_shape: tuple[int, ...] = (3, 0, 0)
) -> tuple[torch.Tensor, list[Target]]:
    """Stack the images, keep the targets as a list (their object counts differ); unreadable samples (``None``) are
    dropped, and a batch with none left is ``(empty (0, *image_shape), [])``."""
    kept = [s for s in batch if s is not None]
    if not kept:
        return torch.empty(0, *image_shape), []
    return torch.stack([image for image, _ in kept]), [target for _, target in kept]


def _coco_sources(cfg: DataConfig) -> tuple[CocoInstances, CocoInstances]:
    if cfg.root is None:
        raise ValueError("data.name=coco_instances needs data.root (the COCO folder with the images)")
    root = Path(cfg.root).expanduser()
    sets = []
    for given, default in zip((cfg.train_list, cfg.val_list), COCO_ANNOTATIONS, strict=True):
        path = Path(given or default).expanduser()
        path = path if path.is_absolute() else root / path
        split_folder = path.stem.removeprefix("instances_")  # instances_val2017.json -> val2017/
        sets.append(CocoInstances(path, [root, root / split_folder]))
    return sets[0], sets[1]


def instance_sets(cfg: DataConfig) -> tuple[InstanceSamples, InstanceSamples]:
    """Train and val sets of ``cfg.name`` (one of :data:`INSTANCE_DATASETS`) with their transforms, capped by
    ``data.train_limit`` / ``data.val_limit`` (``procedural_instances``: those are the scene counts, default
    :data:`~swinlab.data.depth.PROCEDURAL_SIZES`, rendered at ``img_size``)."""
    if cfg.name == "procedural_instances":  # the streams of procedural_depth: the same rooms, other labels
        train_src = ProceduralInstances(cfg.train_limit or PROCEDURAL_SIZES[0], cfg.img_size, PROCEDURAL_STREAMS[0])
        val_src = ProceduralInstances(cfg.val_limit or PROCEDURAL_SIZES[1], cfg.img_size, PROCEDURAL_STREAMS[1])
    elif cfg.name == "coco_instances":
        train_src, val_src = _coco_sources(cfg)
    else:
        raise ValueError(f"{cfg.name!r} is not an instance segmentation dataset ({', '.join(INSTANCE_DATASETS)})")
    if train_src.category_ids != val_src.category_ids:
        raise ValueError(
            f"train and val categories differ: {train_src.category_ids} vs {val_src.category_ids} "
            "(class indices would mean different things)"
        )
    mean, std = tuple(cfg.mean or IMAGENET_MEAN), tuple(cfg.std or IMAGENET_STD)

    def transform(train: bool) -> InstanceTransform:
        return InstanceTransform(cfg.img_size, train=train, mean=mean, std=std, hflip=cfg.hflip)

    return (
        InstanceSamples(train_src, transform(True), cfg.train_limit),
        InstanceSamples(val_src, transform(False), cfg.val_limit),
    )
