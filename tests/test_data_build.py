"""build(): the embedded real Fashion-MNIST subset, sharding, seeding, limits, collate and config errors."""

import dataclasses
import itertools

import pytest
import torch

from swinlab.config import DataConfig
from swinlab.data import (
    EMBEDDED_DIR,
    FASHION_MNIST_CLASSES,
    FashionMNIST,
    ShardSampler,
    build,
    collate_skip_none,
)


@pytest.fixture(scope="module")
def embedded():
    return build(DataConfig(batch_size=50), seed=0)


def test_embedded_files_small_and_licensed():
    sizes = {p.name: p.stat().st_size for p in EMBEDDED_DIR.glob("*.gz")}
    assert len(sizes) == 4 and sum(sizes.values()) < 8e6
    assert "Expat" in (EMBEDDED_DIR / "LICENSE").read_text()
    assert "0.0~git20200523.55506a9-1" in (EMBEDDED_DIR / "README.md").read_text()


def test_embedded_real_data(embedded):
    b = embedded
    assert (b.num_classes, b.in_chans, b.train_size, b.val_size) == (10, 1, 12000, 2000)
    assert b.class_names == FASHION_MNIST_CLASSES
    val = FashionMNIST(EMBEDDED_DIR, train=False)
    assert torch.bincount(torch.as_tensor(val.labels)).tolist() == [200] * 10
    batches = list(itertools.islice(b.val_loader, 4))
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (
        abs(x.mean().item()) < 0.15 and 0.85 < x.std().item() < 1.15
    )  # normalised with the Fashion-MNIST stats
    x, y = next(iter(b.train_loader))
    assert x.shape == (50, 1, 32, 32) and y.min() >= 0 and y.max() < 10


def test_limits_take_balanced_prefix():
    b = build(DataConfig(train_limit=40, val_limit=30, batch_size=40, augment="none"), seed=0)
    assert (b.train_size, b.val_size) == (40, 30)
    _, y = next(iter(b.train_loader))
    assert torch.bincount(y, minlength=10).tolist() == [4] * 10
    assert len(b.train_loader) == 1  # one batch only: drop_last off, nothing lost


def test_drop_last_only_with_more_than_one_batch():
    b = build(DataConfig(train_limit=25, val_limit=25, batch_size=10), seed=0)
    assert [len(y) for _, y in b.train_loader] == [10, 10]
    assert [len(y) for _, y in b.val_loader] == [10, 10, 5]


def test_val_shards_cover_every_sample_once():
    cfg = DataConfig(val_limit=45, eval_batch_size=8, augment="none")
    seen = []
    for rank in range(2):
        b = build(cfg, seed=0, rank=rank, world_size=2)
        seen += [x for x, _ in b.val_loader]
    full = torch.cat([x for x, _ in build(cfg, seed=0).val_loader])
    shards = torch.cat(seen)
    assert len(shards) == 45
    key = lambda t: sorted(map(tuple, t.flatten(1)[:, ::37].tolist()))
    assert key(shards) == key(full)
    assert list(ShardSampler(5, 1, 2)) == [1, 3] and len(ShardSampler(5, 0, 2)) == 3


def test_train_sampler_shards_and_set_epoch():
    b0 = build(DataConfig(train_limit=20, batch_size=4), seed=3, rank=0, world_size=2)
    b1 = build(DataConfig(train_limit=20, batch_size=4), seed=3, rank=1, world_size=2)
    i0 = [i for i, _ in b0.train_loader.sampler]
    i1 = [i for i, _ in b1.train_loader.sampler]
    assert sorted(i0 + i1) == list(range(20))
    b0.train_loader.sampler.set_epoch(1)
    assert [i for i, _ in b0.train_loader.sampler] != i0


def _epoch(loader):
    return torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])


def test_train_epoch_reproducible_under_manual_seed():
    cfg = DataConfig(train_limit=24, batch_size=8)
    b = build(cfg, seed=0)
    torch.manual_seed(7)
    x1, y1 = next(iter(b.train_loader))
    torch.manual_seed(7)
    x2, y2 = next(iter(b.train_loader))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = next(iter(b.train_loader))
    assert not torch.equal(x1, x3)  # the global RNG moved on: new crops


