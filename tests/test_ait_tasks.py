"""AiT tasks through the engine: ``task: ait_tokenizer`` trains a depth SoftVQVAE on procedural depth maps, logs its
components, scores reconstructions with the official depth metrics, draws them, and resumes exactly;
``task: ait_mask_tokenizer`` trains a mask SoftVQVAE on box-cropped instance masks and scores their IoU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from swinlab.ait import SoftVQVAE, crop_masks
from swinlab.config import DataConfig, ModelConfig, OptimConfig
from swinlab.data import build
from swinlab.engine import build_run_model, build_task, evaluate, load_checkpoint, run_evaluation, train
from swinlab.metrics.depth import mean_depth_metrics
from swinlab.recipe import TrainConfig, load_config
from swinlab.tasks.ait_tokenizer import (
    AitMaskTokenizerConfig,
    AitMaskTokenizerTask,
    AitTokenizerConfig,
    AitTokenizerTask,
    mask_iou,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# 32 px maps, downsample 8: 4x4 tokens, 16 codes of 16 dims, one residual block.
TINY = {"image_size": 32, "downsample": 8, "num_codes": 16, "code_dim": 16, "width": 16, "num_res_blocks": 1}
UNTIMED = {"epoch_time", "steps_per_s", "samples_per_s"}


def _cfg(out: Path, **overrides) -> TrainConfig:
    base = {
        "model": ModelConfig(name="ait_depth_vqvae", kwargs=TINY),
        "data": DataConfig(name="procedural_depth", img_size=32, train_limit=128, val_limit=8, batch_size=8),
        "task": AitTokenizerConfig(mask_ratio=0.5, mask_patch_size=8, recon_images=3),
        # constant after the warm-up: a run stopped early and continued has the same rates as one run through
        "optim": OptimConfig(lr=1e-3, weight_decay=0.0, warmup_epochs=0.25, schedule="constant"),
        "epochs": 3,
        "threads": 1,
        "reuse_cpu_memory": False,
        "output_dir": str(out),
    }
    return TrainConfig(**{**base, **overrides})


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in UNTIMED} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ait") / "run"
    train(_cfg(out))
    return out


def _initial(cfg: TrainConfig) -> tuple[SoftVQVAE, AitTokenizerTask, object]:
    bundle = build(cfg.data, seed=cfg.seed)
    task = build_task(cfg, bundle)
    torch.manual_seed(cfg.seed)
    return build_run_model(cfg, bundle, task, torch.device("cpu"), pretrained=None), task, bundle


def test_tokenizer_task_learns_logs_and_draws(tokenizer_run):
    rows = _rows(tokenizer_run)
    assert len(rows) == 3
    for key in ("train_loss", "train_recon_loss", "train_vq_loss", "train_perplexity", "train_usage", "val_rmse",
                "val_d1", "val_abs_rel", "val_silog", "val_usage", "val_perplexity"):  # fmt: skip
        assert rows[-1][key] != "", key
    model, task, bundle = _initial(_cfg(tokenizer_run))
    untrained = run_evaluation(model, task, bundle.val_loader)["val_rmse"]
    trained = [float(row["val_rmse"]) for row in rows]
    losses = [float(row["train_loss"]) for row in rows]
    # measured: untrained 4.0 m; 6.7, 2.3, 1.1 m after the epochs; training loss 17.0 -> 8.8 -> 2.0
    assert trained[-1] < 0.5 * untrained and losses[-1] < 0.3 * losses[0], (untrained, trained, losses)
    ckpt = load_checkpoint(tokenizer_run / "checkpoint.pt")
    assert {"_vq_vae._embedding", "_vq_vae._ema_cluster_size", "_vq_vae._ema_w"} <= set(ckpt["model"])
    assert ckpt["task"] == {"masks_drawn": 3 * 16}  # one mask draw per micro-batch: 128 maps / 8 per batch x 3
    for epoch in (1, 2, 3):
        with Image.open(tokenizer_run / f"depth_epoch{epoch}.png") as picture:
            # 2 rows (depth, reconstruction) x 3 maps of 32 px enlarged 3x to 96, 2 px gaps
            assert picture.size == (3 * 96 + 2 * 2, 2 * 96 + 2) and picture.mode == "L"
    again = evaluate(tokenizer_run)
    assert again["val_rmse"] == pytest.approx(trained[-1], rel=1e-6)
    assert any("reconstruction RMSE" in line for line in again["summary"])


def test_evaluation_is_the_official_validation_by_hand(tokenizer_run):
    """encode -> decode of every validation map, clipped at min_depth, per-image metrics averaged; codebook usage
    over the set from the ids."""
    cfg = _cfg(tokenizer_run)
    model, task, bundle = _initial(cfg)
    model.load_state_dict(load_checkpoint(tokenizer_run / "checkpoint.pt")["model"])
    got = run_evaluation(model, task, bundle.val_loader)
    depth = torch.cat([batch[1] for batch in bundle.val_loader])
    ids = model.encode(depth)
    with torch.no_grad():
        recon = model.decode_ids(ids).clamp_min(1e-3)
    for name, value in mean_depth_metrics(recon, depth).items():
        assert got[f"val_{name}"] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    counts = torch.bincount(ids.flatten(), minlength=model.num_codes).double()
    assert got["val_usage"] == pytest.approx(float((counts > 0).double().mean()))
    probs = counts / counts.sum()
    assert got["val_perplexity"] == pytest.approx(float(torch.exp(-(probs * torch.log(probs + 1e-10)).sum())))


def test_eigen_crop_and_depth_range_reach_the_metrics():
    """The task's evaluation options are the metric function's: Eigen crop (scaled to 48 x 64), 0.5 < gt < 6."""
    torch.manual_seed(0)
    model = SoftVQVAE(**TINY).eval()
    depth = torch.rand(3, 1, 48, 64) * 8 + 0.1
    depth[0, :, :10] = 0.0  # invalid rows
    config = AitTokenizerConfig(eval_crop="eigen", min_depth=0.5, max_depth=6.0)
    task = AitTokenizerTask(config)
    got = task.finalize({k: float(v) for k, v in task.evaluate(model, [(torch.zeros(3, 3, 48, 64), depth)]).items()})
    with torch.no_grad():
        recon = model.decode_ids(model.encode(depth)).clamp_min(0.5)
    for name, value in mean_depth_metrics(recon, depth, min_depth=0.5, max_depth=6.0, crop="eigen").items():
        assert got[f"val_{name}"] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert got["val_rmse"] != pytest.approx(mean_depth_metrics(recon, depth)["rmse"], rel=1e-3)


def test_stopped_and_resumed_run_continues_exactly(tmp_path, tokenizer_run):
    out = tmp_path / "resumed"
    train(_cfg(out, epochs=2))
    train(_cfg(out, epochs=3))  # continues the checkpoint of epoch 2: same masks, codebook, reseeds
    assert _rows(out) == _rows(tokenizer_run)
    a, b = (load_checkpoint(run / "checkpoint.pt") for run in (tokenizer_run, out))
    assert a["task"] == b["task"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def test_bf16_run_keeps_the_codebook_in_fp32(tmp_path):
    """Under bf16 autocast the convolutions run in bf16, the nearest-code search and the EMA statistics in fp32."""
    result = train(_cfg(tmp_path / "bf16", precision="bf16", epochs=1))
    assert 0 < result["val_rmse"] < 10
    state = load_checkpoint(tmp_path / "bf16" / "checkpoint.pt")["model"]
    assert {state[k].dtype for k in ("_vq_vae._embedding", "_vq_vae._ema_cluster_size", "_vq_vae._ema_w")} == {
        torch.float32}  # fmt: skip
    assert torch.isfinite(state["_vq_vae._embedding"]).all()


def test_masks_follow_seed_rank_and_counter():
    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.inputs: list[torch.Tensor] = []

        def forward(self, x, label):
            self.inputs.append(x)
            zero = self.w * 0
            return {k: zero for k in ("loss", "recon_loss", "vq_loss", "perplexity", "usage", "reseeded")}

    depth = torch.rand(2, 1, 16, 16) + 1.0
    batch = (torch.zeros(2, 3, 16, 16), depth)

    def draws(seed, rank, start=0):
        task, spy = AitTokenizerTask(AitTokenizerConfig(mask_ratio=0.5, mask_patch_size=8), seed=seed, rank=rank), Spy()
        task.masks_drawn = start
        task.loss(spy, batch)
        task.loss(spy, batch)
        return [(x == 0).float() for x in spy.inputs]

    a = draws(0, 0)
    assert a[0].sum() == 2 * 2 * 64  # 2 of the 4 cells of 8x8 pixels, in each of the 2 maps
    assert (
        not torch.equal(a[0], a[1]) and not torch.equal(a[0], draws(0, 1)[0]) and not torch.equal(a[0], draws(1, 0)[0])
    )
    assert torch.equal(draws(0, 0, start=1)[0], a[1])  # the counter alone places a draw: resumable
    off = AitTokenizerTask(AitTokenizerConfig(mask_ratio=0.0))
    spy = Spy()
    off.loss(spy, batch)
    assert torch.equal(spy.inputs[0], depth) and off.masks_drawn == 0


def test_wrong_model_data_or_options_are_refused():
    with pytest.raises(TypeError, match=r"trains a depth SoftVQVAE .* got a mask tokenizer"):
        AitTokenizerTask().prepare_model(SoftVQVAE(kind="mask", image_size=32, downsample=8, code_dim=8, width=8))
    with pytest.raises(TypeError, match="got Linear"):
        AitTokenizerTask().prepare_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="eval_crop must be null or 'eigen'"):
        AitTokenizerTask(AitTokenizerConfig(eval_crop="garg"))
    model, images = SoftVQVAE(**TINY), torch.zeros(2, 3, 32, 32)
    with pytest.raises(TypeError, match=r"floating-point metres, got torch.int64 \(16-bit depth PNGs hold millimetres"):
        AitTokenizerTask().loss(model, (images, torch.full((2, 1, 32, 32), 1500)))
    with pytest.raises(ValueError, match="depth label 1 of the batch has no valid pixel"):
        AitTokenizerTask().loss(model, (images, torch.cat([torch.ones(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)])))
    with pytest.raises(
        ValueError, match=r"size \(32, 36\) \(H, W\) is not a multiple of the tokenizer's downsampling 8"
    ):
        AitTokenizerTask().loss(model, (images, torch.ones(2, 1, 32, 36)))
    cfg = TrainConfig(task=AitTokenizerConfig(), data=DataConfig(train_limit=8, val_limit=8))
    with pytest.raises(ValueError, match="reads depth batches, but data 'fashion_mnist_embedded' gives image"):
        build_task(cfg, build(cfg.data, seed=0))


def test_nano_recipe_names_the_task_and_fits_the_tokenizer():
    cfg = load_config(CONFIGS / "ait_tokenizer_depth_nano.yaml")
    assert isinstance(cfg.task, AitTokenizerConfig) and cfg.data.name == "procedural_depth"
    model, _, bundle = _initial(cfg)
    assert isinstance(model, SoftVQVAE) and model.grid == (8, 8)
    assert next(iter(bundle.val_loader))[1].shape == (cfg.data.batch_size, 1, 64, 64)


@pytest.mark.slow  # a torchrun launch of two processes
def test_two_ranks_share_one_codebook(tmp_path):
    """Under DDP every rank quantises with rank 0's codebook, and evaluation broadcasts it first: the metrics the
    two ranks report together equal a one-process evaluation of the checkpoint rank 0 saved."""
    recipe = tmp_path / "recipe.yaml"
    cfg = _cfg(tmp_path / "ddp_run", epochs=2)
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "ait_depth_vqvae", "kwargs": TINY},
        "data": {"name": "procedural_depth", "img_size": 32, "train_limit": 128, "val_limit": 8, "batch_size": 4},
        "task": {"name": "ait_tokenizer", "mask_ratio": 0.5, "mask_patch_size": 8, "recon_images": 2},
        "optim": {"lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 0.25},
        "epochs": 2, "threads": 1, "reuse_cpu_memory": False, "output_dir": cfg.output_dir,
    }))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "swinlab",
           "train", str(recipe)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = _rows(Path(cfg.output_dir))[-1]
    alone = evaluate(cfg.output_dir)
    for key in ("val_rmse", "val_abs_rel", "val_usage"):
        assert float(last[key]) == pytest.approx(alone[key], rel=1e-6), key


# -- the mask tokenizer (task: ait_mask_tokenizer) --------------------------------------------------------------------
MASK_TINY = {"image_size": 16, "downsample": 4, "num_codes": 16, "code_dim": 16, "width": 8, "num_res_blocks": 1}


def _mask_cfg(out: Path, **overrides) -> TrainConfig:
    base = {
        "model": ModelConfig(name="ait_insseg_vqvae", kwargs=MASK_TINY),
        "data": DataConfig(name="procedural_instances", img_size=32, train_limit=64, val_limit=8, batch_size=8),
        "task": AitMaskTokenizerConfig(recon_images=4),
        "optim": OptimConfig(lr=2e-3, weight_decay=0.0, warmup_epochs=0.0),
        "epochs": 2,
        "threads": 1,
        "reuse_cpu_memory": False,
        "output_dir": str(out),
    }
    return TrainConfig(**{**base, **overrides})


def test_mask_tokenizer_task_learns_box_crops_and_scores_iou(tmp_path):
    out = tmp_path / "masks"
    train(_mask_cfg(out))
    rows = _rows(out)
    assert len(rows) == 2
    for key in ("train_loss", "train_recon_loss", "train_usage", "val_mask_iou", "val_usage", "val_perplexity"):
        assert rows[-1][key] != "", key
    cfg = _mask_cfg(out)
    model, task, bundle = _initial(cfg)
    untrained = run_evaluation(model, task, bundle.val_loader)
    model.load_state_dict(load_checkpoint(out / "checkpoint.pt")["model"])
    got = run_evaluation(model, task, bundle.val_loader)
    assert got["val_mask_iou"] == pytest.approx(float(rows[-1]["val_mask_iou"]), rel=1e-5)
    assert got["val_recon_loss"] < untrained["val_recon_loss"], (got, untrained)
    # by hand: every object's mask cropped to its box at 16 px, encoded, decoded, binarised at 0.5, IoU per mask
    crops = torch.cat([crop_masks(t["masks"], t["boxes"], 16) for _, targets in bundle.val_loader for t in targets])
    with torch.no_grad():
        recon = model.decode_ids(model.encode(crops[:, None]))[:, 0] >= 0.5
    truth = crops >= 0.5
    iou = (recon & truth).flatten(1).sum(1) / (recon | truth).flatten(1).sum(1)
    assert got["val_mask_iou"] == pytest.approx(float(iou.mean()), rel=1e-5)
    with Image.open(out / "masks_epoch2.png") as picture:  # 2 rows x 4 crops of 16 px enlarged 6x to 96
        assert picture.size == (4 * 96 + 3 * 2, 2 * 96 + 2)
    assert any("reconstruction mask IoU" in line for line in evaluate(out)["summary"])


def test_mask_iou_and_the_mask_task_refusals():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]).bool()
    b = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]).bool()
    assert mask_iou(a, b).tolist() == [0.5, 1.0, 0.0]
    with pytest.raises(TypeError, match=r"task ait_mask_tokenizer trains a mask SoftVQVAE .* got a depth tokenizer"):
        AitMaskTokenizerTask().prepare_model(SoftVQVAE(**TINY))
    cfg = _mask_cfg(Path("unused"), data=DataConfig(name="procedural_depth", img_size=32, train_limit=8, val_limit=8))
    with pytest.raises(ValueError, match="reads instances batches, but data 'procedural_depth' gives depth"):
        build_task(cfg, build(cfg.data, seed=0))
    model = SoftVQVAE(kind="mask", **MASK_TINY)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32)}
    with pytest.raises(ValueError, match="a training batch holds no object mask"):
        AitMaskTokenizerTask().loss(model, (torch.zeros(1, 3, 32, 32), [empty]))


def test_mask_nano_recipe_loads():
    cfg = load_config(CONFIGS / "ait_tokenizer_mask_nano.yaml")
    assert isinstance(cfg.task, AitMaskTokenizerConfig) and cfg.data.name == "procedural_instances"
    model = _initial(cfg)[0]
    assert model.kind == "mask" and model.grid == (4, 4)  # 16 tokens per object, as officially
