"""Helpers shared by the benchmark scripts: the timing protocol, machine-load accounting, the GEMM peak, the
training-step optimizer, running a measurement in a subprocess of another interpreter, and what ``bench_swin.py``
``bench_video_swin.py`` and ``bench_simmim.py`` share: their worker processes, the rounds of rows, the results table
and the ratio lines, the machine line, the official-to-torchvision key mapping.

Why subprocesses: every (implementation, mode) pair gets its own process, so its peak RSS is its own, and peers that
need another torch (timm / torchvision beside torch 2.14.1) run from their own venv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


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


def perturb_norms(model: nn.Module) -> nn.Module:
    """Give every norm parameter of ``model`` a non-trivial value (weights 1 ± 0.1, biases ± 0.05, from torch's
    global RNG), so that a wrong key or layout mapping in a peer cannot pass the same-outputs check."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.05 * torch.randn_like(p))
    return model


def save_shared_weights(model: str | nn.Module, path, key: str) -> None:
    """Save the state dict (under ``key``, the official checkpoint's) of ``model`` — a registered name, created
    under torch's seed 0, or a module its caller seeded — after :func:`perturb_norms`."""
    import torch

    from swinlab import create_model

    if isinstance(model, str):
        torch.manual_seed(0)
        model = create_model(model)
    torch.save({key: perturb_norms(model).state_dict()}, path)


def autocast(precision: str):
    """The context of every forward under ``--precision``: nothing for fp32, CPU autocast to bfloat16 for bf16 (what
    ``swinlab train --set precision=bf16`` does), the same for every implementation."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def make_step(
    model,
    x,
    mode: str,
    impl: str,
    optimizer: str,
    num_classes: int,
    precision: str = "fp32",
    criterion: Callable[[object], torch.Tensor] | None = None,
) -> Callable[[], None]:
    """One inference forward (``mode="infer"``) or one training step (loss, backward, ``optimizer`` kind as
    :func:`make_optimizer`) of ``model`` on ``x`` under ``precision``, as a zero-argument callable. The loss is
    ``criterion(model(x))``, by default the cross entropy against random labels of ``num_classes``."""
    import torch

    if mode == "infer":
        return infer_step(model, x, precision)
    model.train()
    opt = make_optimizer(model, impl, optimizer)
    if criterion is None:
        y = torch.randint(0, num_classes, (x.shape[0],))

        def criterion(logits: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(logits.float(), y)

    def train() -> None:
        with autocast(precision):
            loss = criterion(model(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train


def infer_step(model: nn.Module, x: torch.Tensor, precision: str = "fp32") -> Callable[[], None]:
    """``model`` in eval mode; one ``inference_mode`` forward on ``x`` as a zero-argument callable."""
    import torch

    model.eval()

    def infer() -> None:
        with torch.inference_mode(), autocast(precision):
            model(x)

    return infer


def run_mode(model, x, args, num_classes: int, unit: str, criterion=None) -> dict | None:
    """The worker side of one (implementation, mode) measurement on input ``x``: ``check`` saves the eval outputs
    for ``args.input`` to ``args.output`` (returns None), ``flops`` counts one sample's forward, ``infer`` / ``train``
    time steps (the first step is timed apart: it compiles compiled variants; ``criterion`` as :func:`make_step`).
    Rates are ``<unit>s_per_s``."""
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
    step = make_step(model, x, args.mode, args.impl, args.optimizer, num_classes, args.precision, criterion)
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
        peaks[name] = 2 * n**3 / min(timed(fn) for _ in range(iters)) / 1e9
    return peaks


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as floats (empty cells left out; no file: no rows), for claim scripts
    that resume or only read runs."""
    import csv

    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


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


# What bench_swin.py and bench_video_swin.py share: each script runs itself as the worker (``--worker``) of every
# (interpreter, implementation, mode); a parent passes it the settings named in WORKER_ARGS.

Impl = tuple[str, str]
"""(python interpreter, implementation name such as ``swinlab+compile``): one column of a run."""

Run = Callable[..., "dict | None"]
"""``run(python, impl, mode, **extra)``: :func:`run_worker` with the script and its settings bound."""

WORKER_ARGS = ("threads", "batch", "img", "iters", "warmup", "weights", "optimizer", "allocator", "precision")
"""The parent's settings every worker gets (a script adds its own, such as ``frames``, through ``forward``)."""


