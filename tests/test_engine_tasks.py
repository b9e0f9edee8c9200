"""The task seam: tasks by name, task-owned steps with several optimizers and loaders, task state, frozen helpers,
logged components and artefacts; a bilevel toy task killed with SIGKILL mid-epoch resumes bit-exactly."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from _bilevel_task import TASK, BilevelConfig, BilevelTask, toy_bilevel_mlp, write_recipe
from _ddp_worker import TinyNet, tiny_config, tiny_loaders
from swinlab.cli import main as cli_main
from swinlab.config import OptimConfig
from swinlab.engine import CheckpointError, Stepper, build_optimizers, fit, load_checkpoint
from swinlab.engine.distributed import DistEnv
from swinlab.engine.schedule import LRSchedule
from swinlab.engine.step import OptimizerSlot
from swinlab.tasks import ClassificationTask, FrozenModule, OptimizerSpec

TESTS = Path(__file__).resolve().parent
KILL_STEP = 8  # epoch 2 of 3 (6 steps an epoch), after its first two updates
TIMED = {"epoch_time", "steps_per_s", "samples_per_s"}


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMED} for row in rows]


def _assert_same_state(a, b, where: str = "") -> None:
    """Equal nested checkpoint states: tensors bit for bit, everything else by value."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _subprocess_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


# -- the bilevel toy task through `swinlab train` ----------------------------------------------------------------
FP8_SIZED = {"data.img_size": 16, "model.kwargs": "{hidden: 64}"}  # 256 -> 64 linears: large enough to become FP8


@pytest.mark.parametrize(
    ("precision", "order", "sized"),
    [("fp32", 1, {}), ("fp32", 2, {}), ("bf16", 2, {}), pytest.param("fp8-o2", 1, FP8_SIZED, marks=pytest.mark.slow)],
)
def test_bilevel_task_killed_mid_epoch_resumes_bit_exactly(tmp_path, precision, order, sized):
    settings = {"precision": precision, "task.order": order, "reuse_cpu_memory": False, **sized}
    full = write_recipe(tmp_path / "full.yaml", tmp_path / "full", **settings)
    assert cli_main(["train", str(full)]) == 0

    killed = write_recipe(tmp_path / "killed.yaml", tmp_path / "killed", **settings)
    proc = subprocess.run(
        [sys.executable, "-m", "swinlab", "train", str(killed)],
        env=_subprocess_env(BILEVEL_KILL_AT_STEP=str(KILL_STEP)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]  # SIGKILL: no handler, no clean-up ran
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    assert cli_main(["train", str(killed)]) == 0  # the same command resumes

    full_rows, resumed_rows = _rows(tmp_path / "full"), _rows(tmp_path / "killed")
    assert len(full_rows) == 3 and _untimed(full_rows) == _untimed(resumed_rows)
    assert {"lr_arch", "train_arch_loss", "train_alpha_entropy", "grad_norm_arch"} <= set(full_rows[0])
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("full", "killed"))
    for key in ("model", "optimizers", "task", "step", "best"):
        _assert_same_state(a[key], b[key], key)
    assert a["task"] == {"arch_updates": 18} and sorted(a["optimizers"]) == ["arch", "weights"]
    if precision == "fp8-o2":  # the weights' optimizer became FP8 (E4M3 first moments), the architecture's did not
        assert "fp8" in a["optimizers"]["weights"] and "fp8" not in a["optimizers"]["arch"]
    for epoch in (1, 2, 3):  # the artefact hook ran after every epoch, resumed or not
        name = f"alpha_epoch{epoch}.json"
        full_alpha, resumed_alpha = ((tmp_path / run / name).read_text() for run in ("full", "killed"))
        assert json.loads(full_alpha) == json.loads(resumed_alpha)
    assert float(full_rows[-1]["val_loss"]) < float(full_rows[0]["val_loss"])  # it learns


