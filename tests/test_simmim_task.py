"""SimMIM pre-training through the engine (``task: simmim``) and fine-tuning from its run: the task learns, resumes
with the same masks, writes reconstruction pictures; a classifier loads the encoder at another window size, with a
report, and refuses checkpoints that do not fit."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from swinlab.config import DataConfig, ModelConfig, OptimConfig
from swinlab.data import build
from swinlab.data import transforms as transforms_module
from swinlab.engine import build_model, build_run_model, build_task, evaluate, load_checkpoint, run_evaluation, train
from swinlab.engine.optim import swin_layer_ids
from swinlab.models.swin import SwinTransformerV2
from swinlab.pretrain.simmim import MaskGenerator, SimMIM, upsample_mask
from swinlab.recipe import TrainConfig, load_config
from swinlab.tasks.simmim import SimMIMConfig, SimMIMTask, reconstruction_rows, save_picture_grid

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Two stages of patch 4 on 32 px: an 8x8 token grid, output stride 8; mask cells of 8 px: 16 per image, 10 masked.
TINY = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "drop_path_rate": 0.0}


def _pretrain_cfg(out: Path, **overrides) -> TrainConfig:
    base = {
        "model": ModelConfig(name="swinv2_nano_window4_32", kwargs=TINY),
        "data": DataConfig(img_size=32, train_limit=320, val_limit=32, batch_size=16, augment="simmim"),
        "task": SimMIMConfig(mask_patch_size=8, recon_images=3),
        # constant after the warm-up: a run stopped early and continued has the same rates as one run through
        "optim": OptimConfig(lr=5e-3, warmup_epochs=0.2, schedule="constant"),
        "epochs": 4,
        "threads": 1,
        "reuse_cpu_memory": False,
        "output_dir": str(out),
    }
    return TrainConfig(**{**base, **overrides})


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in {"epoch_time", "steps_per_s", "samples_per_s"}}
                for row in csv.DictReader(f)]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """One four-epoch pre-training run, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("simmim") / "run"
    train(_pretrain_cfg(out))
    return out


def _untrained_val_loss(cfg: TrainConfig) -> float:
    """The validation loss of the run's initial weights (what the first step starts from)."""
    bundle = build(cfg.data, seed=cfg.seed)
    task = build_task(cfg, bundle)
    torch.manual_seed(cfg.seed)
    model = build_run_model(cfg, bundle, task, torch.device("cpu"), pretrained=None)
    return run_evaluation(model, task, bundle.val_loader)["val_loss"]


def test_pretraining_learns_and_writes_pictures(pretrained_run):
    rows = _rows(pretrained_run)
    val = [float(row["val_loss"]) for row in rows]
    initial = _untrained_val_loss(_pretrain_cfg(pretrained_run))
    assert len(val) == 4 and val[-1] < 0.9 * initial, (initial, val)  # measured: 0.886 -> 0.728
    ckpt = load_checkpoint(pretrained_run / "checkpoint.pt")
    assert "encoder.mask_token" in ckpt["model"] and "decoder.0.weight" in ckpt["model"]
    assert not any(k.startswith("encoder.head.") for k in ckpt["model"])  # the encoder carries no head
    assert ckpt["task"] == {"masks_drawn": 4 * 20}  # one mask draw per micro-batch
    for epoch in (1, 2, 3, 4):
        with Image.open(pretrained_run / f"recon_epoch{epoch}.png") as picture:
            # 4 rows (input, masked, reconstruction, target) x 3 images of 32 px enlarged 3x to 96, 2 px gaps
            assert picture.size == (3 * 96 + 2 * 2, 4 * 96 + 3 * 2) and picture.mode == "L"
    # a run is evaluated again with the same fixed validation masks
    assert evaluate(pretrained_run)["val_loss"] == pytest.approx(val[-1], rel=1e-6)


def test_stopped_and_resumed_run_draws_the_same_masks(tmp_path, pretrained_run):
    out = tmp_path / "resumed"
    train(_pretrain_cfg(out, epochs=2))
    train(_pretrain_cfg(out, epochs=4))  # continues the checkpoint of epoch 2
    assert _rows(out) == _rows(pretrained_run)
    a, b = (load_checkpoint(run / "checkpoint.pt") for run in (pretrained_run, out))
    assert a["task"] == b["task"]
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name


