"""The command line: each sub-command end to end on tiny settings, and one-line errors for user mistakes."""

import csv
from pathlib import Path

from swinlab.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_models_lists_and_filters(capsys):
    assert main(["models", "swinv2_tiny*"]) == 0
    names = capsys.readouterr().out.split()
    assert "swinv2_tiny_window8_256" in names and all(n.startswith("swinv2_tiny") for n in names)
    assert main(["models", "no_such_model*"]) == 1


def test_info_reports_params_flops_and_memory(capsys):
    assert main(["info", "swinv2_nano_window4_32"]) == 0
    out = capsys.readouterr().out
    assert "params" in out and "GFLOP" in out and "MiB" in out


def test_info_measures_the_backbone_of_a_model_that_needs_task_inputs(capsys):
    assert main(["info", "ait_task_solver"]) == 0
    out = capsys.readouterr().out
    assert "backbone only" in out and "GFLOP" in out


def test_unknown_model_is_one_clear_line(capsys):
    assert main(["info", "swinv2_tiny_windw8_256"]) == 2
    err = capsys.readouterr().err
    assert "swinv2_tiny_window8_256" in err  # the close match is suggested
    assert "Traceback" not in err


def test_malformed_override_is_one_clear_line(capsys):
    assert main(["train", str(CONFIGS / "swinv2_nano_fashion.yaml"), "--set", "optim.lr_rate=1"]) == 2
    assert "optim.lr_rate" in capsys.readouterr().err


def test_train_then_eval_a_tiny_run(tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        f"output_dir={run}",
        "epochs=1",
        "max_steps_per_epoch=3",
        "data.batch_size=16",
        "data.train_limit=48",
        "data.val_limit=64",
        "model.kwargs={embed_dim: 12, depths: [1, 1, 1], num_heads: [1, 2, 4]}",
    ]
    args = ["train", str(CONFIGS / "swinv2_nano_fashion.yaml")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 0
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 1 and rows[0]["step"] == "3" and rows[0]["samples_seen"] == "48"
    trained = f"validation top-1 {float(rows[0]['val_top1']):.2f}%, top-5 {float(rows[0]['val_top5']):.2f}%"
    assert trained in capsys.readouterr().out  # the task's summary closes the run
    assert (run / "config.yaml").is_file()
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert trained in out and f"checkpoint       {run / 'checkpoint.pt'} (epoch 1)" in out


def test_config_lists_every_key_with_type_default_and_meaning(capsys):
    from swinlab.recipe import recipe_keys

    for task in ("classification", "language_model", "video_classification"):
        assert all(k.doc for k in recipe_keys(task)), [k.key for k in recipe_keys(task) if not k.doc]
    assert main(["config", "--keys", "optim"]) == 0
    out = capsys.readouterr().out
    assert "optim.lr             float > 0, default 0.001" in out and "Peak learning rate" in out
    assert "data." not in out
    assert main(["config", "--keys", "task", "--set", "task=language_model"]) == 0
    assert capsys.readouterr().out.split()[:4] == ["task.name", "str,", "default", "'language_model'"]
    assert main(["config", str(CONFIGS / "gpt_nano_stdlib.yaml"), "--set", "epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "name: language_model" in out
    assert main(["config", "--keys", "nonsense"]) == 1
