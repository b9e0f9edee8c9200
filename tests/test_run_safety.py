"""A run folder is one run's: lock, resume only of the same recipe, stale temp files; runs that learn nothing stop;
every error a user can cause is one line naming the file or key."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ddp_worker import TinyNet, run_tiny, tiny_config, tiny_loaders
from swinlab.cli import main
from swinlab.config import OptimConfig
from swinlab.engine import build_optimizer, fit
from swinlab.engine import checkpoint as ckpt_io
from swinlab.engine.loop import TrainingError
from swinlab.engine.runfolder import RunFolderError, lock_run_folder
from swinlab.tasks import ClassificationTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_SWIN = [
    "epochs=1", "max_steps_per_epoch=2", "data.batch_size=8", "data.train_limit=16", "data.val_limit=8",
    "model.kwargs={embed_dim: 12, depths: [1, 1, 1], num_heads: [1, 2, 4]}", "reuse_cpu_memory=false",
]  # fmt: skip


def _train(run: Path, *overrides: str, recipe: str = "swinv2_nano_fashion.yaml") -> int:
    sets = [arg for o in (*TINY_SWIN, f"output_dir={run}", *overrides) for arg in ("--set", o)]
    return main(["train", str(CONFIGS / recipe), *sets])


# -- one run per folder ------------------------------------------------------------------------------------------
def test_a_held_run_folder_refuses_a_second_run_naming_the_holder(tmp_path):
    held = rf"in use by another run \(pid {os.getpid()} on host"
    with lock_run_folder(tmp_path), pytest.raises(RunFolderError, match=held), lock_run_folder(tmp_path):
        pass
    with lock_run_folder(tmp_path):  # released: free again
        pass


def test_a_second_swinlab_train_on_a_busy_folder_fails_and_a_killed_holder_frees_it(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from swinlab.engine.runfolder import lock_run_folder\n"
         "with lock_run_folder(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _train(tmp_path) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {holder.pid} on host" in err and "--set output_dir=" in err
        assert not (tmp_path / "metrics.csv").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
    assert _train(tmp_path) == 0


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path, capsys):
    (tmp_path / f".checkpoint.pt{ckpt_io.TEMP_MARKER}4242").write_bytes(b"half a checkpoint")
    assert _train(tmp_path) == 0
    assert "left half-written by a run that was killed" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp-*"))


def test_resume_only_of_the_same_recipe_unless_forced(tmp_path):
    run_tiny(tiny_config(tmp_path, epochs=1), batch_size=8)
    other = OptimConfig(lr=0.1, warmup_epochs=0.5, warmup_lr=1e-3, min_lr=1e-4, weight_decay=0.05)
    with pytest.raises(RunFolderError, match=r"another recipe \(optim\.lr: 0\.05 -> 0\.1\).*resume=force"):
        run_tiny(tiny_config(tmp_path, epochs=2, optim=other), batch_size=8)
    _, longer = run_tiny(tiny_config(tmp_path, epochs=2), batch_size=8)  # epochs is run control: resumes
    assert longer["epochs_completed"] == 2 and longer["step"] == 16
    _, forced = run_tiny(tiny_config(tmp_path, epochs=3, optim=other, resume="force"), batch_size=8)
    assert forced["epochs_completed"] == 3


def test_a_finished_run_says_there_is_nothing_to_train(tmp_path, capsys):
    run_tiny(tiny_config(tmp_path, epochs=1), batch_size=8)
    capsys.readouterr()
    _, again = run_tiny(tiny_config(tmp_path, epochs=1), batch_size=8)
    assert "nothing to train" in capsys.readouterr().out and again["epochs_completed"] == 1


# -- runs that learn nothing stop ----------------------------------------------------------------------------------
def test_a_run_that_read_no_sample_fails(tmp_path):
    train, val = tiny_loaders(8)

    class Unreadable(list):  # every batch lost its samples, as when every file fails to decode
        sampler, batch_size = train.sampler, train.batch_size

    empty = Unreadable([(x[:0], y[:0]) for x, y in train])
    model = TinyNet()
    cfg = tiny_config(tmp_path, epochs=1)
    with pytest.raises(TrainingError, match=r"not one readable training sample \(64 expected\)"), pytest.warns(
        RuntimeWarning
    ):
        fit(model, ClassificationTask(), build_optimizer(model, cfg.optim), empty, val, cfg)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_run_whose_updates_are_mostly_skipped_fails(tmp_path):
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    poisoned = [(torch.full((4, 8), float("nan")), y[:4])] * 3 + [(x[:4], y[:4])]
    model = TinyNet()
    cfg = tiny_config(tmp_path, epochs=1)
    with pytest.raises(TrainingError, match=r"3 of 4 updates were skipped.*max_skipped_fraction=0\.5"), pytest.warns(
        RuntimeWarning
    ):
        fit(model, ClassificationTask(), build_optimizer(model, cfg.optim), poisoned, [(x, y)], cfg)


# -- one-line errors -------------------------------------------------------------------------------------------
def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("swinlab: error: ") and err.count("\n") == 1, err
    return err


def test_user_errors_are_one_line(tmp_path, capsys):
    assert _train(tmp_path / "swin") == 0
    capsys.readouterr()
    # the same folder with another model: refused by recipe, and forced, refused by the weights
    assert _train(tmp_path / "swin", "model.name=resnet18", "model.kwargs={}") == 2
    assert "model.name: 'swinv2_nano_window4_32' -> 'resnet18'" in _one_line(capsys)
    assert _train(tmp_path / "swin", "model.name=resnet18", "model.kwargs={}", "resume=force") == 2
    assert f"{tmp_path / 'swin' / 'checkpoint.pt'} does not fit this run's model" in _one_line(capsys)
    # truncated checkpoint
    broken = tmp_path / "broken.pt"
    broken.write_bytes((tmp_path / "swin" / "checkpoint.pt").read_bytes()[:2000])
    assert main(["eval", str(broken)]) == 2
    assert f"{broken} is not a readable checkpoint" in _one_line(capsys)
    # output_dir that is a file
    assert _train(broken) == 2
    assert f"output_dir {broken} is a file" in _one_line(capsys)
    # a range the key must respect
    assert _train(tmp_path / "c", "clip_grad=-1") == 2
    assert "clip_grad=-1.0: must be > 0" in _one_line(capsys)
    if not torch.cuda.is_available():
        assert _train(tmp_path / "d", "device=cuda") == 2
        assert "device='cuda', but torch.cuda.is_available() is False" in _one_line(capsys)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    assert _train(tmp_path) == 0
    saved = (tmp_path / "checkpoint.pt").read_bytes()

    def full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f.name))

    monkeypatch.setattr(ckpt_io.torch, "save", full)
    capsys.readouterr()
    assert _train(tmp_path, "epochs=2") == 2
    assert "No space left on device: " in _one_line(capsys)
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(RunFolderError):
        main(["--debug", "train", str(CONFIGS / "swinv2_nano_fashion.yaml"), "--set", f"output_dir={__file__}"])


def test_fp8_o3_in_one_process_says_to_use_torchrun(tmp_path, capsys):
    assert _train(tmp_path, "precision=fp8-o3") == 2
    assert "run under torchrun" in _one_line(capsys)
