"""benchmarks/_common.py's alternating protocol: an even number of step pairs, so that the pairs each
implementation begins weigh the same, and the medians of the two orders told apart."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common


def test_alternate_worker_runs_both_orders_equally(capsys):
    def build(impl: str, weights: str | None) -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 4 if impl == "a" else 64), nn.ReLU(), nn.LazyLinear(3))

    args = argparse.Namespace(batch=2, iters=3, warmup=1, mode="train", optimizer="plain", precision="fp32",
                              allocator="system", weights=None)  # fmt: skip
    _common.alternate_worker(args, build, ["a", "b"], (3, 2, 2), num_classes=3)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["ratios"]) == len(out["times"]["a"]) == 4  # 3 rounded up to an even count
    assert out["warmup"] == 1
    for ratio, a, b in zip(out["ratios"], out["times"]["a"], out["times"]["b"], strict=True):
        assert math.isclose(ratio, b / a)


def test_alternate_orders_split_pairs_by_who_began():
    # after one warm-up pair, the pairs are numbered 1, 2, 3, 4: the even ones began with the first implementation
    assert _common.alternate_orders([1.0, 2.0, 3.0, 4.0], warmup=1) == (3.0, 2.0)
    assert _common.alternate_orders([1.0, 2.0, 3.0, 4.0], warmup=2) == (2.0, 3.0)
    first, second = _common.alternate_orders([5.0], warmup=0)
    assert first == 5.0 and math.isnan(second)
