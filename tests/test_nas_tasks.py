"""DARTS through the one engine (``task: darts_search``, ``task: darts_eval``): artefacts every epoch, α and its Adam
in the checkpoint, a search killed with SIGKILL mid-epoch resumes bit-exactly (first and second order), and the
evaluation network trains from a published genotype and from a JSON one."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from swinlab.cli import main as cli_main
from swinlab.config import apply_overrides
from swinlab.engine import load_checkpoint
from swinlab.nas import genotypes, load_genotype, save_genotype
from swinlab.tasks import task_class
from swinlab.tasks.darts import DartsEvalConfig, DartsEvalTask, DartsSearchTask

TESTS = Path(__file__).resolve().parent
TIMED = {"epoch_time", "steps_per_s", "samples_per_s"}
KILLING = "test_nas_tasks:KillingSearch"
KILL_STEP = 3  # epoch 2 of 3 (2 steps an epoch), after its first update


class KillingSearch(DartsSearchTask):
    """The search task that SIGKILLs its process at the start of optimizer step ``$NAS_KILL_AT_STEP``."""

    def train_step(self, step, batch):
        if os.environ.get("NAS_KILL_AT_STEP") == str(step.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(step, batch)


def _recipe(path: Path, output_dir: Path, **overrides: object) -> Path:
    values = {
        "task.name": "darts_search", "model.name": "darts_search", "model.kwargs": "{C: 2, layers: 3}",
        "data.name": "fashion_mnist_embedded", "data.img_size": 16, "data.augment": "light", "data.train_limit": 32,
        "data.heldout_fraction": 0.5, "data.val_limit": 16, "data.batch_size": 4, "epochs": 3, "threads": 1,
        "clip_grad": 5.0, "optim.name": "sgd", "optim.lr": 0.025, "optim.min_lr": 0.001, "optim.weight_decay": 3e-4,
        "optim.warmup_epochs": 0, "task.arch_learning_rate": 3e-2, "output_dir": str(output_dir), "log_every": 1,
        "reuse_cpu_memory": False, **overrides,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(apply_overrides({}, [f"{k}={v}" for k, v in values.items()])))
    return path


def _eval_recipe(path: Path, output_dir: Path, genotype: str, **overrides: object) -> Path:
    values = {
        "task.name": "darts_eval", "model.name": "darts_cifar",
        "model.kwargs": f"{{genotype: '{genotype}', C: 2, layers: 3, auxiliary: true}}",
        "data.name": "fashion_mnist_embedded", "data.img_size": 32, "data.augment": "light", "data.train_limit": 16,
        "data.val_limit": 8, "data.batch_size": 4, "epochs": 2, "threads": 1, "clip_grad": 5.0, "optim.name": "sgd",
        "optim.lr": 0.025, "optim.min_lr": 0.0, "optim.warmup_epochs": 0, "task.drop_path_epochs": 2,
        "task.cutout_length": 8, "output_dir": str(output_dir), "reuse_cpu_memory": False, **overrides,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(apply_overrides({}, [f"{k}={v}" for k, v in values.items()])))
    return path


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMED} for row in csv.DictReader(f)]


def _same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_darts_tasks_are_registered():
    assert task_class("darts_search") is DartsSearchTask and task_class("darts_eval") is DartsEvalTask


def test_search_writes_genotypes_alpha_history_and_cell_pictures(tmp_path):
    run = tmp_path / "run"
    assert cli_main(["train", str(_recipe(tmp_path / "r.yaml", run, epochs=2))]) == 0
    for name in ("genotype.json", "genotype_epoch1.json", "genotype_epoch2.json"):
        genotype = load_genotype(run / name)
        assert len(genotype.normal) == 8 and genotype.normal_concat == [2, 3, 4, 5]
    assert (run / "genotype.json").read_text() == (run / "genotype_epoch2.json").read_text()
    for name in ("cells.png", "cells_epoch1.png", "cells_epoch2.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((run / "alphas.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["arch_updates"] == 8
    assert len(history[0]["normal"]) == 14 and len(history[0]["normal"][0]) == 8
    assert history[0]["normal"] != history[1]["normal"]  # α moves
    assert 0 <= history[1]["skip_count"] <= 8 and 0 < history[1]["skip_share"] < 1
    rows = _rows(run)
    assert {"train_loss", "train_skip_share", "train_skip_count", "val_loss", "val_top1"} <= set(rows[0])
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["model"]["alphas_normal"].shape == (14, 8)
    assert ckpt["task"]["arch_updates"] == 8 and ckpt["task"]["arch_optimizer"]["state"]  # α's Adam moments
    adam = ckpt["task"]["arch_optimizer"]["param_groups"][0]
    assert adam["betas"] == (0.5, 0.999) and adam["weight_decay"] == 1e-3
    groups = ckpt["optimizers"]["weights"]["param_groups"]  # the official SGD: plain momentum, decay everywhere
    assert all(not g["nesterov"] and g["weight_decay"] == 3e-4 and g["momentum"] == 0.9 for g in groups)


@pytest.mark.parametrize("unrolled", [False, True])
def test_search_killed_mid_epoch_resumes_bit_exactly(tmp_path, unrolled):
    settings = {"task.name": KILLING, "task.unrolled": unrolled, "data.train_limit": 16}
    full = _recipe(tmp_path / "full.yaml", tmp_path / "full", **settings)
    assert cli_main(["train", str(full)]) == 0
    killed = _recipe(tmp_path / "killed.yaml", tmp_path / "killed", **settings)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "NAS_KILL_AT_STEP": str(KILL_STEP)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "swinlab", "train", str(killed)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    assert cli_main(["train", str(killed)]) == 0  # the same command resumes

    assert _rows(tmp_path / "full") == _rows(tmp_path / "killed")
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("full", "killed"))
    for key in ("model", "optimizers", "task", "step"):
        _same(a[key], b[key], key)
    assert a["task"]["arch_updates"] == 6
    for name in ("alphas.json", "genotype.json", "genotype_epoch2.json"):
        assert (tmp_path / "full" / name).read_text() == (tmp_path / "killed" / name).read_text()


@pytest.mark.slow
def test_second_order_moves_alpha_differently(tmp_path):
    alphas = {}
    for unrolled in (False, True):
        run = tmp_path / f"u{unrolled}"
        assert cli_main(["train", str(_recipe(tmp_path / f"{unrolled}.yaml", run, epochs=1, **{
            "task.unrolled": unrolled}))]) == 0  # fmt: skip
        alphas[unrolled] = load_checkpoint(run / "checkpoint.pt")["model"]["alphas_normal"]
    assert not torch.allclose(alphas[False], alphas[True])


@pytest.mark.parametrize("source", ["name", "json", "run_folder"])
def test_eval_trains_a_genotype_with_the_auxiliary_loss_and_drop_path(tmp_path, source):
    if source == "name":
        genotype = "DARTS_V2"
    else:
        folder = tmp_path / "search"
        folder.mkdir()
        save_genotype(genotypes.DARTS_V1, folder / "genotype.json")
        genotype = str(folder / "genotype.json") if source == "json" else str(folder)
    run = tmp_path / "run"
    assert cli_main(["train", str(_eval_recipe(tmp_path / "e.yaml", run, genotype))]) == 0
    rows = _rows(run)
    assert len(rows) == 2 and {"train_loss", "train_loss_aux", "val_top1"} <= set(rows[0])
    assert [float(r["train_drop_path_prob"]) for r in rows] == pytest.approx([0.0, 0.1])  # 0.2 * epoch / 2
    state = load_checkpoint(run / "checkpoint.pt")["model"]
    assert "auxiliary_head.classifier.weight" in state and state["stem.0.weight"].shape[1] == 1  # 1 channel
    ops = {"normal": genotypes.DARTS_V2.normal if source == "name" else genotypes.DARTS_V1.normal}
    assert state["cells.0._ops.0.op.1.weight"].shape[-1] == int(ops["normal"][0][0][-1])  # sep_conv_3x3: 3 x 3


def test_eval_cutout_and_drop_path_ramp():
    task = DartsEvalTask(DartsEvalConfig(cutout_length=8, drop_path_prob=0.2, drop_path_epochs=4))
    assert [task.drop_path_prob(e) for e in (0, 2, 4, 6)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    torch.manual_seed(0)
    out = task.cutout(torch.ones(64, 1, 32, 32))
    zeros = (out == 0).flatten(1).sum(1)
    assert int(zeros.max()) == 64 and int(zeros.min()) >= 16  # an 8 x 8 square, clipped at the borders to >= 4 x 4
    assert DartsEvalTask(DartsEvalConfig(drop_path_epochs=None)).drop_path_prob(0) == 0.2


def test_eval_refuses_a_missing_auxiliary_head_and_a_wrong_model(tmp_path, capsys):
    recipe = _eval_recipe(tmp_path / "e.yaml", tmp_path / "run", "DARTS_V2")
    assert cli_main(["train", str(recipe), "--set", "model.kwargs.auxiliary=false"]) != 0
    assert "model.kwargs.auxiliary: true" in capsys.readouterr().err
    recipe = _recipe(tmp_path / "s.yaml", tmp_path / "run2", **{"model.name": "darts_cifar", "model.kwargs": "{C: 2}"})
    assert cli_main(["train", str(recipe)]) != 0
    assert "model.name: darts_search" in capsys.readouterr().err
