"""``build(cfg.data)``: the one place a DataConfig becomes train/val loaders the engine can use unchanged."""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from swinlab.config import DataConfig
from swinlab.data import text
from swinlab.data.cifar import CIFAR
from swinlab.data.depth import DEPTH_DATASETS, IMAGENET_MEAN, IMAGENET_STD, depth_sets
from swinlab.data.idx import FashionMNIST
from swinlab.data.imagefolder import ImageFolder
from swinlab.data.instances import INSTANCE_DATASETS, collate_instances, instance_sets
from swinlab.data.loading import SeededSubset, TransformedDataset, collate_skip_none
from swinlab.data.samplers import SeededDistributedSampler, ShardSampler
from swinlab.data.transforms import ImageTransform
from swinlab.data.video import VIDEO_DATASETS, video_sets

DATASETS = (
    "fashion_mnist_embedded", "fashion_mnist", "imagefolder", "cifar10", "cifar100",
    *VIDEO_DATASETS, *text.TEXT_DATASETS, *DEPTH_DATASETS, *INSTANCE_DATASETS,
)  # fmt: skip
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` puts the full set: the default root of ``fashion_mnist``."""


@dataclass(frozen=True)
class DataBundle:
    """What the engine needs from the data side; ``train_size`` / ``val_size`` count all ranks together.

    ``kind`` names what a batch is (``"image"``: ``(NCHW, labels)``; ``"video"``: ``(NCTHW, labels)`` for
    training and ``(N, views, C, T, H, W)`` for evaluation; ``"text"``: ``(inputs, next-token targets)``, both
    ``(N, seq_len)`` int64, with ``num_classes`` the vocabulary size; ``"depth"``: ``(NCHW normalised RGB,
    (N, 1, H, W) float32 depth in metres, 0 = invalid)``; ``"instances"``: ``(NCHW normalised RGB, list of N target
    dicts)``, see :mod:`swinlab.data.instances`); the trainer picks the task from it.
    ``model_kwargs`` are the constructor arguments the data fixes (class count, channels, input size), so the
    trainer builds any family's model without knowing what kind of data it gets. ``extra_loaders`` holds further
    training loaders by name (``heldout``: the part of the training set ``data.heldout_fraction`` sets aside).
    """

    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    in_chans: int
    class_names: list[str]
    train_size: int
    val_size: int
    kind: str = "image"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    extra_loaders: dict[str, DataLoader] = field(default_factory=dict)
    unit: str = "images"
    """What a sample is, for :meth:`describe`."""
    seed: int = 0
    """The run seed the loaders were built for; with ``rank`` it seeds a task's own random streams (SimMIM's masks),
    so each rank draws its own and a rerun the same."""
    rank: int = 0
    mean: tuple[float, ...] | None = None
    """Per-channel mean the image batches were normalised with (to turn them back into pictures); ``None``: no
    image data."""
    std: tuple[float, ...] | None = None
    category_ids: tuple[int, ...] = ()
    """``instances``: the dataset's category id of each class index (COCO ids, to compare predictions with an
    official annotation file); empty for other kinds."""

    def describe(self) -> str:
        """One line for the start of a run: sizes, what a sample is, classes (or vocabulary; none for dense labels)."""
        heldout = "".join(f" + {len(loader.sampler)} {name}" for name, loader in self.extra_loaders.items())
        classes = f"vocabulary {self.num_classes}" if self.kind == "text" else f"{self.num_classes} classes"
        sizes = f"{self.train_size}{heldout} train / {self.val_size} val {self.unit}"
        return f"{sizes}, {classes}" if self.num_classes else sizes


def _root(cfg: DataConfig, what: str) -> Path:
    if cfg.root is None:
        raise ValueError(f"data.root is required for data.name={cfg.name!r} ({what})")
    return Path(cfg.root).expanduser()


def _sources(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    """The raw (uint8 CHW) train and val sets for ``cfg.name``."""
    name = cfg.name
    if name == "fashion_mnist_embedded":
        return FashionMNIST(EMBEDDED_DIR, train=True), FashionMNIST(EMBEDDED_DIR, train=False)
    if name == "fashion_mnist":
        if cfg.root is None and DEBIAN_FASHION_MNIST.is_dir():
            root = DEBIAN_FASHION_MNIST
        else:
            root = _root(cfg, "the folder with train-images-idx3-ubyte.gz etc.")
        return FashionMNIST(root, train=True), FashionMNIST(root, train=False)
    if name in ("cifar10", "cifar100"):
        n = int(name[5:])
        root = _root(cfg, f"cifar-{n}{'-batches-py' if n == 10 else '-python'} or the folder holding it")
        return CIFAR(root, train=True, num_classes=n), CIFAR(root, train=False, num_classes=n)
    if name == "imagefolder":
        root = _root(cfg, "a folder with train/<class>/* and val/<class>/*")
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root not found: {root}")
        channels = cfg.in_chans or 3
        train = ImageFolder(root / "train", channels=channels)
        return train, ImageFolder(root / "val", channels=channels, classes=train.classes)
    close = difflib.get_close_matches(name, DATASETS, n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown dataset data.name={name!r}{hint} (choose from {', '.join(DATASETS)})")


def _loader(
    cfg: DataConfig, dataset: Dataset, batch_size: int, sampler: Sampler, drop_last: bool, seed: int, collate=None
) -> DataLoader:
    """A DataLoader with its own seeded generator: it never draws from the global RNG, otherwise persistent
    workers (no draw after the first epoch) would shift the sampler's per-epoch seed relative to num_workers=0."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate,
    )


def _split_heldout(cfg: DataConfig, train_set: Dataset) -> tuple[Dataset, Dataset | None]:
    """The training set and, with ``heldout_fraction`` f > 0, its last f part as a second set (as the official DARTS
    search: the first ``floor((1 - f) n)`` samples train the weights, the rest the architecture)."""
    if not 0.0 <= cfg.heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction must be in [0, 1), got {cfg.heldout_fraction}")
    if cfg.heldout_fraction == 0:
        return train_set, None
    n = len(train_set)
    split = math.floor((1.0 - cfg.heldout_fraction) * n)
    if split == 0 or split == n:
        raise ValueError(f"data.heldout_fraction={cfg.heldout_fraction} leaves an empty part of {n} training samples")
    return SeededSubset(train_set, range(split)), SeededSubset(train_set, range(split, n))


def _loaders(
    cfg: DataConfig,
    train_set: Dataset,
    val_set: Dataset,
    sample_shapes: tuple[tuple[int, ...], tuple[int, ...]],
    seed: int,
    rank: int,
    world_size: int,
    collate=None,
) -> tuple[DataLoader, DataLoader, dict[str, DataLoader]]:
    """Train loader (seeded distributed sampler, per-sample augmentation seeds), val loader (rank shard) and the
    ``heldout`` loader when the config sets one aside; ``sample_shapes`` give the shape of an all-unreadable
    batch's samples for training and validation (``collate``: another batching function, shapes unused)."""

    def loader(dataset: Dataset, batch_size: int, sampler: Sampler, drop_last: bool, shape) -> DataLoader:
        batching = collate or functools.partial(collate_skip_none, sample_shape=shape)
        return _loader(cfg, dataset, batch_size, sampler, drop_last, seed, batching)

    def shuffled(dataset: Dataset, sampler_seed: int) -> DataLoader:
        sampler = SeededDistributedSampler(dataset, world_size, rank, shuffle=True, seed=sampler_seed)
        # drop_last keeps batch statistics steady, but never for a set that is a single batch or less
        return loader(dataset, cfg.batch_size, sampler, len(sampler) > cfg.batch_size, sample_shapes[0])

    train_set, heldout_set = _split_heldout(cfg, train_set)
    extra = {} if heldout_set is None else {"heldout": shuffled(heldout_set, seed + 1)}
    val_sampler = ShardSampler(len(val_set), rank, world_size)
    val_loader = loader(val_set, cfg.eval_batch_size or cfg.batch_size, val_sampler, False, sample_shapes[1])
    return shuffled(train_set, seed), val_loader, extra


def _video_bundle(cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> DataBundle:
    """Clips ``(B, 3, T, H, W)`` for training, views ``(B, V, 3, T, H, W)`` for evaluation."""
    train_set, val_set = video_sets(cfg, seed)
    shapes = (train_set.sample_shape, val_set.sample_shape)
    train_loader, val_loader, extra = _loaders(cfg, train_set, val_set, shapes, seed, rank, world_size)
    classes = train_set.classes
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=len(classes),
        in_chans=3,
        class_names=list(classes),
        train_size=len(train_loader.sampler.dataset),
        val_size=len(val_set),
        kind="video",
        model_kwargs={"num_classes": len(classes), "in_chans": 3},
        extra_loaders=extra,
        unit="videos",
        seed=seed,
        rank=rank,
    )


def _depth_bundle(cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> DataBundle:
    """``(image, depth)`` pairs (see :mod:`swinlab.data.depth`): training crops, whole validation frames."""
    train_set, val_set = depth_sets(cfg)
    train_loader, val_loader, extra = _loaders(
        cfg, train_set, val_set, ((), ()), seed, rank, world_size, collate=torch.utils.data.default_collate
    )
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=0,
        in_chans=3,
        class_names=[],
        train_size=len(train_loader.sampler.dataset),
        val_size=len(val_set),
        kind="depth",
        model_kwargs={"image_size": cfg.img_size},
        extra_loaders=extra,
        unit="depth maps",
        seed=seed,
        rank=rank,
        mean=tuple(cfg.mean or IMAGENET_MEAN),
        std=tuple(cfg.std or IMAGENET_STD),
    )


def _instances_bundle(cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> DataBundle:
    """``(images, targets)`` batches (see :mod:`swinlab.data.instances`): flipped for training, fixed for validation."""
    train_set, val_set = instance_sets(cfg)
    collate = functools.partial(collate_instances, image_shape=(3, cfg.img_size, cfg.img_size))
    train_loader, val_loader, extra = _loaders(cfg, train_set, val_set, ((), ()), seed, rank, world_size, collate)
    source = train_set.source
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=len(source.class_names),
        in_chans=3,
        class_names=list(source.class_names),
        train_size=len(train_loader.sampler.dataset),
        val_size=len(val_set),
        kind="instances",
        model_kwargs={"image_size": cfg.img_size},
        extra_loaders=extra,
        seed=seed,
        rank=rank,
        mean=tuple(cfg.mean or IMAGENET_MEAN),
        std=tuple(cfg.std or IMAGENET_STD),
        category_ids=tuple(source.category_ids),
    )


def _text_bundle(cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> DataBundle:
    """Byte windows (see :mod:`swinlab.data.text`): random ones for training, a fixed tiling for validation.

    An epoch draws ``len(train bytes) // seq_len`` windows (as many bytes as the training text holds), capped
    by ``train_limit``; ``val_limit`` caps the validation windows.
    """
    if cfg.heldout_fraction:
        raise ValueError("data.heldout_fraction is for image and video sets; text windows have no held-out split yet")
    if cfg.name == "stdlib_docs":
        docs = text.stdlib_docs()
    else:
        docs = text.text_files(_root(cfg, "a .txt file or a folder of .txt files"))
    train_bytes, val_bytes = text.split_documents(docs)
    train_set = text.ByteWindows(train_bytes, cfg.seq_len, what="the training text")
    val_set = text.ByteWindows(val_bytes, cfg.seq_len, stride=cfg.seq_len, what="the validation text")
    windows = max(1, train_bytes.numel() // cfg.seq_len)
    windows = min(windows, cfg.train_limit) if cfg.train_limit else windows
    per_rank = -(-windows // world_size)
    val_size = min(len(val_set), cfg.val_limit) if cfg.val_limit else len(val_set)

    def loader(dataset: Dataset, batch_size: int, sampler: Sampler, drop_last: bool) -> DataLoader:
        return _loader(cfg, dataset, batch_size, sampler, drop_last, seed)

    train_sampler = text.RandomWindowSampler(len(train_set), per_rank, seed, rank, world_size)
    val_sampler = ShardSampler(val_size, rank, world_size)
    return DataBundle(
        train_loader=loader(train_set, cfg.batch_size, train_sampler, per_rank > cfg.batch_size),
        val_loader=loader(val_set, cfg.eval_batch_size or cfg.batch_size, val_sampler, False),
        num_classes=text.VOCAB_SIZE,
        in_chans=0,
        class_names=[],
        train_size=per_rank * world_size,
        val_size=val_size,
        kind="text",
        model_kwargs={"vocab_size": text.VOCAB_SIZE, "block_size": cfg.seq_len},
        unit=f"windows of {cfg.seq_len} bytes",
        seed=seed,
        rank=rank,
    )


def build(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Train loader: ``DistributedSampler`` semantics (call ``sampler.set_epoch``), random augmentation.
    Val loader: ``rank::world_size`` shard without padding, deterministic transform. Batches are
    ``(float32 NCHW normalised, int64 labels)``; unreadable samples are dropped, so a batch may be short."""
    if cfg.batch_size < 1 or (cfg.eval_batch_size is not None and cfg.eval_batch_size < 1):
        raise ValueError(
            f"batch sizes must be >= 1, got batch_size={cfg.batch_size}, eval_batch_size={cfg.eval_batch_size}"
        )
    if cfg.num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.name in VIDEO_DATASETS:
        return _video_bundle(cfg, seed=seed, rank=rank, world_size=world_size)
    if cfg.name in text.TEXT_DATASETS:
        return _text_bundle(cfg, seed=seed, rank=rank, world_size=world_size)
    if cfg.name in DEPTH_DATASETS:
        return _depth_bundle(cfg, seed=seed, rank=rank, world_size=world_size)
    if cfg.name in INSTANCE_DATASETS:
        return _instances_bundle(cfg, seed=seed, rank=rank, world_size=world_size)
    train_src, val_src = _sources(cfg)
    in_chans = train_src.channels
    out_chans = cfg.in_chans or in_chans
    mean, std = tuple(cfg.mean or train_src.mean), tuple(cfg.std or train_src.std)

    def transform(train: bool) -> ImageTransform:
        return ImageTransform(
            cfg.img_size, train=train, augment=cfg.augment, hflip=cfg.hflip, mean=mean, std=std, in_chans=in_chans,
            out_chans=out_chans,
        )  # fmt: skip

    train_set = TransformedDataset(train_src, transform(True), cfg.train_limit)
    val_set = TransformedDataset(val_src, transform(False), cfg.val_limit)
    shape = (out_chans, cfg.img_size, cfg.img_size)
    train_loader, val_loader, extra = _loaders(cfg, train_set, val_set, (shape, shape), seed, rank, world_size)
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=len(train_src.classes),
        in_chans=out_chans,
        class_names=list(train_src.classes),
        train_size=len(train_loader.sampler.dataset),
        val_size=len(val_set),
        model_kwargs={"num_classes": len(train_src.classes), "in_chans": out_chans, "img_size": cfg.img_size},
        extra_loaders=extra,
        seed=seed,
        rank=rank,
        mean=mean,
        std=std,
    )
