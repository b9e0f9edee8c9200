"""FP8 gradient all-reduce through DDP vs the FP32 all-reduce: per-tensor error, non-finite count, bytes sent.

Run under torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc_per_node 2 benchmarks/bench_fp8_allreduce.py [--json out.json]

Each rank gets 13 gradient tensors of 4096 Gaussian elements whose typical magnitudes are 1e-8, 1e-7, ..., 1e4
(different values on every rank). A module whose loss is ``sum_t <p_t, g_t>`` makes backward produce exactly those
gradients, so the real DDP reducer buckets them (all 13 land in one bucket) and calls the registered hook. The
reference is a plain FP32 all-reduce of the same tensors divided by N. Rank 0 prints the table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from swinlab.engine.distributed import process_group
from swinlab.fp8.comm import FP8CommState, fp8_allreduce_hook
from swinlab.metrics import relative_l2_error

EXPONENTS = range(-8, 5)
NUMEL = 4096
CASES = (  # (payload, scales, exchange)
    ("e4m3", "tensor", "all_gather"),
    ("e4m3", "tensor", "reduce_scatter"),
    ("e5m2", "tensor", "all_gather"),
    ("e5m2", "tensor", "reduce_scatter"),
    ("e4m3", "bucket", "all_gather"),
    ("e5m2", "bucket", "all_gather"),
)


class GradientProbe(nn.Module):
    """One parameter per gradient tensor; ``forward(g)`` returns a loss whose gradient w.r.t. ``p_t`` is ``g_t``."""

    def __init__(self, count: int, numel: int) -> None:
        super().__init__()
        self.params = nn.ParameterList(nn.Parameter(torch.zeros(numel)) for _ in range(count))

    def forward(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return sum((p * g).sum() for p, g in zip(self.params, grads, strict=True))


def rank_gradients(rank: int, device: torch.device) -> list[torch.Tensor]:
    """The 13 gradient tensors of ``rank`` (seeded, so every run and every rank count is reproducible)."""
    out = []
    for k in EXPONENTS:
        g = torch.Generator().manual_seed(1000 * rank + k + 100)
        out.append((torch.randn(NUMEL, generator=g) * 10.0**k).to(device))
    return out


def reduce_through_ddp(grads: list[torch.Tensor], state: FP8CommState | None, repeats: int) -> tuple[list, float]:
    """Gradients DDP leaves in the parameters (FP8 hook if ``state``, else DDP's FP32 default) and median ms."""
    probe = GradientProbe(len(grads), NUMEL).to(grads[0].device)
    ddp = DistributedDataParallel(probe)
    if state is not None:
        ddp.register_comm_hook(state, fp8_allreduce_hook)
    times = []
    for _ in range(repeats):
        probe.zero_grad(set_to_none=True)
        if state is not None:
            state.stats.reset()
        dist.barrier()
        start = time.perf_counter()
        ddp(grads).backward()
        times.append(time.perf_counter() - start)
    return [p.grad.clone() for p in probe.params], sorted(times)[len(times) // 2] * 1e3


def run(repeats: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    grads = rank_gradients(rank, device)
    reference = [g.clone() for g in grads]
    for g in reference:
        dist.all_reduce(g)
        g /= world
    _, fp32_ms = reduce_through_ddp(grads, None, repeats)
    results = {"world_size": world, "backend": dist.get_backend(), "numel": NUMEL,
               "exponents": list(EXPONENTS), "fp32_ddp_ms": fp32_ms, "cases": []}  # fmt: skip
    for fmt, scaling, exchange in CASES:
        state = FP8CommState(fmt=fmt, scaling=scaling, exchange=exchange)
        reduced, ms = reduce_through_ddp(grads, state, repeats)
        results["cases"].append(
            {
                "fmt": fmt,
                "scaling": scaling,
                "exchange": exchange,
                "rel_l2": [relative_l2_error(x, r) for x, r in zip(reduced, reference, strict=True)],
                "nonfinite": int(sum((~torch.isfinite(x)).sum() for x in reduced)),
                "bytes_per_element": state.stats.bytes_per_element,
                "bytes_by_role": {k: v / state.stats.elements for k, v in state.stats.by_role.items()},
                "ms": ms,
            }
        )
    return results


def print_table(results: dict) -> None:
    print(f"{results['world_size']} ranks ({results['backend']}), 13 tensors x {results['numel']} elements, "
          f"one DDP bucket; FP32 DDP all-reduce {results['fp32_ddp_ms']:.2f} ms (median backward+reduce)")  # fmt: skip
    print("relative L2 error vs the FP32 all-reduce, per tensor (columns: typical magnitude)")
    magnitudes = " ".join(f"1e{k:+d}".rjust(6) for k in results["exponents"])
    print(f"{'payload':7} {'scales':6} {'exchange':14} {magnitudes}  worst  non-finite  B/elem sent     ms")
    for c in results["cases"]:
        errors = " ".join(f"{e:6.4f}" for e in c["rel_l2"])
        print(f"{c['fmt']:7} {c['scaling']:6} {c['exchange']:14} {errors} {max(c['rel_l2']):6.4f} "
              f"{c['nonfinite']:11d} {c['bytes_per_element']:12.4f} {c['ms']:6.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results to this file (rank 0)")
    parser.add_argument("--repeats", type=int, default=5, help="timed backward+reduce calls per case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with process_group():  # gloo on CPU, nccl on CUDA
        results = run(args.repeats)
        if dist.get_rank() == 0:
            print_table(results)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
