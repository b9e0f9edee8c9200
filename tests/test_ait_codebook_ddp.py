"""The EMA codebook under DDP learns from the whole global batch and stays one codebook on every rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from _codebook_dist_worker import train

WORKER = Path(__file__).with_name("_codebook_dist_worker.py")


def test_two_gloo_ranks_keep_one_codebook_learnt_from_the_global_batch(tmp_path):
    out = tmp_path / "codebooks.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    for init in ("official", "data"):
        rank0, rank1 = result[init]
        for name in rank0:  # the same codebook on both ranks, bit for bit
            assert torch.equal(rank0[name], rank1[name]), (init, name)
    # counts and sums all-reduced: the update of one process on the whole global batch, to float rounding
    single = train("official", 0.0, None)
    for name, value in single.items():
        torch.testing.assert_close(result["official"][0][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(train("official", 0.0, 0)["_embedding"], single["_embedding"])  # one shard differs
