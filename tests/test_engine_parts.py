"""Engine building blocks in isolation: weight-decay split, LR schedule, precision seam, checkpoints, task."""

from __future__ import annotations

import itertools
import math
import random
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _ddp_worker import TinyNet
from swinlab.config import OptimConfig
from swinlab.engine import (
    CheckpointError,
    build_optimizer,
    load_checkpoint,
    param_groups,
    precision,
)
from swinlab.engine import checkpoint as ckpt_io
from swinlab.engine.schedule import LRSchedule, build_schedule
from swinlab.tasks import ClassificationTask


def _group_names(model: nn.Module, groups) -> list[set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


# -- optimizer ---------------------------------------------------------------------------------------------
def test_param_groups_follow_official_no_weight_decay_rules():
    model = TinyNet()
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decay_names, no_decay_names = _group_names(model, [decay, no_decay])
    assert decay_names == {"fc1.weight", "head.weight"}
    assert no_decay_names == {
        "fc1.bias", "head.bias", "norm.weight", "norm.bias",  # ndim <= 1
        "pos_embed",  # no_weight_decay()
        "logit_scale", "cpb_mlp.weight", "cpb_mlp.bias",  # no_weight_decay_keywords(); logit_scale: (h, 1, 1)
    }  # fmt: skip


def test_param_groups_without_model_hooks_skip_frozen_and_empty_groups():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
    assert _group_names(model, groups) == [{"0.bias", "1.weight", "1.bias"}]


def test_build_optimizer_kinds_and_errors():
    model = TinyNet()
    assert isinstance(build_optimizer(model, OptimConfig(name="adamw")), torch.optim.AdamW)
    sgd = build_optimizer(model, OptimConfig(name="SGD", momentum=0.9))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer(model, OptimConfig(name="lamb"))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, OptimConfig())


# -- schedule ----------------------------------------------------------------------------------------------
def test_cosine_schedule_key_points():
    cfg = OptimConfig(lr=1e-3, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=1.0)
    s = build_schedule(cfg, steps_per_epoch=10, epochs=5)
    assert (s.warmup_steps, s.total_steps) == (10, 50)
    assert s.lr_at(0) == pytest.approx(1e-6)  # warm-up start
    assert s.lr_at(5) == pytest.approx((1e-6 + 1e-3) / 2)  # linear
    assert s.lr_at(10) == pytest.approx(1e-3)  # warm-up end = peak
    assert s.lr_at(30) == pytest.approx((1e-3 + 1e-5) / 2)  # cosine midpoint
    assert s.lr_at(50) == pytest.approx(1e-5) and s.lr_at(80) == pytest.approx(1e-5)  # ends at min_lr
    decay = [s.lr_at(t) for t in range(10, 51)]
    assert all(a >= b for a, b in itertools.pairwise(decay)) and decay[-2] > 1e-5


def test_constant_schedule_and_no_warmup():
    s = build_schedule(
        OptimConfig(lr=0.1, schedule="constant", warmup_epochs=0.5), steps_per_epoch=4, epochs=3
    )
    assert [s.lr_at(t) for t in (0, 1, 2, 5, 11, 40)] == pytest.approx(
        [s.warmup_lr, 0.05 + s.warmup_lr / 2, 0.1, 0.1, 0.1, 0.1]
    )
    s = LRSchedule(lr=0.1, min_lr=0.0, warmup_lr=0.0, warmup_steps=0, total_steps=4)
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(4) == 0.0


def test_linear_lr_scaling_follows_the_global_batch(tmp_path, capsys):
    recipe = OptimConfig(lr=5e-4, warmup_lr=5e-7, min_lr=5e-6, lr_scaling="linear", base_batch=512)
    s = build_schedule(recipe, steps_per_epoch=10, epochs=2, global_batch=1024)  # official Swin: 5e-4 x 1024 / 512
    assert (s.lr, s.warmup_lr, s.min_lr) == pytest.approx((1e-3, 1e-6, 1e-5))
    assert build_schedule(OptimConfig(lr=5e-4), steps_per_epoch=10, epochs=2, global_batch=1024).lr == 5e-4
    with pytest.raises(ValueError, match=r"optim\.lr_scaling='sqrt'"):
        build_schedule(OptimConfig(lr_scaling="sqrt"), steps_per_epoch=10, epochs=2)
    # through the engine: batch 8 x accumulation 2 = 16 against a base of 64 -> a quarter, said at start
    optim = OptimConfig(lr=0.2, warmup_epochs=0, schedule="constant", lr_scaling="linear", base_batch=64)
    from _ddp_worker import run_tiny, tiny_config

    _, result = run_tiny(tiny_config(tmp_path, epochs=1, optim=optim, accum_steps=2), batch_size=8)
    assert result["lr"] == pytest.approx(0.05)
    assert "scaled linearly by global batch 16 / 64: lr 0.2 -> 0.05" in capsys.readouterr().out


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown LR schedule 'step'"):
        build_schedule(OptimConfig(schedule="step"), steps_per_epoch=2, epochs=2)
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        build_schedule(OptimConfig(), steps_per_epoch=0, epochs=2)


