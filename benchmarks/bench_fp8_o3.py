"""FP8 O3 memory per rank, measured: the O2 state of the FP8 linears sharded over N ranks (6/N bytes/param).

Run under torchrun (gloo on CPU, NCCL on GPU), one line per model, rank 0 prints::

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fp8_o3.py [--models gpt_micro ...]

Each rank builds the model exactly as ``bench_fp8_memory.py`` does (same models, batches and training step),
initialises FP8 O3, trains ``--warmup`` + ``--steps`` steps, then :func:`swinlab.fp8.memory_report` walks its live
tensors. A shard counts as its full weight's parameters, so "bytes/param" is this rank's bytes per model parameter;
the largest value over the ranks is printed. "comm" is what one rank sent per training step (FP8 weight
all-gathers, FP8 gradient reduce-scatters, amaxes, replicated gradients), per parameter.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.distributed as dist

from bench_fp8_memory import SHORT, add_arguments, build, make_batch, train_step
from swinlab.engine.distributed import process_group
from swinlab.fp8 import memory_report
from swinlab.fp8.memory import ROLES
from swinlab.fp8.shard import sharded_layers


def measure(name: str, *, batch_size: int, warmup: int, steps: int) -> list[str]:
    model, optimizer = build(name, "fp8-o3")
    batch = make_batch(model, batch_size, torch.float32)
    stats = sharded_layers(model)[0].o3.stats
    for _ in range(warmup):
        train_step(model, optimizer, batch, bf16=False)
    stats.reset()
    times = [train_step(model, optimizer, batch, bf16=False)[0] for _ in range(steps)]
    report = memory_report(model, optimizer)  # the last step's gradients are still alive
    world = dist.get_world_size()
    rows = []
    for scope_name, scope in report.scopes.items():
        if not scope.params:
            continue
        per_rank = [None] * world
        dist.all_gather_object(per_rank, [scope.per_param(role) for role in (*ROLES, None)])
        worst = [max(values) for values in zip(*per_rank, strict=True)]
        cells = " | ".join(f"{v:.3f}" for v in worst[:-1])
        comm = stats.bytes_sent / steps / report["model"].params
        rows.append(
            f"| {name} | fp8-o3 | {world} | {scope_name} | {scope.params / 1e6:.3f} | {cells} | **{worst[-1]:.3f}** "
            f"| {comm:.2f} | {1e3 * statistics.median(times):.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, batch_help="per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with process_group():  # gloo on CPU, nccl on CUDA
        main_rank = dist.get_rank() == 0
        if main_rank:
            roles = " | ".join(SHORT[role] for role in ROLES)
            print(f"torch {torch.__version__}, {dist.get_world_size()} ranks ({dist.get_backend()}), {args.threads} "
                  f"thread(s)/rank, batch {args.batch_size}/rank, median of {args.steps} steps after {args.warmup} "
                  "warm-up; bytes/param by role after a step, largest over the ranks")  # fmt: skip
            print(f"| model | recipe | ranks | scope | M params | {roles} | total B/param per rank | "
                  "comm B/param/step | step ms |")  # fmt: skip
            print("|" + " --- |" * (8 + len(ROLES)))
        for name in args.models:
            rows = measure(name, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps)
            if main_rank:
                print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