@pytest.mark.slow  # three torchrun launches of two processes each
@pytest.mark.parametrize("order", [1, 2])
def test_bilevel_task_under_two_ddp_ranks_resumes_bit_exactly(tmp_path, order):
    def torchrun(recipe: Path, **env: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "swinlab", "train", str(recipe)]  # fmt: skip
        return subprocess.run(cmd, env=_subprocess_env(**env), capture_output=True, text=True, timeout=600)

    settings = {"task.order": order, "data.batch_size": 4}  # per rank: the same global batch of 8
    full = write_recipe(tmp_path / "full.yaml", tmp_path / "full", **settings)
    killed = write_recipe(tmp_path / "killed.yaml", tmp_path / "killed", **settings)
    done = torchrun(full)
    assert done.returncode == 0, done.stderr[-3000:]
    assert torchrun(killed, BILEVEL_KILL_AT_STEP=str(KILL_STEP)).returncode != 0
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["epoch"] == 1
    resumed = torchrun(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert _untimed(_rows(tmp_path / "full")) == _untimed(_rows(tmp_path / "killed"))
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("full", "killed"))
    for key in ("model", "optimizers", "task", "step"):
        _assert_same_state(a[key], b[key], key)
    if order == 2:
        return  # each rank unrolls its own half batch: a second-order step is no average of per-sample terms
    # DDP averages what backward() computes over the ranks: two ranks of 4 train as one process of 8.
    single = write_recipe(tmp_path / "single.yaml", tmp_path / "single", **{"task.order": order})
    assert cli_main(["train", str(single), "--set", "reuse_cpu_memory=false"]) == 0
    one = load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model"]
    for name, value in one.items():
        torch.testing.assert_close(a["model"][name], value, atol=1e-5, rtol=0, msg=name)


def test_bilevel_second_order_differs_from_first_order(tmp_path):
    """The unrolled step is not a no-op: the architecture moves differently through it."""
    runs = {}
    for order in (1, 2):
        recipe = write_recipe(tmp_path / f"o{order}.yaml", tmp_path / f"o{order}", **{"task.order": order, "epochs": 1,
                              "reuse_cpu_memory": False})  # fmt: skip
        assert cli_main(["train", str(recipe)]) == 0
        runs[order] = load_checkpoint(tmp_path / f"o{order}" / "checkpoint.pt")["model"]["alpha"]
    assert not torch.allclose(runs[1], runs[2])


# -- the step the engine lends a task ------------------------------------------------------------------------------
class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([1.0, 2.0]))
        self.b = nn.Parameter(torch.tensor([3.0]))


def _stepper(model: nn.Module, **slots: list[nn.Parameter]) -> Stepper:
    flat = LRSchedule(lr=0.1, min_lr=0.1, warmup_lr=0.1, warmup_steps=0, total_steps=10, kind="constant")
    built = {}
    for name, params in slots.items():
        others = [p for key, ps in slots.items() if key != name for p in ps]
        optimizer = torch.optim.SGD(params, lr=0.1)
        built[name] = OptimizerSlot(name, optimizer, flat, others, torch.ones((), dtype=torch.bool))
    return Stepper(model, model, built, clip_grad=None, env=DistEnv(), autocast=contextlib.nullcontext)


def test_update_blocks_keep_each_optimizers_gradients_apart():
    model = _Pair()
    step = _stepper(model, first=[model.a], second=[model.b])
    step.begin(0, 2, first=True, last=False)
    with step.update("first"):
        step.backward((model.a * model.b).sum())  # touches b too
    assert model.b.grad is None  # what the block left on the other optimizer's parameter is gone
    torch.testing.assert_close(model.a.grad, torch.tensor([1.5, 1.5]))  # d/da = b, over a group of 2
    with step.update("second"):
        step.backward((model.a * model.b).sum())
    torch.testing.assert_close(model.a.grad, torch.tensor([1.5, 1.5]))  # a's accumulation is untouched
    torch.testing.assert_close(model.b.grad, torch.tensor([1.5]))
    step.begin(0, 2, first=False, last=True)
    with step.update("first"):  # the group's last micro-batch: the block's exit applies the update
        step.backward((model.a * model.b).sum())
    torch.testing.assert_close(model.a.detach(), torch.tensor([0.7, 1.7]))  # 1 - 0.1 * (1.5 + 1.5)
    assert model.a.grad is None and model.b.grad is not None and step.slots["second"].pending
    step.finish_group()  # what a group accumulated but no block applied (its last batch was empty)
    torch.testing.assert_close(model.b.detach(), torch.tensor([2.85]))


def test_step_misuse_is_named():
    model = _Pair()
    step = _stepper(model, first=[model.a], second=[model.b])
    with pytest.raises(RuntimeError, match=r"inside a `with step\.update"):
        step.backward(model.a.sum())
    with step.update("first"), pytest.raises(RuntimeError, match="do not nest"), step.update("second"):
        pass
    with pytest.raises(KeyError, match="no optimizer named 'third'"), step.update("third"):
        pass
    with step.update("first"), pytest.raises(ValueError, match="'first' optimizer"):
        step.add_grads([model.b], [torch.ones(1)])
    with pytest.raises(KeyError, match="no extra loader 'heldout'"):
        step.batch("heldout")