# -- precision ---------------------------------------------------------------------------------------------
def test_precision_fp32_and_bf16():
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    m, o, autocast = precision.wrap(model, opt, "fp32")
    assert m is model and o is opt
    with autocast():
        assert m(torch.randn(2, 4)).dtype == torch.float32
    _, _, autocast = precision.wrap(model, opt, "bf16")
    with autocast():
        assert model(torch.randn(2, 4)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        precision.wrap(model, opt, "fp16")


def test_precision_fp8_levels_convert_and_unknown_levels_are_clear_errors():
    model = nn.Sequential(nn.Linear(64, 64))
    _, opt, _ = precision.wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp8-o2")
    assert type(opt).__name__ == "FP8SGD" and model[0].weight.dtype == torch.float16
    with pytest.raises(ValueError, match="fp8-o9"):
        precision.wrap(model, None, "fp8-o9")


# -- checkpoints -------------------------------------------------------------------------------------------
def _state(value: float) -> dict:
    return {
        "model": {"w": torch.full((3,), value)},
        "optimizers": {"model": {}},
        "task": {},
        "frozen": {},
        "epoch": 1,
        "step": 10,
        "config": {"epochs": 2},
        "history": [{"epoch": 1, "train_loss": 0.5}],
        "rng": ckpt_io.rng_state(),
        "best": None,
    }


def test_checkpoint_roundtrip(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt_io.save_checkpoint(path, _state(1.0))
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.ones(3))
    assert loaded["history"] == [{"epoch": 1, "train_loss": 0.5}] and loaded["best"] is None
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files left


def test_checkpoint_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    ckpt_io.save_checkpoint(path, _state(1.0))

    def crash(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_io.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_corrupt_and_foreign_checkpoints_fail_clearly(tmp_path):
    good = tmp_path / "good.pt"
    ckpt_io.save_checkpoint(good, _state(1.0))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a swinlab training checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing"):
        ckpt_io.save_checkpoint(tmp_path / "x.pt", {"model": {}})
    old = tmp_path / "v1.pt"  # swinlab 0.1's layout: one optimizer, no task section
    torch.save({"format": ckpt_io.FORMAT, "version": 1, **_state(1.0)}, old)
    with pytest.raises(CheckpointError, match=r"version 1.*start a new run folder"):
        load_checkpoint(old)


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    ckpt_io.save_checkpoint(path, _state(0.0))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt_io.set_rng_state(load_checkpoint(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


# -- classification task -----------------------------------------------------------------------------------
def test_classification_task_loss_kinds():
    model = TinyNet()
    x, y = torch.randn(6, 8), torch.randint(0, 5, (6,))
    plain, logs = ClassificationTask().loss(model, (x, y))
    assert torch.allclose(plain, nn.functional.cross_entropy(model(x), y)) and logs["loss"] == plain
    smooth, _ = ClassificationTask(label_smoothing=0.1).loss(model, (x, y))

    def smoothed_one_hot(images, labels):  # what Mixup returns with both alphas at 0
        return images, torch.full((6, 5), 0.1 / 5).scatter_(1, labels[:, None], 0.9 + 0.1 / 5)

    soft, _ = ClassificationTask(mixup=smoothed_one_hot).loss(model, (x, y))
    assert torch.allclose(smooth, soft, atol=1e-6) and not torch.allclose(smooth, plain)
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationTask(label_smoothing=1.0)


@pytest.mark.parametrize("num_classes", [3, 5])
def test_classification_task_evaluate_and_finalize(num_classes):
    model = TinyNet(num_classes=num_classes)
    batches = [(torch.randn(4, 8), torch.randint(0, num_classes, (4,))) for _ in range(3)]
    task = ClassificationTask()
    sums = {k: float(v) for k, v in task.evaluate(model, batches).items()}
    metrics = task.finalize(sums)
    logits = torch.cat([model(x) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert sums["count"] == 12
    assert metrics["val_top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert metrics["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item(), rel=1e-6)
    assert ("val_top5" in metrics) == (num_classes >= 5)
    if num_classes >= 5:
        assert metrics["val_top5"] == 100.0
    assert task.finalize({k: 0.0 for k in sums}) == {}  # an empty shard everywhere
    assert math.isfinite(metrics["val_loss"])


# -- allocator ---------------------------------------------------------------------------------------------

_FAULTS_OF_REPEATED_BLOCKS = """
import resource, sys, torch
from swinlab.engine.allocator import reuse_freed_memory
took = reuse_freed_memory() if sys.argv[1] == "reuse" else None
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)  # 64 MiB, above glibc's largest mmap threshold; freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
warmup = [faults() for _ in range(2)]
print(took, sum(faults() for _ in range(8)))
"""


@pytest.mark.slow  # two fresh interpreters counting page faults
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reuse_freed_memory_spares_the_page_faults_of_repeated_large_tensors():
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS_OF_REPEATED_BLOCKS, mode], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
        return out[0], int(out[1])

    took, reused = run("reuse")
    _, system = run("system")
    pages = (64 << 20) // resource.getpagesize()
    assert took == "True"
    assert system > 7 * pages  # glibc maps the block anew each time: all 8 blocks fault every page again
    # Kept in the heap: a block lands on pages already in place. Small allocations in between can fragment the
    # freed block, and the heap then grows once or twice more before every block fits: the steady state of a loop.
    assert reused < 3 * pages