def add_arguments(parser: argparse.ArgumentParser, *, batch: int, img: int, iters: int, warmup: int) -> None:
    """The options both scripts have (with their defaults of ``batch``, ``img``, ``iters``, ``warmup``) and the
    hidden ones of their worker processes."""
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--img", type=int, default=img)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--rounds", type=int, default=3, help="repeat all rows, interleaved, this many times")
    parser.add_argument("--modes", default="infer,train", help="comma-separated subset of infer,train")
    parser.add_argument(
        "--linear-backends",
        action="store_true",
        help="also measure swinlab with its linears forced onto MKL (+mkl) and onto oneDNN (+onednn): the ablation",
    )
    parser.add_argument("--optimizer", choices=("plain", "fused", "engine"), default="plain")
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="system", help="CPU allocator setting of every implementation"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32",
        help="bf16: every implementation under CPU autocast to bfloat16 (fast on CPUs with AMX / avx512_bf16)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write all raw results here")
    parser.add_argument(
        "--alternate", action="store_true",
        help="also run swinlab and its peer in one peer process, one step of each in turn (see alternate_worker)",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)


def run_worker(
    script: str, python: str, impl: str, mode: str, args: argparse.Namespace, forward: Sequence[str] = (), **extra
) -> dict | None:
    """Run ``script --worker`` with ``python`` for one ``impl`` and ``mode``, passing on the :data:`WORKER_ARGS` and
    ``forward`` settings of ``args`` and ``extra`` as ``--key value``; returns its JSON result (:func:`run_json`)."""
    cmd = [python, script, "--worker", "--impl", impl, "--mode", mode]
    for key in (*WORKER_ARGS, *forward):
        cmd += [f"--{key}", str(getattr(args, key))]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    return run_json(cmd, args.threads, f"{impl}/{mode}")


def setup_worker(threads: int) -> None:
    """This worker process: ``threads`` intra-op threads, one inter-op thread, torch's seed 0."""
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)


def worker(
    args: argparse.Namespace,
    build: Callable[[str, str | None], nn.Module],
    sample: Sequence[int],
    num_classes: int,
    unit: str,
    criterion: Callable[[object], torch.Tensor] | None = None,
) -> None:
    """The worker side of :func:`run_worker`: ``build(args.impl, args.weights)``, a seeded random batch of
    ``args.batch`` samples of shape ``sample``, then :func:`run_mode` (``criterion`` as :func:`make_step`); prints
    the result as one JSON line."""
    import torch

    setup_worker(args.threads)
    if args.impl.startswith(ALTERNATE):
        alternate_worker(args, build, args.impl.removeprefix(ALTERNATE).split(","), sample, num_classes, criterion)
        return
    model = build(args.impl, args.weights)
    x = torch.randn(args.batch, *sample)
    measured = run_mode(model, x, args, num_classes=num_classes, unit=unit, criterion=criterion)
    if measured is not None:
        print(json.dumps({"impl": args.impl, "mode": args.mode, "torch": torch.__version__, **measured}))


ALTERNATE = "alternate:"
"""Worker ``--impl`` prefix of the alternating mode: ``alternate:swinlab,<peer>``."""


def alternate_worker(
    args: argparse.Namespace,
    build: Callable[[str, str | None], nn.Module],
    impls: Sequence[str],
    sample: Sequence[int],
    num_classes: int,
    criterion: Callable[[object], torch.Tensor] | None = None,
) -> None:
    """Two implementations in one process, one step of each in turn (the order swapped every pair): this shared
    machine changes speed from one second to the next, so steps taken side by side are the comparable ones. Prints
    the per-pair rate ratios ``impls[0] / impls[1]`` (no per-implementation peak memory in this mode).

    The order matters: a step that follows a step of its own model finds the heap and caches as it left them, so
    the pairs that start with ``impls[0]`` (whose first step follows its own) favour it and the others its peer
    (SimMIM: 1.4-1.5x against 1.1-1.3x). ``--iters`` is rounded up to an even count, so both orders weigh the
    same in the median, and :func:`report_alternate` shows each order's median."""
    import torch

    use_allocator(args.allocator)
    x = torch.randn(args.batch, *sample)
    steps = {
        impl: make_step(build(impl, args.weights), x, args.mode, impl, args.optimizer, num_classes, args.precision,
                        criterion)
        for impl in impls
    }  # fmt: skip
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for i in range(args.warmup + args.iters + args.iters % 2):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            seconds = measure_steps(steps[impl], 0, 1)["median_s"]
            if i >= args.warmup:
                times[impl].append(seconds)
    ratios = [b / a for a, b in zip(times[impls[0]], times[impls[1]], strict=True)]
    print(json.dumps({"alternate": list(impls), "mode": args.mode, "torch": torch.__version__, "times": times,
                      "ratios": ratios, "warmup": args.warmup}))  # fmt: skip


