"""``task: ait_insseg`` through the engine: a TaskSolver learns object sequences (boxes, classes, a frozen mask
tokenizer's codes) of procedural rooms, is scored by COCO AP of its decoded predictions, draws them, keeps the
tokenizer out of its checkpoint; wrong tokenizers and solvers are named errors."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from _ait_tiny import MASK_TOKENIZER, base, solver_kwargs, train_tokenizer
from swinlab.config import DataConfig, ModelConfig, OptimConfig
from swinlab.data import build
from swinlab.engine import build_run_model, build_task, load_checkpoint, run_evaluation, train
from swinlab.recipe import TrainConfig, load_config
from swinlab.tasks.ait_insseg import AitInsSegConfig, average_precision
from swinlab.tasks.ait_tokenizer import AitMaskTokenizerConfig, AitTokenizerConfig

pytest.importorskip("pycocotools", reason="COCO AP needs pycocotools (pip install 'swinlab[coco]')")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOKENIZER = MASK_TOKENIZER
OBJECTS = 4
SOLVER = solver_kwargs(num_bins=32, num_classes=2, codes={"mask": 16}, prompts=["insseg"], max_length=OBJECTS * 21)
DATA = DataConfig(name="procedural_instances", img_size=32, train_limit=32, val_limit=4, batch_size=8)


def _base(out: Path) -> dict:
    return base(out, DATA)


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ait_insseg") / "tokenizer"
    return train_tokenizer(out, "ait_insseg_vqvae", TOKENIZER, AitMaskTokenizerConfig(recon_images=0), DATA, lr=2e-3)


def _cfg(out: Path, tokenizer: str | None, solver: dict | None = None, **task) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(name="ait_task_solver", kwargs=solver or SOLVER),
        task=AitInsSegConfig(tokenizer=tokenizer, num_objects=OBJECTS, mask_images=3, **task),
        optim=OptimConfig(lr=2e-3, warmup_epochs=0.0),
        epochs=2,
        **_base(out),
    )


def test_solver_trains_on_object_sequences_and_is_scored_by_coco_ap(tokenizer_run, tmp_path):
    tokenizer_weights = load_checkpoint(tokenizer_run / "checkpoint.pt")["model"]
    out = tmp_path / "solver"
    train(_cfg(out, str(tokenizer_run)))
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[1] < losses[0], losses
    for key in ("train_ce", "train_aux_mask", "val_loss", "val_mask_ap", "val_mask_ap50", "val_box_ap", "val_box_ap50"):
        assert rows[-1][key] != "", key
    for key in ("val_mask_ap", "val_mask_ap50", "val_box_ap", "val_box_ap50"):
        assert 0.0 <= float(rows[-1][key]) <= 1.0, (key, rows[-1][key])  # a number, not nan: the scenes have objects
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert not any("_vq_vae" in k or k.startswith("tokenizer") for k in ckpt["model"])
    assert ckpt["frozen"]["tokenizer"]["source"] == str(tokenizer_run / "checkpoint.pt")
    assert ckpt["task"] == {"sequences_built": 2 * 4}  # one per training batch: 32 scenes / 8 per batch x 2 epochs
    with Image.open(out / "insseg_epoch2.png") as picture:  # 3 rows (image, truth, predictions) x 3 images of 32 px
        assert picture.size == (3 * 96 + 2 * 2, 3 * 96 + 2 * 2) and picture.mode == "RGB"
    after = load_checkpoint(tokenizer_run / "checkpoint.pt")["model"]
    assert all(torch.equal(after[k], v) for k, v in tokenizer_weights.items())


def test_evaluation_is_coco_ap_of_the_greedy_predictions(tokenizer_run, tmp_path):
    """With top_p 0 the decoding is greedy: the task's AP equals pycocotools' AP of predictions made by hand."""
    cfg = _cfg(tmp_path / "eval", str(tokenizer_run), top_p=0.0)
    bundle = build(cfg.data, seed=cfg.seed)
    task = build_task(cfg, bundle)
    torch.manual_seed(0)
    model = build_run_model(cfg, bundle, task, torch.device("cpu"), pretrained=None).eval()
    with torch.no_grad():  # an untrained solver says "noise" everywhere; favour real classes to get detections
        model.output_bias[model.vocabulary.span("classes")[0]] += 3.0
    got = run_evaluation(model, task, bundle.val_loader)
    predictions, truths = [], []
    for images, targets in bundle.val_loader:
        predictions += task.predict(model, images)
        truths += targets
    expected = average_precision(predictions, truths, bundle.category_ids)
    for name, value in expected.items():
        assert got[f"val_{name}"] == pytest.approx(value, abs=1e-9), name
    assert all(len(p["scores"]) == OBJECTS and p["masks"].shape == (OBJECTS, 32, 32) for p in predictions)
    assert any((p["scores"] > 0.5).any() for p in predictions)


def test_wrong_tokenizer_or_solver_names_the_key(tokenizer_run, tmp_path):
    depth_data = DataConfig(name="procedural_depth", img_size=32, train_limit=8, val_limit=2)
    depth_run = train_tokenizer(
        tmp_path / "depth_tokenizer", "ait_depth_vqvae", TOKENIZER, AitTokenizerConfig(recon_images=0), depth_data, 1e-3
    )
    with pytest.raises(TypeError, match=r"task\.tokenizer: .* holds a depth tokenizer; task ait_insseg needs a mask"):
        train(_cfg(tmp_path / "a", str(depth_run)))
    with pytest.raises(ValueError, match=r"task\.tokenizer is required"):
        train(_cfg(tmp_path / "b", None))
    with pytest.raises(ValueError, match=r"set model\.kwargs\.max_length >= 84 \(now 42\)"):
        train(_cfg(tmp_path / "c", str(tokenizer_run), {**SOLVER, "max_length": 42}))
    with pytest.raises(ValueError, match=r"set model\.kwargs\.num_classes: 2"):
        train(_cfg(tmp_path / "d", str(tokenizer_run), {**SOLVER, "num_classes": 80}))
    with pytest.raises(ValueError, match=r"set model\.kwargs\.codes\.mask: 16"):
        train(_cfg(tmp_path / "e", str(tokenizer_run), {**SOLVER, "codes": {"mask": 32}}))
    with pytest.raises(ValueError, match=r"add 'insseg' to model\.kwargs\.prompts"):
        train(_cfg(tmp_path / "f", str(tokenizer_run), {**SOLVER, "prompts": ["depth"]}))


def test_crowd_regions_are_not_written_as_objects(tokenizer_run, tmp_path):
    cfg = _cfg(tmp_path / "crowd", str(tokenizer_run))
    bundle = build(cfg.data, seed=cfg.seed)
    task = build_task(cfg, bundle)
    model = build_run_model(cfg, bundle, task, torch.device("cpu"), pretrained=None)
    images, targets = next(iter(bundle.train_loader))
    crowded = [{**t, "iscrowd": torch.ones_like(t["iscrowd"])} for t in targets]
    seen = []
    encode = task.coder.encode
    task.coder.encode = lambda targets, *a: seen.append(targets) or encode(targets, *a)
    task.loss(model, (images, crowded))
    assert all(len(t["labels"]) == 0 for t in seen[0])


def test_nano_recipe_loads():
    cfg = load_config(CONFIGS / "ait_insseg_nano.yaml")
    assert cfg.task.name == "ait_insseg" and cfg.task.tokenizer == "runs/ait_tokenizer_mask_nano"
    assert cfg.model.kwargs["max_length"] == cfg.task.num_objects * 21


def test_missing_pycocotools_is_named_before_training(tokenizer_run, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r'pycocotools: pip install "swinlab\[coco\]"'):
        train(_cfg(tmp_path / "no_coco", str(tokenizer_run)))
    assert not (tmp_path / "no_coco" / "metrics.csv").exists()


def test_ground_truth_sequences_score_full_box_ap(tokenizer_run, tmp_path):
    """The path from tokens to COCO AP is right: every image's own target sequence, decoded from one-hot logits,
    finds every box (AP50 1; AP over IoU 0.5:0.95 limited only by the half-bin rounding)."""
    cfg = _cfg(tmp_path / "oracle", str(tokenizer_run), {**SOLVER, "num_bins": 64, "max_length": 6 * 21})
    cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, num_objects=6))  # the rooms hold 2-5 objects
    bundle = build(dataclasses.replace(cfg.data, val_limit=16), seed=cfg.seed)
    task = build_task(cfg, bundle)
    build_run_model(cfg, bundle, task, torch.device("cpu"), pretrained=None)
    coder, predictions, truths = task.coder, [], []
    for _, targets in bundle.val_loader:
        seq = coder.encode(targets, 32, 32, torch.Generator().manual_seed(0))
        ids = torch.where(seq.targets == -100, seq.inputs, seq.targets)
        logits = torch.full((*ids.shape, coder.vocabulary.size), -30.0).scatter_(2, ids[..., None], 30.0)
        predictions += coder.decode(logits, ids, 32, 32)
        truths += targets
    found = average_precision(predictions, truths, bundle.category_ids)
    assert found["box_ap50"] == pytest.approx(1.0) and found["box_ap"] > 0.9, found
