"""``task: ait_joint`` through the engine: one TaskSolver learns depth codes (on the run's depth data) and object
sequences (on the task's own instances data) in the same steps, is scored by depth metrics and COCO AP, resumes on the
same instances batches after a kill; wrong tokenizers and data are errors naming the key."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _ait_tiny import DEPTH_TOKENIZER, MASK_TOKENIZER, base, solver_kwargs, train_tokenizer
from swinlab.config import ConfigError, DataConfig, ModelConfig, OptimConfig, to_dict
from swinlab.data import build
from swinlab.engine import build_run_model, build_task, evaluate, load_checkpoint, run_evaluation, train
from swinlab.engine import loop as loop_module
from swinlab.recipe import TrainConfig, from_dict, load_config
from swinlab.tasks.ait_depth import AitDepthConfig
from swinlab.tasks.ait_insseg import AitInsSegConfig
from swinlab.tasks.ait_joint import AitJointConfig, InstanceStream
from swinlab.tasks.ait_tokenizer import AitMaskTokenizerConfig, AitTokenizerConfig

pytest.importorskip("pycocotools", reason="COCO AP needs pycocotools (pip install 'swinlab[coco]')")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
OBJECTS = 4
SOLVER = solver_kwargs(
    {"drop_path_rate": 0.0},  # no random paths: a step's gradients are reproducible
    num_bins=32,
    num_classes=2,
    codes={"mask": 16, "depth": 16},
    prompts=["depth", "insseg"],
    max_length=OBJECTS * 21,
)
DEPTH_DATA = DataConfig(name="procedural_depth", img_size=32, train_limit=24, val_limit=4, batch_size=8)
INSTANCES_DATA = DataConfig(name="procedural_instances", img_size=32, train_limit=40, val_limit=4, batch_size=8)
"""3 depth batches per epoch, 5 instances batches per stream epoch: the stream's epochs straddle the run's."""
TIMED = {"epoch_time", "steps_per_s", "samples_per_s"}


def _base(out: Path, data: DataConfig = DEPTH_DATA) -> dict:
    return base(out, data)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ait_joint")
    runs = []
    for name, kwargs, task, data in (
        ("ait_depth_vqvae", DEPTH_TOKENIZER, AitTokenizerConfig(recon_images=0), DEPTH_DATA),
        ("ait_insseg_vqvae", MASK_TOKENIZER, AitMaskTokenizerConfig(recon_images=0), INSTANCES_DATA),
    ):
        runs.append(train_tokenizer(root / name, name, kwargs, task, data, lr=2e-3))
    return runs[0], runs[1]


def _cfg(out: Path, tokenizers: tuple[Path, Path], solver: dict | None = None, **task) -> TrainConfig:
    values = {
        "depth_tokenizer": str(tokenizers[0]),
        "mask_tokenizer": str(tokenizers[1]),
        "instances_data": INSTANCES_DATA,
        "depth": AitDepthConfig(depth_images=2),
        "insseg": AitInsSegConfig(num_objects=OBJECTS, mask_images=2),
        **task,
    }
    return TrainConfig(
        model=ModelConfig(name="ait_task_solver", kwargs=solver or SOLVER),
        task=AitJointConfig(**values),
        optim=OptimConfig(lr=2e-3, warmup_epochs=0.0),
        epochs=3,
        **_base(out),
    )


def _build(cfg: TrainConfig):
    bundle = build(cfg.data, seed=cfg.seed)
    task = build_task(cfg, bundle)
    torch.manual_seed(0)
    return bundle, task, build_run_model(cfg, bundle, task, torch.device("cpu"), pretrained=None)


class _RecordingStep:
    """The part of the engine's Step a task's train_step uses, recording each backward's loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = self.module = model
        self.losses: list[torch.Tensor] = []

    @contextlib.contextmanager
    def update(self, name=None):
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())
        loss.backward()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_a_step_is_the_weighted_sum_of_both_tasks_losses(tokenizers, tmp_path):
    _, task, model = _build(_cfg(tmp_path / "step", tokenizers, depth_weight=0.5, insseg_weight=2.0))
    depth_batch = next(iter(build(DEPTH_DATA, seed=0).train_loader))
    start = task.state_dict()
    step = _RecordingStep(model)
    logs = task.train_step(step, depth_batch)
    joint = _grads(model)
    assert len(step.losses) == 2 and all(torch.isfinite(x) for x in step.losses)
    for key in ("loss", "depth_ce", "depth_aux_silog", "insseg_ce", "insseg_aux_mask"):
        assert torch.isfinite(logs[key]), key
    assert logs["loss"] == pytest.approx(float(0.5 * logs["depth_loss"] + 2.0 * logs["insseg_loss"]))
    # each task's prompt (row 0: depth, row 1: insseg) and position table get a gradient: both losses reached it
    assert all(joint["prompt_embed"][t].abs().sum() > 0 for t in (0, 1))
    assert all(joint["position_embed"][t].abs().sum() > 0 for t in (0, 1))
    assert task.state_dict() == {"insseg": {"sequences_built": 1}, "instances": {"epoch": 0, "drawn": 1}}

    task.load_state_dict(start)  # the same instances batch and sequences again, each loss on its own
    task.depth.loss(model, depth_batch)[0].backward()
    depth_grads = _grads(model)
    task.insseg.loss(model, next(task.stream))[0].backward()
    insseg_grads = _grads(model)
    assert set(joint) == set(depth_grads) == set(insseg_grads)
    for name, grad in joint.items():
        expected = 0.5 * depth_grads[name] + 2.0 * insseg_grads[name]
        torch.testing.assert_close(grad, expected, msg=lambda m, n=name: f"{n}: {m}")
    assert depth_grads["backbone.patch_embed.proj.weight"].abs().sum() > 0
    assert insseg_grads["backbone.patch_embed.proj.weight"].abs().sum() > 0