def measure(
    run: Run,
    impls: Sequence[Impl],
    args: argparse.Namespace,
    report: Callable[[list[dict]], None],
    peers: Sequence[str],
    raw: dict,
) -> None:
    """The timed part every script shares: :func:`run_rounds`, ``report(rows)``, then with ``--alternate``
    swinlab against each of ``peers`` in alternating steps (:func:`report_alternate`); ``--json`` gets the rows,
    the alternating runs and ``raw``."""
    modes = args.modes.split(",")
    rows = run_rounds(run, impls, modes, args.rounds)
    report(rows)
    alternating = []
    if args.alternate and args.peer_python:
        measured = {impl for python, impl in impls if python == args.peer_python}
        for peer in (p for p in peers if {"swinlab", p} <= measured):
            alternating += report_alternate(run, args.peer_python, ("swinlab", peer), modes)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "alternating": alternating, **raw}, indent=1))


def alternate_orders(ratios: Sequence[float], warmup: int) -> tuple[float, float]:
    """Median ratio of the pairs :func:`alternate_worker` began with its first implementation, and of the others
    (``nan`` for an order with no pair)."""
    by_order: tuple[list[float], list[float]] = ([], [])
    for i, r in enumerate(ratios, start=warmup):
        by_order[i % 2].append(r)
    return tuple(statistics.median(rs) if rs else float("nan") for rs in by_order)


def report_alternate(run: Run, python: str, impls: Sequence[str], modes: Sequence[str]) -> list[dict]:
    """Run :func:`alternate_worker` for each mode with ``python`` and print its per-pair ratios and their median."""
    results = []
    for mode in modes:
        res = run(python, ALTERNATE + ",".join(impls), mode)
        if res:
            results.append(res)
            ratios = ", ".join(f"{r:.2f}" for r in res["ratios"])
            orders = alternate_orders(res["ratios"], res["warmup"])
            print(f"{mode}, alternating steps in one process (torch {res['torch']}): {impls[0]} / {impls[1]} "
                  f"per step pair {ratios} (median {statistics.median(res['ratios']):.2f}x; pairs begun by "
                  f"{impls[0]} {orders[0]:.2f}x, by {impls[1]} {orders[1]:.2f}x)")  # fmt: skip
    return results


def shared_inputs(model: str | nn.Module, key: str, shape: Sequence[int], prefix: str) -> Path:
    """A fresh temporary folder holding ``weights.pt`` (:func:`save_shared_weights` of ``model``) and
    ``input.pt``, a random tensor of ``shape``: the full batch, so a compiled model's check and timing runs share
    one graph (and inductor's on-disk cache)."""
    import torch

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    save_shared_weights(model, tmp / "weights.pt", key=key)
    torch.save(torch.randn(*shape), tmp / "input.pt")
    return tmp


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
"""The ``/proc/cpuinfo`` flags :func:`machine_line` reports: the ones that decide which CPU kernels run."""


