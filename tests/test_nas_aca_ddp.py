"""ACA's channel importance under DDP is measured over every rank's shard of the held-out split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from _aca_dist_worker import scores

WORKER = Path(__file__).with_name("_aca_dist_worker.py")


def test_two_gloo_ranks_measure_the_importance_of_the_whole_split(tmp_path):
    out = tmp_path / "scores.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = subprocess.run([*cmd, str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0, rank1 = torch.load(out, weights_only=True)
    whole, half = scores(None), scores(0)
    for kind in ("normal", "reduce"):
        for e, cells in enumerate(whole[kind]):
            for c, expected in enumerate(cells):
                assert torch.equal(rank0[kind][e][c], rank1[kind][e][c])  # one result on every rank
                torch.testing.assert_close(rank0[kind][e][c], expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(half["normal"][0][0], whole["normal"][0][0])  # one shard alone differs
