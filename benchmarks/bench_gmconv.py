"""GMConv's cost on CPU: ResNet-50 training step and inference, plain conv vs GMConv (and GMConv after fuse()).

The mask is k x k per channel and folded into the weight once per forward, so a training step should cost at
most a few percent more than the plain model's (target <= 10 %), and a fused model exactly the plain one.
All variants start from the same weights and see the same batch; measurements are interleaved (plain, GMConv,
plain, ...) so drifting load on a shared machine hits both alike, and each ratio is the median of the
per-round ratios.

    python benchmarks/bench_gmconv.py                      # ResNet-50, 224 px, batch 8, 1 thread
    python benchmarks/bench_gmconv.py --threads 2 --rounds 7
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import swinlab
from _common import infer_step, timed
from swinlab.config import OptimConfig
from swinlab.engine import build_optimizer
from swinlab.layers import GMConv2d, fuse_gmconv


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One full step as the engine takes it: forward, cross-entropy, backward, AdamW update."""
    optimizer = build_optimizer(model, OptimConfig(lr_mult={"log_sigma": 10.0}))
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def mask_work(model: nn.Module) -> Callable[[], None]:
    """What GMConv adds to a step, alone: every layer's mask and ``weight * mask`` forward, and their backward
    down to ``log_sigma`` and ``weight`` (driven by a sum, which adds one more pass: an upper bound). Timed
    on its own it is far less sensitive to a busy machine than the difference of two multi-second steps."""
    layers = [m for m in model.modules() if isinstance(m, GMConv2d)]

    def run() -> None:
        sum(m.masked_weight().sum() for m in layers).backward()

    return run


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    base = times[baseline]
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "ratio_vs_" + baseline: statistics.median(a / b for a, b in zip(t, base, strict=True)),
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", help="plain model; its _gmconv twin is compared")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    plain = swinlab.create_model(args.model)
    gmconv = swinlab.create_model(f"{args.model}_gmconv")
    gmconv.load_state_dict(plain.state_dict())  # same weights; sigma at its k/2 start
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, plain.num_classes, (args.batch,))

    fused = copy.deepcopy(gmconv)
    fused_names = fuse_gmconv(fused)
    with torch.inference_mode():
        gap = (fused.eval()(x) - gmconv.eval()(x)).abs().max().item()

    load = os.getloadavg()[0]
    train_times = interleaved(
        {"plain": train_step(copy.deepcopy(plain), x, y), "gmconv": train_step(copy.deepcopy(gmconv), x, y)},
        args.rounds, args.warmup,
    )  # fmt: skip
    infer_times = interleaved(
        {"plain": infer_step(plain, x), "gmconv_fused": infer_step(fused, x), "gmconv_unfused": infer_step(gmconv, x)},
        args.rounds, args.warmup,
    )  # fmt: skip
    mask_times = interleaved({"mask": mask_work(gmconv)}, rounds=10 * args.rounds, warmup=args.warmup)["mask"]
    mask_s = statistics.median(mask_times)
    result = {
        "model": args.model, "img_size": args.img_size, "batch": args.batch, "threads": args.threads,
        "rounds": args.rounds, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "load_1min_before": load, "load_1min_after": os.getloadavg()[0], "fused_layers": len(fused_names),
        "fused_vs_unfused_max_abs_diff": gap,
        "train_step": summarise(train_times, "plain"), "inference": summarise(infer_times, "plain"),
        "mask_work_median_s": mask_s,
        "mask_work_vs_plain_step": mask_s / statistics.median(train_times["plain"]),
    }  # fmt: skip
    print(f"{args.model} vs {args.model}_gmconv, {args.img_size} px, batch {args.batch}, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; 1-min load {load:.1f} -> {result['load_1min_after']:.1f}")  # fmt: skip
    for section in ("train_step", "inference"):
        for name, row in result[section].items():
            ms = f"median {row['median_s'] * 1000:8.1f} ms  min {row['min_s'] * 1000:8.1f} ms"
            print(f"  {section:<10} {name:<15} {ms}  ratio vs plain {row['ratio_vs_plain']:.3f}")
    print(f"  GMConv's own work per step (all masks, forward + backward) {mask_s * 1000:.1f} ms = "
          f"{100 * result['mask_work_vs_plain_step']:.2f} % of the plain step's median")  # fmt: skip
    print(f"  fused {len(fused_names)} GMConv layers; max |fused - unfused| output difference {gap:.2e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