def machine_line() -> str:
    """This machine in one line: CPU model name, ``/proc/cpuinfo`` family / model, online CPUs, the
    :data:`SIMD_FLAGS` it has, torch's CPU capability (``/proc/cpuinfo`` missing: the platform's processor)."""
    import platform

    import torch

    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if not line.strip():
                break  # the first processor's block is enough
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    name = info.get("model name") or platform.processor() or platform.machine()
    simd = " ".join(f for f in SIMD_FLAGS if f in flags) or "none of " + "/".join(SIMD_FLAGS)
    return (
        f"machine: {name}, family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
        f"{os.cpu_count()} CPUs, flags {simd}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )


def report_gemm_peak(threads: int) -> dict[str, float]:
    """The :func:`machine_line`, then :func:`gemm_peak`, printed as it is measured."""
    print(machine_line(), flush=True)
    print(f"fp32 GEMM peak ({threads} threads): ", end="", flush=True)
    peaks = gemm_peak(threads)
    print(", ".join(f"{name} {value:.0f}" for name, value in peaks.items()) + " GFLOP/s", flush=True)
    return peaks


def check_logits(run: Run, impls: Sequence[Impl], tmp: Path, compare: Callable | None = None) -> dict:
    """Every implementation's eval outputs on ``tmp/input.pt`` (worker mode ``check``), compared with those of
    the first implementation whose check ran, by :func:`venv_label`: ``compare(outputs, first)``, by default the
    largest absolute difference of two tensors (logits)."""
    import torch

    if compare is None:

        def compare(out: torch.Tensor, base: torch.Tensor) -> float:
            return float((out - base).abs().max())

    outputs = {}
    for python, impl in impls:
        out = tmp / f"{impl}-{Path(python).parent.parent.name}.pt"
        run(python, impl, "check", input=tmp / "input.pt", output=out)
        if out.exists():
            outputs[venv_label(python, impl)] = torch.load(out, weights_only=True)
    base = next(iter(outputs.values()))
    return {label: compare(o, base) for label, o in outputs.items()}


def run_rounds(run: Run, impls: Sequence[Impl], modes: Sequence[str], rounds: int) -> list[dict]:
    """Every (implementation, mode) row, ``rounds`` times with the implementations interleaved inside each round
    (see :func:`per_round_ratios`); a row is the worker's result plus its ``round`` and ``label``
    (:func:`venv_label`). ``+freeze`` variants run inference only."""
    rows = []
    for rnd in range(rounds):
        for mode in modes:
            for python, impl in impls:
                if mode == "train" and impl.endswith("+freeze"):
                    continue
                label = venv_label(python, impl)
                print(f"  round {rnd + 1}/{rounds} {mode:<5} {label}", flush=True)
                res = run(python, impl, mode)
                if res:
                    rows.append({**res, "round": rnd, "label": label})
    return rows


Column = tuple[str, Callable[[dict], str]]
"""A column of :func:`print_rows`: its header and the cell it prints for a row."""


def print_rows(
    rows: Sequence[dict],
    flops: float,
    peak: float,
    args: argparse.Namespace,
    name: Column,
    rate: Column,
    extra: Sequence[Column] = (),
) -> None:
    """The markdown table of ``rows``: round, ``name``, torch, mode, ``rate``, median ms, the GFLOP/s that
    ``flops`` per sample imply (a training step counted as 3 forwards) and their share of the GEMM ``peak``, peak
    RSS, the ``extra`` columns, busy; then the run's training-step optimizer and allocator."""

    def gflops(r: dict) -> float:
        return flops * args.batch * (3 if r["mode"] == "train" else 1) / r["median_s"] / 1e9

    columns = [
        ("round", lambda r: str(r["round"] + 1)),
        name,
        ("torch", lambda r: r["torch"]),
        ("mode", lambda r: r["mode"]),
        rate,
        ("median ms", lambda r: f"{r['median_s'] * 1e3:.0f}"),
        ("GFLOP/s", lambda r: f"{gflops(r):.0f}"),
        ("% of GEMM peak", lambda r: f"{100 * gflops(r) / peak:.0f}%"),
        ("peak RSS MiB", lambda r: f"{r['peak_rss_mib']:.0f}"),
        *extra,
        ("busy*", lambda r: f"{100 * r['busy_others']:.0f}%"),
    ]
    print("| " + " | ".join(header for header, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(cell(r) for _, cell in columns) + " |")
    print(f"training step optimizer: {args.optimizer} (see _common.make_optimizer); allocator: {args.allocator}; "
          f"precision: {args.precision}")  # fmt: skip


def print_ratios(rows: list[dict], mode: str, label: str, peers: Sequence[str], rate: str, unit: str) -> None:
    """The line of :func:`per_round_ratios` of row ``label`` against ``peers`` (by ``rate``, printed as ``unit``),
    if any round holds both."""
    speed, memory = per_round_ratios(rows, mode, label, peers, rate)
    if speed:
        against = peers[0] if len(peers) == 1 else f"faster of {' and '.join(peers)}"
        print(
            f"{mode}: {label} / {against}: {unit} ratio per round {', '.join(f'{v:.2f}' for v in speed)} "
            f"(median {statistics.median(speed):.2f}x); peak RSS ratio median {statistics.median(memory):.2f}x"
        )


def torchvision_stage_key(parts: list[str], first: int) -> list[str]:
    """The parts of an official key ``layers.i.blocks.j.<rest>`` or ``layers.i.downsample.<rest>`` in torchvision's
    Swin layout, where stage ``i`` is ``features.(first + 2i)`` (``first`` is 1 where the patch embedding is
    ``features.0``, as in ``swin_v2_*``, else 0) and its patch merging the next entry, and the MLP's ``fc1`` / ``fc2``
    are ``mlp.0`` / ``mlp.3``."""
    stage = int(parts[1])
    if parts[2] == "downsample":
        return ["features", str(first + 2 * stage + 1), *parts[3:]]
    rest = ".".join(parts[4:]).replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.3")
    return ["features", str(first + 2 * stage), parts[3], rest]


def load_torchvision(model: nn.Module, state: dict, computed: str) -> None:
    """Load ``state``, already in torchvision's layout, into the torchvision ``model``: every key must be used and
    every key of ``model`` given, but for the buffers whose names contain ``computed`` (torchvision makes those)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if computed not in k]
    if missing or unexpected:
        raise RuntimeError(f"torchvision key map incomplete: {missing[:5]} {unexpected[:5]}")