def test_build_optimizers_needs_every_parameter_in_exactly_one():
    class Split(BilevelTask):
        def __init__(self, specs):
            super().__init__(BilevelConfig())
            self.specs = specs

        def optimizers(self, model):
            return self.specs

    model = TinyNet()
    built = build_optimizers(model, Split({"head": OptimizerSpec(lambda n: n.startswith("head")),
                                           "rest": OptimizerSpec(lambda n: not n.startswith("head"),
                                                                 OptimConfig(name="sgd"))}), OptimConfig())  # fmt: skip
    assert isinstance(built["head"], torch.optim.AdamW) and isinstance(built["rest"], torch.optim.SGD)
    # the weight-decay rules hold inside each optimizer: norms and no_weight_decay() names are not decayed
    decayed = {id(p) for g in built["rest"].param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.fc1.weight)}
    with pytest.raises(ValueError, match=r"in no optimizer: .*fc1\.weight"):
        build_optimizers(model, Split({"head": OptimizerSpec(lambda n: n.startswith("head"))}), OptimConfig())
    with pytest.raises(ValueError, match=r"in several: head\.weight \(a, b\)"):
        build_optimizers(model, Split({"a": OptimizerSpec(), "b": OptimizerSpec(lambda n: "head" in n)}), OptimConfig())


def test_a_task_that_needs_a_missing_loader_says_which_setting_gives_it(tmp_path):
    model = toy_bilevel_mlp(num_classes=5, in_chans=8, img_size=1)  # TinyNet's data: 8 features
    task = BilevelTask(BilevelConfig())
    with pytest.raises(ValueError, match=r"loader\(s\) \['heldout'\].*data\.heldout_fraction"):
        fit(model, task, build_optimizers(model, task, OptimConfig()), *tiny_loaders(8), tiny_config(tmp_path))


# -- frozen helpers, logs, artefacts -------------------------------------------------------------------------------
class _WithTeacher(ClassificationTask):
    """Classification plus a frozen 'teacher' whose output the loss adds as a (constant) term."""

    def __init__(self, source: Path) -> None:
        super().__init__()
        self.teacher = nn.Linear(8, 5)
        self.source = source

    def frozen_modules(self):
        return {"teacher": FrozenModule(self.teacher, str(self.source))}

    def loss(self, model, batch):
        loss, logs = super().loss(model, batch)
        distill = self.teacher(batch[0]).square().mean()
        return loss, {**logs, "teacher_term": distill.detach()}


def test_frozen_helper_stays_out_of_training_and_its_file_is_pinned(tmp_path):
    source = tmp_path / "teacher.bin"
    source.write_bytes(b"weights v1")
    task = _WithTeacher(source)
    before = task.teacher.weight.detach().clone()
    model = TinyNet()
    cfg = tiny_config(tmp_path / "run", epochs=1)
    result = fit(model, task, build_optimizers(model, task, cfg.optim), *tiny_loaders(8), cfg)
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    assert torch.equal(task.teacher.weight, before)
    assert result["train_teacher_term"] > 0 and "train_teacher_term" in _rows(tmp_path / "run")[0]
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["frozen"]["teacher"]["source"] == str(source) and len(ckpt["frozen"]["teacher"]["sha256"]) == 64
    source.write_bytes(b"weights v2")
    more = tiny_config(tmp_path / "run", epochs=2)
    with pytest.raises(CheckpointError, match=r"frozen module 'teacher' .*sha256"):
        fit(model, task, build_optimizers(model, task, more.optim), *tiny_loaders(8), more)


def test_every_logged_component_reaches_tensorboard(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    source = tmp_path / "teacher.bin"
    source.write_bytes(b"w")
    task = _WithTeacher(source)
    model = TinyNet()
    cfg = tiny_config(tmp_path / "run", epochs=1, tensorboard=True)
    fit(model, task, build_optimizers(model, task, cfg.optim), *tiny_loaders(8), cfg)
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/teacher_term", "train/lr", "epoch/train_teacher_term", "epoch/val_top1"} <= tags


def test_the_task_is_chosen_by_name_and_refuses_data_it_cannot_read(tmp_path, capsys):
    recipe = TESTS.parent / "configs" / "swinv2_nano_fashion.yaml"
    code = cli_main(["train", str(recipe), "--set", "task=language_model", "--set", f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "task 'language_model' reads text batches, but data 'fashion_mnist_embedded' gives image batches" in err


def test_a_task_of_your_own_runs_by_import_path(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", epochs=1, reuse_cpu_memory=False)
    assert cli_main(["train", str(recipe)]) == 0
    cfg = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
    assert cfg["task"] == {"name": TASK, "order": 1, "arch_optim": cfg["task"]["arch_optim"]}
    assert cfg["task"]["arch_optim"]["lr"] == 3e-2
