"""The training loop on a tiny MLP: run-folder files, accumulation, non-finite steps, exact resume."""

from __future__ import annotations

import csv
import math

import pytest
import torch
import yaml

from _ddp_worker import TinyNet, run_tiny, tiny_config, tiny_loaders
from swinlab.config import OptimConfig, to_dict
from swinlab.engine import build_optimizer, fit, load_checkpoint
from swinlab.engine import loop as loop_module
from swinlab.tasks import ClassificationTask

# Columns that must not depend on wall-clock time.
DETERMINISTIC = ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "grad_norm",
                 "samples_seen", "samples_expected", "skipped_samples", "skipped_steps")  # fmt: skip


def _rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_fit_writes_the_run_folder(tmp_path):
    cfg = tiny_config(tmp_path / "run", epochs=2)
    _, result = run_tiny(cfg, batch_size=8)
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.csv", "curves.png", "checkpoint.pt", "best.pt"} <= {
        p.name for p in run.iterdir()
    }
    assert yaml.safe_load((run / "config.yaml").read_text()) == to_dict(cfg)
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["8", "16"]
    assert (
        rows[-1]["samples_seen"] == rows[-1]["samples_expected"] == "64"
        and rows[-1]["skipped_samples"] == "0"
    )
    assert float(rows[-1]["samples_per_s"]) > 0 and float(rows[-1]["val_top1"]) > 20  # learns something
    assert result["epochs_completed"] == 2 and result["run_dir"] == str(run)
    assert result["val_top1"] == pytest.approx(float(rows[-1]["val_top1"]))
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["best"]) == (2, 16, result["best"])
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_gradient_accumulation_equals_big_batch(tmp_path):
    big, _ = run_tiny(tiny_config(tmp_path / "big", epochs=1), batch_size=8)
    acc, result = run_tiny(tiny_config(tmp_path / "acc", epochs=1, accum_steps=4), batch_size=2)
    assert result["step"] == 8
    for (name, a), b in zip(big.state_dict().items(), acc.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)


def test_uneven_last_accumulation_group_and_max_steps(tmp_path):
    # 64 samples / batch 8 = 8 micro-batches; accum 3 -> groups of 3, 3, 2; max 2 steps -> 6 micro-batches.
    _, full = run_tiny(tiny_config(tmp_path / "a", epochs=1, accum_steps=3), batch_size=8)
    assert full["step"] == 3 and full["samples_seen"] == 64
    _, short = run_tiny(
        tiny_config(tmp_path / "b", epochs=1, accum_steps=3, max_steps_per_epoch=2), batch_size=8
    )
    assert short["step"] == 2 and short["samples_seen"] == short["samples_expected"] == 48