def test_evaluation_reports_both_tasks_without_collisions(tokenizers, tmp_path):
    bundle, task, model = _build(_cfg(tmp_path / "eval", tokenizers, depth_weight=0.5, insseg_weight=2.0))
    metrics = run_evaluation(model, task, bundle.val_loader)
    assert set(task.metric_names) <= set(metrics)
    assert metrics["val_loss"] == pytest.approx(0.5 * metrics["val_depth_loss"] + 2.0 * metrics["val_insseg_loss"])
    assert metrics["val_rmse"] > 0 and metrics["val_d1"] <= 1
    for key in ("val_mask_ap", "val_mask_ap50", "val_box_ap", "val_box_ap50"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    lines = task.summary(metrics, metrics["val_rmse"], 1)
    assert any(line.startswith("depth RMSE") for line in lines) and any("COCO mask AP" in line for line in lines)


def test_instance_stream_state_restores_the_same_batches(tmp_path):
    loader = build(INSTANCES_DATA, seed=3).train_loader  # 5 batches a stream epoch

    def draw(stream: InstanceStream, n: int) -> list[torch.Tensor]:
        return [next(stream)[0] for _ in range(n)]

    torch.manual_seed(0)
    first = InstanceStream(loader, seed=3)
    draw(first, 4)
    state = first.state_dict()
    expected = draw(first, 4)  # crosses into stream epoch 1
    assert first.state_dict() == {"epoch": 1, "drawn": 3}

    torch.manual_seed(123)  # another global random state: the stream must not depend on it
    resumed = InstanceStream(loader, seed=3)
    resumed.load_state_dict(state)
    got = draw(resumed, 4)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert not torch.equal(expected[0], expected[1])  # real draws, not one batch repeated
    restarted = InstanceStream(loader, seed=3)
    assert not torch.equal(draw(restarted, 5)[0], got[1])  # stream epoch 1 is another order than epoch 0


class _Killed(Exception):
    pass


def test_trains_both_tasks_and_resumes_after_kill_on_the_same_batches(tokenizers, tmp_path, monkeypatch):
    train(_cfg(tmp_path / "full", tokenizers))
    real_summary = loop_module._summary

    def kill_after_epoch_1(row, epochs):  # runs after the epoch's checkpoint is written
        if row["epoch"] == 1:
            raise _Killed
        return real_summary(row, epochs)

    monkeypatch.setattr(loop_module, "_summary", kill_after_epoch_1)
    with pytest.raises(_Killed):
        train(_cfg(tmp_path / "killed", tokenizers))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["task"]["instances"] == {"epoch": 0, "drawn": 3}
    torch.manual_seed(99)  # a new process's random state: everything must come from the checkpoint
    train(_cfg(tmp_path / "killed", tokenizers))

    rows = {}
    for run in ("full", "killed"):
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            rows[run] = [{k: v for k, v in r.items() if k not in TIMED} for r in csv.DictReader(f)]
    assert len(rows["full"]) == 3 and rows["full"] == rows["killed"]
    last = rows["full"][-1]
    for key in ("train_depth_ce", "train_depth_aux_silog", "train_insseg_ce", "train_insseg_aux_mask", "val_rmse",
                "val_d1", "val_mask_ap", "val_box_ap", "val_depth_loss", "val_insseg_loss", "val_loss"):  # fmt: skip
        assert last[key] != "", key
    losses = [float(r["train_loss"]) for r in rows["full"]]
    assert losses[-1] < losses[0], losses

    full, killed = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("full", "killed"))
    for key, value in full["model"].items():
        assert torch.equal(value, killed["model"][key]), key
    # 3 steps an epoch x 3 epochs = 9 instances batches: stream epoch 0 (5) and 4 of epoch 1
    assert full["task"] == killed["task"] == {"insseg": {"sequences_built": 9}, "instances": {"epoch": 1, "drawn": 4}}
    assert set(full["frozen"]) == {"depth_tokenizer", "mask_tokenizer"}
    assert full["frozen"]["mask_tokenizer"]["source"] == str(tokenizers[1] / "checkpoint.pt")
    assert not any(k.startswith("tokenizer") or "_vq_vae" in k for k in full["model"])
    assert (tmp_path / "full" / "depth_epoch3.png").is_file() and (tmp_path / "full" / "insseg_epoch3.png").is_file()


