"""Recipes: YAML + overrides into frozen dataclasses, with errors that name the bad key."""

from pathlib import Path

import pytest

from swinlab.cli import MAIN_JOB
from swinlab.config import ConfigError, parse_override, to_dict
from swinlab.recipe import TrainConfig, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_round_trip_through_dict():
    cfg = TrainConfig()
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(path):
    cfg = load_config(path)
    assert cfg.model.name and cfg.epochs > 0


def test_base_inheritance_and_overrides():
    cfg = load_config(CONFIGS / "swinv2_small_window8_256_imagenet1k.yaml", ["optim.lr=3e-4", "data.img_size=192"])
    assert cfg.model.name == "swinv2_small_window8_256"
    assert cfg.model.kwargs == {"drop_path_rate": 0.3}
    assert cfg.epochs == 300 and cfg.task.mixup == 0.8  # inherited from the tiny recipe
    assert cfg.optim.lr == 3e-4 and cfg.data.img_size == 192


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr_rate=1", "unknown config key 'optim.lr_rate'"),
        ("epocs=3", "did you mean epochs"),
        ("epochs=abc", "epochs: expected an integer"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("model=3", "model: expected a mapping"),
        ("tensorboard=maybe", "tensorboard: expected true/false"),
        ("no_equals_sign", "must look like key=value"),
        ("task.labl_smoothing=0.1", "unknown config key 'task.labl_smoothing'; did you mean label_smoothing"),
        ("task=classfication", "task.name: unknown task 'classfication'; did you mean classification"),
        ("task=nowhere:Task", r"task 'nowhere:Task': cannot import nowhere:Task"),
        ("task=[1]", "task: expected a task name or a mapping"),
        ("mixup=0.8", "config key 'mixup' moved to 'task.mixup'"),
        ("optim.lr=-1", r"optim\.lr=-1\.0: must be > 0"),
        ("optim.betas=[0.9, 1.0]", r"optim\.betas=1\.0: must be >= 0 and < 1"),
        ("task.label_smoothing=1", r"task\.label_smoothing=1\.0: must be >= 0 and < 1"),
        ("data.batch_size=0", r"data\.batch_size=0: must be >= 1"),
        ("resume=maybe", "resume='maybe': must be true, false or force"),
    ],
)
def test_malformed_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_task_section_is_the_named_tasks_own():
    lm = load_config(CONFIGS / "gpt_nano_stdlib.yaml")
    assert lm.task.name == "language_model" and not hasattr(lm.task, "label_smoothing")
    # `task: <name>` is short for a mapping, so a key can be set under it from the command line
    smoothed = load_config(CONFIGS / "video_swin_demo.yaml", ["task=video_classification", "task.label_smoothing=0.2"])
    assert (smoothed.task.name, smoothed.task.label_smoothing, smoothed.task.mixup) == ("video_classification", 0.2, 0)
    with pytest.raises(ConfigError, match=r"unknown config key 'task\.label_smoothing'"):
        load_config(CONFIGS / "gpt_nano_stdlib.yaml", ["task.label_smoothing=0.1"])  # no such key for LMs
    assert TrainConfig().task == load_config(None).task  # built in Python: the default task's full section


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: {name: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_override_values_parse_as_python_would():
    assert parse_override("optim.lr=3e-4") == ("optim.lr", 3e-4)
    assert parse_override("data.mean=[0.5, 0.5]") == ("data.mean", [0.5, 0.5])
    assert parse_override("model.pretrained=null") == ("model.pretrained", None)


def test_main_job_recipe_file_matches_the_main_job():
    """`swinlab` (no arguments) runs cli.MAIN_JOB; configs/swinv2_nano_fashion.yaml writes the same recipe out."""
    written = load_config(CONFIGS / "swinv2_nano_fashion.yaml", ["output_dir=runs/main"])
    assert written == load_config(None, MAIN_JOB)
