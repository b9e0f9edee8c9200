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
from pathlib import Path


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


def save_shared_weights(model_name: str, path, key: str) -> None:
    """Save a seeded ``model_name``'s state dict (under ``key``, the official checkpoint's) with non-trivial norm
    weights, so that a wrong key or layout mapping in a peer cannot pass the same-logits check."""
    import torch

    from swinlab import create_model

    torch.manual_seed(0)
    reference = create_model(model_name)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.05 * torch.randn_like(p))
    torch.save({key: reference.state_dict()}, path)


def make_step(model, x, mode: str, impl: str, optimizer: str, num_classes: int) -> Callable[[], None]:
    """One inference forward (``mode="infer"``) or one training step (cross entropy, backward, ``optimizer``
    kind as :func:`make_optimizer`) of ``model`` on ``x``, as a zero-argument callable."""
    import torch

    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return infer
    model.train()
    opt = make_optimizer(model, impl, optimizer)
    y = torch.randint(0, num_classes, (x.shape[0],))

    def train() -> None:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train


def run_mode(model, x, args, num_classes: int, unit: str) -> dict | None:
    """The worker side of one (implementation, mode) measurement on input ``x``: ``check`` saves the eval outputs
    for ``args.input`` to ``args.output`` (returns None), ``flops`` counts one sample's forward, ``infer`` / ``train``
    time steps (the first step is timed apart: it compiles compiled variants). Rates are ``<unit>s_per_s``."""
    import torch

    use_allocator(args.allocator)
    if args.mode == "check":
        model.eval()
        with torch.inference_mode():
            torch.save(model(torch.load(args.input, weights_only=True)), args.output)
        return None
    if args.mode == "flops":
        from swinlab.metrics.flops import flop_counter  # counts SDPA's CPU kernel too (torch's table does not)

        model.eval()
        with torch.no_grad(), flop_counter() as counter:
            model(x[:1])
        return {f"flops_per_{unit}": counter.get_total_flops()}
    step = make_step(model, x, args.mode, args.impl, args.optimizer, num_classes)
    t0 = time.perf_counter()
    step()
    first_step = time.perf_counter() - t0
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    timing = measure_steps(step, max(args.warmup - 1, 0), args.iters)
    # Minor page faults: every first touch of freshly mapped memory; expensive in this VM (see RESULTS.md).
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (max(args.warmup - 1, 0) + args.iters)
    return {**timing, f"{unit}s_per_s": x.shape[0] / timing["median_s"], "first_step_s": first_step,
            "page_faults": faults}  # fmt: skip


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


def venv_label(python: str, impl: str) -> str:
    """``impl (venv)``: which implementation ran on which interpreter (the venv folder of ``python``)."""
    return f"{impl} ({Path(python).parent.parent.name})"


def per_round_ratios(rows: list[dict], mode: str, label: str, peers: Sequence[str], rate: str) -> tuple[list, list]:
    """For every round holding both: the ``rate`` of the row ``label`` over that of the fastest of ``peers`` (impl
    names) in the same round, and the two rows' peak-RSS ratio. Rows of one round ran minutes apart with the
    implementations interleaved; between rounds this shared machine drifts by 10-30 %, so ratios are taken inside a
    round and their median reported."""
    speed, memory = [], []
    for rnd in sorted({r["round"] for r in rows}):
        ours = [r for r in rows if r["mode"] == mode and r["label"] == label and r["round"] == rnd]
        rivals = [r for r in rows if r["mode"] == mode and r["impl"] in peers and r["round"] == rnd]
        if ours and rivals:
            best = max(rivals, key=lambda r: r[rate])
            speed.append(ours[0][rate] / best[rate])
            memory.append(ours[0]["peak_rss_mib"] / best["peak_rss_mib"])
    return speed, memory


ALLOCATORS = ("system", "reuse")
"""``--allocator``, applied to every implementation of a run: ``system`` = glibc's default (a fresh ``mmap`` for every
large block), ``reuse`` = freed memory kept for reuse (:func:`swinlab.engine.allocator.reuse_freed_memory`, what
``swinlab train`` does)."""


def use_allocator(kind: str) -> None:
    """Apply ``--allocator`` ``kind`` (one of :data:`ALLOCATORS`, checked by argparse) to this worker process."""
    if kind == "reuse":
        from swinlab.engine.allocator import reuse_freed_memory

        if not reuse_freed_memory():
            raise SystemExit("--allocator reuse needs glibc's malloc (Linux)")


LINEAR_BACKENDS = ("mkl", "onednn")
"""The ``+mkl`` / ``+onednn`` ablation rows (``--linear-backends``): swinlab with every linear GEMM on one backend."""


def force_linear_backend(backend: str) -> None:
    """Route all of ``swinlab.layers.Linear``'s fp32 CPU GEMMs (forward and both gradients) to ``backend``: ``mkl``
    (torch's default GEMM on x86) or ``onednn``, whatever this CPU's default choice."""
    import swinlab.layers.linear as linear

    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"unknown linear backend {backend!r} (choose one of {', '.join(LINEAR_BACKENDS)})")
    forced = backend == "onednn" and linear.ONEDNN_AVAILABLE
    linear.ONEDNN_LINEAR = linear.ONEDNN_WEIGHT_GRAD = forced


def gemm_peak(threads: int, n: int = 2048, iters: int = 10) -> dict[str, float]:
    """fp32 GEMM GFLOP/s on this machine with ``threads`` threads (best of ``iters``), per backend: ``mm``
    (torch's matmul: MKL on x86 CPUs) and ``onednn`` (the path of ``swinlab.layers.Linear``). The two differ by
    2x or more on some CPUs (MKL's generic path on AMD), so the faster one is the machine's peak."""
    import torch

    from swinlab.layers.linear import ONEDNN_AVAILABLE, _onednn

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    kernels = {"mm": lambda: a @ b}
    if ONEDNN_AVAILABLE:
        kernels["onednn"] = lambda: _onednn(a, b, None)
    peaks = {}
    for name, fn in kernels.items():
        fn()
        peaks[name] = 2 * n**3 / min(_timed(fn) for _ in range(iters)) / 1e9
    return peaks


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
