"""Helpers shared by the benchmark scripts: the timing protocol, machine-load accounting, the GEMM peak, the
training-step optimizer and running a measurement in a subprocess of another interpreter.

Why subprocesses: every (implementation, mode) pair gets its own process, so its peak RSS is its own, and peers that
need another torch (timm / torchvision beside torch 2.14.1) run from their own venv.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def _proc_stat() -> tuple[float, float]:
    """(total jiffies, idle jiffies) of the whole machine."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    return sum(fields), fields[3] + fields[4]


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_steps(step: Callable[[], None], warmup: int, iters: int) -> dict:
    """Run ``step`` ``warmup`` times untimed, then ``iters`` times timed. Returns the median and every time, the
    process's peak RSS, and ``busy_others``: the share of the machine other processes used during the timed loop
    (from /proc/stat; rows with more than a few percent were disturbed)."""
    for _ in range(warmup):
        step()
    times = []
    total0, idle0 = _proc_stat()
    cpu0 = _own_cpu()
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    total1, idle1 = _proc_stat()
    ticks = os.sysconf("SC_CLK_TCK")
    machine_busy = (total1 - total0) - (idle1 - idle0)
    others = max(0.0, machine_busy / ticks - (_own_cpu() - cpu0)) * ticks
    return {
        "median_s": statistics.median(times),
        "times": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "busy_others": others / max(total1 - total0, 1),
    }


def make_optimizer(model, impl: str, kind: str):
    """AdamW for the training step: ``plain`` = torch's default AdamW for every implementation (on CPU its
    per-parameter loop), ``fused`` = ``AdamW(fused=True)`` for every implementation, ``engine`` = swinlab rows
    use the toolkit's own ``build_optimizer`` (weight-decay groups, fused kernel), peers torch's default."""
    import torch

    if kind == "engine" and impl.startswith("swinlab"):
        from swinlab.config import OptimConfig
        from swinlab.engine.optim import build_optimizer

        return build_optimizer(model, OptimConfig(lr=1e-4))
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if kind == "fused" else None)


def gemm_peak(threads: int, n: int = 2048, iters: int = 10) -> float:
    """fp32 GEMM GFLOP/s on this machine with ``threads`` threads (best of ``iters``)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(iters))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_json(cmd: Sequence[str], threads: int, what: str) -> dict | None:
    """Run a worker command with ``threads`` OpenMP threads and return the last JSON line it prints (``{}`` if
    none); ``None``, with its stderr shown, if it failed."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"  {what} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def available(python: str, impl: str) -> bool:
    """Whether ``impl``'s module (the part before any ``+variant``) imports in ``python``."""
    module = impl.partition("+")[0]
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0