def test_workers_see_the_same_augmentation():
    """Per-sample seeds come from the main process, so persistent workers reproduce the in-process epoch."""
    data = {}
    for workers in (0, 1):
        b = build(DataConfig(train_limit=16, batch_size=8, num_workers=workers), seed=0)
        assert b.train_loader.persistent_workers == (workers > 0)
        for epoch in (0, 1):
            b.train_loader.sampler.set_epoch(epoch)
            torch.manual_seed(100 + epoch)
            data[workers, epoch] = torch.cat([x for x, _ in b.train_loader])
    assert torch.equal(data[0, 0], data[1, 0]) and torch.equal(data[0, 1], data[1, 1])


def test_channels_and_normalisation_overrides():
    b = build(DataConfig(in_chans=3, val_limit=4, mean=(0.5,), std=(0.5,), augment="none"), seed=0)
    x, _ = next(iter(b.val_loader))
    assert b.in_chans == 3 and x.shape[1] == 3 and torch.equal(x[:, 0], x[:, 2])
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="cannot turn 1-channel images into 2"):
        build(DataConfig(in_chans=2), seed=0)


def test_collate_drops_none():
    x, y = collate_skip_none([None, (torch.zeros(1, 2, 2), 3), None])
    assert x.shape == (1, 1, 2, 2) and y.tolist() == [3]
    x, y = collate_skip_none([None, None], sample_shape=(1, 2, 2))
    assert x.shape == (0, 1, 2, 2) and y.shape == (0,)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean cifar10"):
        build(DataConfig(name="cifar_10"), seed=0)
    with pytest.raises(ValueError, match=r"data\.root is required"):
        build(DataConfig(name="cifar100"), seed=0)
    with pytest.raises(FileNotFoundError):
        build(DataConfig(name="fashion_mnist", root=str(tmp_path / "missing")), seed=0)
    with pytest.raises(ValueError, match="unknown augment"):
        build(DataConfig(augment="strong"), seed=0)
    with pytest.raises(ValueError, match="batch sizes"):
        build(DataConfig(batch_size=0), seed=0)
    with pytest.raises(ValueError, match="rank"):
        build(DataConfig(), seed=0, rank=2, world_size=2)


def test_train_seeds_differ_across_ranks():
    seeds = []
    for rank in (0, 1):
        sampler = build(DataConfig(train_limit=20), seed=0, rank=rank, world_size=2).train_loader.sampler
        torch.manual_seed(5)  # every rank seeds its global RNG the same way
        seeds += [s for _, s in sampler]
    assert len(set(seeds)) == 20


def test_heldout_fraction_sets_the_last_part_aside_as_a_second_loader():
    cfg = DataConfig(name="fashion_mnist_embedded", train_limit=40, heldout_fraction=0.25, batch_size=10,
                     augment="none")
    bundle = build(cfg, seed=0)
    heldout = bundle.extra_loaders["heldout"]
    assert bundle.train_size == 30 and len(heldout.sampler) == 10  # floor((1 - f) n) train, the rest held out
    train_images = torch.cat([x for x, _ in bundle.train_loader])
    held_images = torch.cat([x for x, _ in heldout])
    plain = build(dataclasses.replace(cfg, heldout_fraction=0.0, val_limit=1), seed=0).train_loader.dataset
    first = torch.stack([plain[i][0] for i in range(40)])  # the set in file order, without augmentation
    assert sorted(_rows_of(train_images, first)) == list(range(30))
    assert sorted(_rows_of(held_images, first)) == list(range(30, 40))
    assert "30 + 10 heldout train" in bundle.describe()
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="heldout_fraction must be in"):
            build(dataclasses.replace(cfg, heldout_fraction=bad), seed=0)
    with pytest.raises(ValueError, match="leaves an empty part"):
        build(dataclasses.replace(cfg, train_limit=1, heldout_fraction=0.5), seed=0)


def _rows_of(images: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """For each image, the index of the equal image in ``reference``."""
    return [int((reference == image).flatten(1).all(1).nonzero()[0]) for image in images]