def test_non_finite_loss_skips_the_update(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    poisoned = x[4:8].clone()
    poisoned[0, 0] = float("inf")
    train = [(x[:4], y[:4]), (poisoned, y[4:8]), (x[8:12], y[8:12])]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = tiny_config(tmp_path, epochs=1)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient at step 1"):
        result = fit(model, ClassificationTask(), build_optimizer(model, cfg.optim), train, [(x, y)], cfg)
    assert result["skipped_steps"] == 1 and result["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # other steps applied
    assert math.isfinite(result["train_loss"])  # the mean over the finite batches


class _Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "full", epochs=3)
    full_model, _ = run_tiny(cfg, batch_size=8, drop=0.2)

    real_summary = loop_module._summary

    def kill_after_epoch_2(row, epochs):  # runs after the epoch's checkpoint is written
        if row["epoch"] == 2:
            raise _Killed
        return real_summary(row, epochs)

    killed_cfg = tiny_config(tmp_path / "killed", epochs=3)
    monkeypatch.setattr(loop_module, "_summary", kill_after_epoch_2)
    with pytest.raises(_Killed):
        run_tiny(killed_cfg, batch_size=8, drop=0.2)
    monkeypatch.undo()
    assert len(_rows(tmp_path / "killed")) == 2
    # A new process: different initial weights, RNG consumed differently; everything must come from the file.
    torch.manual_seed(123)
    torch.rand(7)
    resumed_model, result = run_tiny(killed_cfg, batch_size=8, drop=0.2, model_seed=99)
    assert result["epochs_completed"] == 3
    full_rows, resumed_rows = _rows(tmp_path / "full"), _rows(tmp_path / "killed")
    assert len(resumed_rows) == 3
    for a, b in zip(full_rows, resumed_rows, strict=True):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_false_starts_over(tmp_path):
    run_tiny(tiny_config(tmp_path, epochs=1), batch_size=8)
    _, result = run_tiny(tiny_config(tmp_path, epochs=1, resume=False), batch_size=8)
    assert result["step"] == 8 and len(_rows(tmp_path)) == 1


def test_eval_every_leaves_gaps_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = tiny_config(tmp_path, epochs=3, eval_every=2, tensorboard=True)
    run_tiny(cfg, batch_size=16)
    rows = _rows(tmp_path)
    assert [r["val_top1"] != "" for r in rows] == [False, True, True]  # epoch 2 and the last one
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_skipped_samples_are_counted(tmp_path):
    train, val = tiny_loaders(8)
    lossy = [
        (x[:-1], y[:-1]) if i == 0 else (x, y) for i, (x, y) in enumerate(train)
    ]  # one sample "unreadable"

    class Lossy(list):  # a loader that reports its sampler like a DataLoader does
        sampler, batch_size = train.sampler, train.batch_size

    model = TinyNet()
    cfg = tiny_config(tmp_path, epochs=1)
    with pytest.warns(RuntimeWarning, match="1 unreadable training samples"):
        result = fit(model, ClassificationTask(), build_optimizer(model, cfg.optim), Lossy(lossy), val, cfg)
    assert (result["samples_seen"], result["samples_expected"], result["skipped_samples"]) == (63, 64, 1)


def test_fit_under_bf16_autocast(tmp_path):
    from swinlab.engine import precision

    torch.manual_seed(0)
    model = TinyNet()
    cfg = tiny_config(tmp_path, epochs=1, precision="bf16")
    model, optimizer, autocast = precision.wrap(model, build_optimizer(model, cfg.optim), cfg.precision)
    train, val = tiny_loaders(16)
    result = fit(model, ClassificationTask(), optimizer, train, val, cfg, autocast=autocast)
    assert result["skipped_steps"] == 0 and 0 < result["train_loss"] < 10
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 master weights


def test_lr_mult_scales_the_scheduled_rate_of_matching_parameters(tmp_path):
    """optim.lr_mult: each group's scheduled rate is multiplied by its ``lr_scale`` at every step."""
    optim = OptimConfig(lr=0.05, warmup_epochs=0, schedule="constant", lr_mult={"fc1": 10.0})
    model, _ = run_tiny(tiny_config(tmp_path, epochs=1, optim=optim), batch_size=8)
    optimizer = build_optimizer(model, optim)
    fc1 = {id(model.fc1.weight), id(model.fc1.bias)}
    for group in optimizer.param_groups:
        assert group["lr_scale"] == (10.0 if any(id(p) in fc1 for p in group["params"]) else 1.0)
    cfg = tiny_config(tmp_path / "b", epochs=1, optim=optim, max_steps_per_epoch=1)
    train, val = tiny_loaders(8)
    fit(model, ClassificationTask(), optimizer, train, val, cfg)
    rates = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
    assert rates == pytest.approx({1.0: 0.05, 10.0: 0.5})


def test_step_logs_land_on_multiples_of_log_every_across_epochs(tmp_path, monkeypatch):
    """8 steps an epoch, log_every=3: steps 3, 6, 9, 12, 15 (not restarted per epoch: 3, 6, 11, 14)."""
    from swinlab.engine.runlog import RunLog

    logged = []
    monkeypatch.setattr(RunLog, "log_step", lambda self, step, scalars: logged.append(step))
    run_tiny(tiny_config(tmp_path, epochs=2, log_every=3), batch_size=8)
    assert logged == [3, 6, 9, 12, 15]