def test_masks_depend_on_seed_rank_and_count_and_evaluation_masks_are_fixed():
    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.masks: list[torch.Tensor] = []

        def forward(self, x, mask):
            self.masks.append(mask)
            return self.w + mask.float().mean()

    def draws(seed: int, rank: int, n: int = 2, start: int = 0) -> list[torch.Tensor]:
        task, spy = SimMIMTask(SimMIMConfig(mask_patch_size=8), seed=seed, rank=rank), Spy()
        task._patch_size, task.masks_drawn = 4, start
        for _ in range(n):
            task.loss(spy, (torch.zeros(4, 1, 32, 32), torch.zeros(4)))
        batches = [(torch.zeros(4, 1, 32, 32), torch.zeros(4))] * 2
        task.evaluate(spy, batches)
        task.evaluate(spy, batches)
        return spy.masks

    a, again, other_rank, other_seed = draws(0, 0), draws(0, 0), draws(0, 1), draws(1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, again, strict=True))
    assert a[0].shape == (4, 8, 8) and int(a[0][0].sum()) == 10 * 4  # 10 of 16 cells, 2x2 tokens each
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], other_rank[0]) and not torch.equal(a[0], other_seed[0])
    assert torch.equal(a[2], a[4]) and torch.equal(a[3], a[5]) and not torch.equal(a[2], a[3])  # fixed eval masks
    assert torch.equal(a[2], other_seed[2])  # evaluation masks do not follow the run seed
    assert torch.equal(draws(0, 0, n=1, start=1)[0], a[1])  # the counter alone places a draw: resumable


def test_finetune_from_the_run_loads_the_encoder_at_another_window(pretrained_run, capsys):
    ckpt = load_checkpoint(pretrained_run / "checkpoint.pt")["model"]
    cfg = TrainConfig(
        model=ModelConfig(name="swinv2_nano_window4_32", pretrained=str(pretrained_run),
                          kwargs={**TINY, "window_size": 8, "pretrained_window_sizes": [4, 4]}),
        data=DataConfig(img_size=32, train_limit=16, val_limit=16, batch_size=16),
    )  # fmt: skip
    bundle = build(cfg.data, seed=0)
    model = build_model(cfg, bundle, torch.device("cpu"), pretrained=cfg.model.pretrained, verbose=True)
    report = capsys.readouterr().out
    assert "prefix 'encoder.' stripped" in report
    assert "dropped (pre-training only): encoder.mask_token, decoder.0.weight, decoder.0.bias" in report
    assert "left at their initial values (not in the checkpoint): head.weight, head.bias" in report
    state = model.state_dict()
    assert set(state) == {k.removeprefix("encoder.") for k in ckpt if k.startswith("encoder.")} - {"mask_token"} | {
        "head.weight", "head.bias"}  # fmt: skip
    for name, value in state.items():
        if not name.startswith("head."):
            assert torch.equal(value, ckpt[f"encoder.{name}"]), name
    assert model.layers[0].blocks[0].window_size == (8, 8)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_finetune_loads_refuse_what_does_not_fit(pretrained_run, tmp_path):
    bundle = build(DataConfig(img_size=32, train_limit=16, val_limit=16), seed=0)
    wider = TrainConfig(model=ModelConfig(name="swinv2_nano_window4_32", kwargs={**TINY, "embed_dim": 32}))
    mismatch = r"cannot be adapted(.|\n)*patch_embed\.proj\.weight: checkpoint \(16, 1, 4, 4\) vs model \(32, 1, 4, 4\)"
    with pytest.raises(ValueError, match=mismatch):
        build_model(wider, bundle, torch.device("cpu"), pretrained=str(pretrained_run))
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(3)}}, foreign)
    same = TrainConfig(model=ModelConfig(name="swinv2_nano_window4_32", kwargs=TINY))
    with pytest.raises(ValueError, match="no checkpoint key matches the model"):
        build_model(same, bundle, torch.device("cpu"), pretrained=str(foreign))


