"""Two gloo ranks under torchrun train exactly like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _ddp_worker import run_tiny, tiny_config

WORKER = Path(__file__).with_name("_ddp_worker.py")


@pytest.mark.slow  # a torchrun launch of two processes
def test_two_gloo_ranks_match_one_process(tmp_path):
    result_path = tmp_path / "ddp_result.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path / "ddp_run"), str(result_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(result_path, weights_only=True)

    # per-rank batch 4 x 2 ranks == batch 8 in one process (the DistributedSampler shards each global batch)
    single_model, single = run_tiny(tiny_config(tmp_path / "single_run"), batch_size=8)
    for name, value in single_model.state_dict().items():
        torch.testing.assert_close(ddp["state_dict"][name], value, atol=1e-5, rtol=0, msg=name)
    for key in ("step", "samples_seen", "samples_expected", "val_top1", "val_top5"):
        assert ddp["result"][key] == single[key], key
    for key in ("train_loss", "val_loss", "lr", "grad_norm"):
        assert ddp["result"][key] == pytest.approx(single[key], abs=1e-5), key
    assert sorted(p.name for p in (tmp_path / "ddp_run").iterdir()) == sorted(
        p.name for p in (tmp_path / "single_run").iterdir()
    )  # rank 0 wrote the run folder, nobody else wrote stray files