@pytest.mark.slow  # a torchrun launch of two processes
def test_two_ranks_shard_the_instances_and_score_the_whole_validation_sets(tokenizers, tmp_path):
    """Under DDP each rank draws its own shard of the instances set (2 of its 5 batches a stream epoch), and the
    metrics the two ranks report together equal a one-process evaluation of the checkpoint rank 0 saved (greedy
    decoding: sampled objects would depend on the rank; the teacher-forced losses depend on the batches' make-up)."""
    insseg = AitInsSegConfig(num_objects=OBJECTS, mask_images=2, top_p=0.0)
    cfg = _cfg(tmp_path / "ddp_run", tokenizers, insseg=insseg)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(to_dict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "swinlab",
           "train", str(recipe)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # one depth batch a step per rank (12 maps each), 3 steps: stream epoch 0 (2 batches) and 1 of epoch 1
    assert load_checkpoint(tmp_path / "ddp_run" / "checkpoint.pt")["task"]["instances"] == {"epoch": 1, "drawn": 1}
    with open(tmp_path / "ddp_run" / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    alone = evaluate(tmp_path / "ddp_run")
    for key in ("val_rmse", "val_d1", "val_abs_rel", "val_mask_ap", "val_mask_ap50", "val_box_ap", "val_box_ap50"):
        assert float(last[key]) == pytest.approx(alone[key], rel=1e-5, abs=1e-9), key


def test_wrong_tokenizers_and_data_name_the_key(tokenizers, tmp_path):
    depth_run, mask_run = tokenizers
    cases = [
        ({"depth_tokenizer": None}, ValueError, r"task\.depth_tokenizer is required"),
        ({"mask_tokenizer": str(tmp_path / "nowhere")}, FileNotFoundError, r"task\.mask_tokenizer: no tokenizer"),
        ({"mask_tokenizer": str(depth_run)}, TypeError,
         r"task\.mask_tokenizer: .* holds a depth tokenizer; task ait_joint needs a mask tokenizer"),
        ({"depth_tokenizer": str(mask_run)}, TypeError,
         r"task\.depth_tokenizer: .* holds a mask tokenizer; task ait_joint needs a depth tokenizer"),
        ({"instances_data": None}, ValueError, r"task\.instances_data is required"),
        ({"instances_data": DEPTH_DATA}, ValueError,
         r"task\.instances_data\.name must be instance segmentation data .* got 'procedural_depth'"),
        ({"depth": AitDepthConfig(tokenizer=str(depth_run))}, ValueError, r"task\.depth\.tokenizer: a joint recipe"),
    ]  # fmt: skip
    for task, error, message in cases:
        cfg = _cfg(tmp_path / "errors", tokenizers, **task)
        with pytest.raises(error, match=message):
            build_task(cfg, build(cfg.data, seed=0))
    with pytest.raises(ValueError, match=r"add 'insseg' to model\.kwargs\.prompts"):
        _build(_cfg(tmp_path / "prompts", tokenizers, {**SOLVER, "prompts": ["depth"]}))
    with pytest.raises(ValueError, match=r"set model\.kwargs\.codes\.depth: 16"):
        _build(_cfg(tmp_path / "codes", tokenizers, {**SOLVER, "codes": {"mask": 16}}))
    cfg = _cfg(tmp_path / "d", tokenizers)
    with pytest.raises(ValueError, match=r"reads depth batches, but data 'procedural_instances'"):
        build_task(dataclasses.replace(cfg, data=INSTANCES_DATA), build(INSTANCES_DATA, seed=0))
    with pytest.raises(ConfigError, match=r"task\.instances_data\.batchsize.*did you mean batch_size"):
        from_dict({"task": {"name": "ait_joint", "instances_data": {"name": "procedural_instances", "batchsize": 8}}})


def test_nano_recipe_loads():
    cfg = load_config(CONFIGS / "ait_joint_nano.yaml")
    task, kwargs = cfg.task, cfg.model.kwargs
    assert task.name == "ait_joint" and cfg.data.name == "procedural_depth"
    assert task.depth_tokenizer == "runs/ait_tokenizer_depth_nano"
    assert task.mask_tokenizer == "runs/ait_tokenizer_mask_nano"
    assert task.instances_data.name == "procedural_instances" and task.instances_data.img_size == cfg.data.img_size
    assert kwargs["max_length"] == task.insseg.num_objects * 21 and set(kwargs["prompts"]) == {"depth", "insseg"}