def test_the_task_needs_a_swin_v2_and_sizes_that_mask():
    with pytest.raises(TypeError, match="pre-trains a SwinTransformerV2"):
        SimMIMTask().prepare_model(torch.nn.Linear(2, 2))
    task = SimMIMTask(SimMIMConfig(mask_patch_size=6))
    model = task.prepare_model(SwinTransformerV2(img_size=32, embed_dim=16, depths=(1,), num_heads=(1,), window_size=4))
    assert isinstance(model, SimMIM) and model.encoder.num_classes == 0 and model.encoder_stride == 4
    with pytest.raises(ValueError, match="not a multiple of the model patch size"):
        task.loss(model, (torch.zeros(2, 3, 32, 32), torch.zeros(2)))


def test_layer_ids_inside_a_simmim_model():
    model = SimMIM(SwinTransformerV2(img_size=32, embed_dim=16, depths=(1, 2), num_heads=(1, 2), window_size=4,
                                     num_classes=0), encoder_stride=8)  # fmt: skip
    ids, last = swin_layer_ids(model)
    assert last == 4
    assert ids["encoder.mask_token"] == ids["encoder.patch_embed.proj.weight"] == 0
    assert ids["encoder.layers.1.blocks.1.mlp.fc1.weight"] == 3
    assert ids["decoder.0.weight"] == ids["encoder.norm.weight"] == 4


def test_simmim_crop_keeps_two_thirds_of_the_image(monkeypatch):
    scales = []
    real = transforms_module.random_resized_crop_box

    def spy(height, width, scale, rng, *args):
        scales.append(scale)
        return real(height, width, scale, rng, *args)

    monkeypatch.setattr(transforms_module, "random_resized_crop_box", spy)
    for augment, size in (("simmim", 192), ("standard", 192)):
        transform = transforms_module.ImageTransform(size, train=True, augment=augment, mean=(0.5,), std=(0.5,),
                                                     in_chans=1)  # fmt: skip
        assert transform(torch.zeros(1, 28, 28, dtype=torch.uint8), random.Random(0)).shape == (1, size, size)
    assert scales == [(0.67, 1.0), (0.08, 1.0)]


@pytest.mark.parametrize("name", ["simmim_nano_fashion.yaml", "simmim_swinv2_base_w12_192_800ep.yaml"])
def test_pretraining_recipes_name_the_task(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.task.name == "simmim" and cfg.data.augment == "simmim"


@pytest.mark.parametrize("norm_target", [False, True])
def test_reconstruction_rows_are_pictures_in_the_space_of_the_loss(tmp_path, norm_target):
    encoder = SwinTransformerV2(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4,
                                num_classes=0)  # fmt: skip
    model = SimMIM(encoder, encoder_stride=8, norm_target=norm_target, norm_target_window=7).eval()
    images = torch.randn(2, 3, 32, 32)
    mask = MaskGenerator(32, 8, 4, 0.6)(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rows = reconstruction_rows(model, images, mask, mean=(0.5, 0.4, 0.3), std=(0.25, 0.25, 0.25))
    assert len(rows) == 4 and all(row.shape == (2, 3, 32, 32) and 0 <= row.min() <= row.max() <= 1 for row in rows)
    hidden = upsample_mask(mask, 4).bool()  # (2, 32, 32) pixels
    channels_last = [row.permute(1, 0, 2, 3) for row in rows]  # (3, 2, 32, 32): index with the pixel mask
    assert (channels_last[1][:, hidden] == 0.5).all()  # masked input: grey where hidden
    torch.testing.assert_close(channels_last[1][:, ~hidden], channels_last[0][:, ~hidden])
    torch.testing.assert_close(channels_last[2][:, ~hidden], channels_last[3][:, ~hidden])  # prediction only hidden
    assert not torch.allclose(channels_last[2][:, hidden], channels_last[3][:, hidden])
    save_picture_grid(rows, tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.mode == "RGB" and picture.size == (2 * 96 + 2, 4 * 96 + 3 * 2)


def test_a_pretraining_run_is_a_source_for_run_inspection(pretrained_run):
    """``swinlab erf <run>`` on a SimMIM run probes its encoder (the recipe's model with the trained weights)."""
    from swinlab.engine.runs import load_source

    ckpt = load_checkpoint(pretrained_run / "checkpoint.pt")["model"]
    source = load_source(str(pretrained_run))
    for name, value in source.model.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, ckpt[f"encoder.{name}"]), name
