"""One DARTS search iteration (architect step + weight step) of the super-net: swinlab vs the official code.

The official code (quark0/darts ``cnn/``, patched only to run on a CPU) is imported from
``../shared/reference/darts_official`` (``--official``). Both super-nets start from the same seeded weights, BN
statistics and α, get the same SGD (momentum buffers made by one shared warm-up step) and the same batches, and take
the official ``train()`` iteration: ``architect.step`` on the validation batch (first order, or second order through
one unrolled weight step), then a weight step with gradient clipping at 5.

Gate first, or nothing is timed: one iteration of each from identical states; α, the weights and the BN statistics
afterwards must agree (α within 1e-6, as ``tests/test_nas_darts.py`` checks). With ``--fast-convolutions``
(swinlab's opt-in :func:`swinlab.nas.use_fast_convolutions`) the second order is gated on accuracy instead: the
finite-difference Hessian-vector product amplifies fp32 rounding (errors ~5e-4 against the float64 result, whose
largest entries are ~0.09), and any other summation order, the official code's own at another thread count
included, gives other numbers of that size. So there the α gradient is checked against the same algorithm in
float64: over ``--states`` seeded states, swinlab's mean error may not exceed the larger of the official code's at
1 thread and at ``--threads``.

Then, in one process, the two implementations alternate iteration by iteration (order swapped every pair): this
shared machine changes speed from one second to the next, so iterations taken side by side are the comparable ones.
Each round's ratio is the median of its per-pair ratios; the reported ratio is the median over rounds.

    python benchmarks/bench_darts.py                        # both orders, 2 threads, 3 rounds of 5 pairs
    python benchmarks/bench_darts.py --order second --rounds 5 --iters 7
    python benchmarks/bench_darts.py --profile              # top ops of one iteration of each
    python benchmarks/bench_darts.py --fast-convolutions    # swinlab with its opt-in faster convolutions
    python benchmarks/bench_darts.py --accuracy --fast-convolutions   # only their second-order gate's table
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from _common import machine_line, measure_steps
from swinlab.nas import Architect, Network, use_fast_convolutions

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "darts_official"
OFFICIAL_MODULES = ("genotypes", "operations", "model_search", "architect")
"""What the search needs; its ``utils`` (which imports torchvision) is not imported."""

SGD_ARGS = {"lr": 0.025, "momentum": 0.9, "weight_decay": 3e-4}
ARCH_ARGS = {"arch_learning_rate": 3e-4, "arch_weight_decay": 1e-3}
GRAD_CLIP = 5.0
ALPHA_ATOL = 1e-6
WEIGHT_ATOL = 1e-5
"""Weights after the whole iteration: the official second-order step perturbs the weights in place and back, which
leaves 1-ulp round-off on some (``stem.1.weight``: 1.2e-7); the weight step after it turns that into ~1e-6 (1.1e-6
with swinlab's code unchanged from the official order); with ``--fast-convolutions``, ~1e-6 at first order too.
After the architect step alone the tests hold them to 1e-6."""
IMPLS = ("swinlab", "official")
SHAPE_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::bmm", "aten::mm")
"""The ops ``--profile`` also lists by input shape."""


def import_official(folder: Path) -> SimpleNamespace:
    """The official modules, imported under their flat names, then taken out of ``sys.modules`` again (the names
    are generic)."""
    if not folder.is_dir():
        raise SystemExit(f"official DARTS code not found at {folder} (pass --official)")
    saved = {n: sys.modules.pop(n) for n in OFFICIAL_MODULES if n in sys.modules}
    sys.path.insert(0, str(folder))
    try:
        return SimpleNamespace(**{n: importlib.import_module(n) for n in OFFICIAL_MODULES})
    finally:
        sys.path.remove(str(folder))
        for n in OFFICIAL_MODULES:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


class Searcher:
    """One implementation's super-net, weight optimizer and architect, and its search iteration."""

    def __init__(self, model: nn.Module, make_architect: Callable[[nn.Module], object]) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), **SGD_ARGS)
        self.architect = make_architect(model)

    def weight_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad()
        self.model._loss(x, y).backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()

    def iteration(self, batches: tuple[torch.Tensor, ...], unrolled: bool) -> None:
        """The official ``train()`` loop body: α on the validation batch, then the weights on the training batch."""
        xt, yt, xv, yv = batches
        self.architect.step(xt, yt, xv, yv, SGD_ARGS["lr"], self.optimizer, unrolled)
        self.weight_step(xt, yt)


def make_pair(official: SimpleNamespace, args: argparse.Namespace, seed: int = 0) -> tuple[dict[str, Searcher], tuple]:
    """The two searchers in identical states (weights, BN statistics, α, momentum buffers), and the batches;
    ``seed`` picks the state."""
    torch.manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    ref = official.model_search.Network(args.C, 10, args.layers, criterion)
    ours = Network(args.C, 10, args.layers, criterion)
    if args.fast_convolutions:
        use_fast_convolutions(ours)
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(ours.arch_parameters(), ref.arch_parameters(), strict=True):
            a.copy_(b)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = (args.batch, 3, args.img, args.img)
    batches = tuple(
        t
        for _ in range(2)
        for t in (torch.randn(shape, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
    )
    official_args = SimpleNamespace(momentum=SGD_ARGS["momentum"], weight_decay=SGD_ARGS["weight_decay"], **ARCH_ARGS)
    pair = {
        "swinlab": Searcher(ours, lambda m: Architect(m, SGD_ARGS["momentum"], SGD_ARGS["weight_decay"], **ARCH_ARGS)),
        "official": Searcher(ref, lambda m: official.architect.Architect(m, official_args)),
    }
    pair["official"].weight_step(*batches[:2])  # momentum buffers, so the unrolled step uses them
    ours.load_state_dict(ref.state_dict(), strict=True)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        pair["swinlab"].optimizer.state[p]["momentum_buffer"] = (
            pair["official"].optimizer.state[q]["momentum_buffer"].clone()
        )
    return pair, batches


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float() - b.detach().float()).abs().max().item()


def equality_gate(official: SimpleNamespace, args: argparse.Namespace, unrolled: bool) -> dict[str, float]:
    """One iteration of each from identical states: the largest differences of α, weights and BN statistics."""
    pair, batches = make_pair(official, args)
    for searcher in pair.values():
        searcher.iteration(batches, unrolled)
    ours, ref = pair["swinlab"].model, pair["official"].model
    state = ours.state_dict()
    params = {n for n, _ in ref.named_parameters()}
    return {
        "alpha": max(max_diff(a, b) for a, b in zip(ours.arch_parameters(), ref.arch_parameters(), strict=True)),
        "weights": max(max_diff(state[n], v) for n, v in ref.state_dict().items() if n in params),
        "bn_stats": max(max_diff(state[n], v) for n, v in ref.state_dict().items() if n not in params),
    }


def alpha_grad(
    official: SimpleNamespace,
    args: argparse.Namespace,
    impl: str,
    threads: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The second-order α gradient of one architect step from state ``seed``, flattened, in float64: ``impl``'s
    code at ``threads``, computed in ``dtype``."""
    torch.set_num_threads(threads)
    pair, batches = make_pair(official, args, seed)
    searcher = pair[impl]
    model = searcher.model.to(dtype)
    with torch.no_grad():
        for a in model.arch_parameters():
            a.data = a.data.to(dtype)
    for state in searcher.optimizer.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].to(dtype)
    xt, yt, xv, yv = (t.to(dtype) if t.is_floating_point() else t for t in batches)
    if impl == "swinlab":
        grads = searcher.architect.alpha_grads(xt, yt, xv, yv, SGD_ARGS["lr"], searcher.optimizer, True)
    else:  # the official step leaves its gradient on α
        searcher.architect.step(xt, yt, xv, yv, SGD_ARGS["lr"], searcher.optimizer, True)
        grads = [a.grad for a in model.arch_parameters()]
    return torch.cat([g.reshape(-1).double() for g in grads])


def second_order_accuracy(official: SimpleNamespace, args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """How far each fp32 computation of the second-order α gradient is from the same algorithm in float64 (swinlab's
    code, which is the official algorithm), over ``args.states`` seeded states, for both implementations at 1 thread
    and at ``args.threads`` (torch picks other convolution kernels by thread count, so the official code's own
    numbers move with it). Prints the table; returns each computation's mean absolute error."""
    threads = sorted({1, args.threads})
    errors: dict[tuple[str, int], list[tuple[float, float, int]]] = {(i, t): [] for i in IMPLS for t in threads}
    largest = 0.0
    for seed in range(args.states):
        reference = alpha_grad(official, args, "swinlab", 1, seed, torch.float64)
        largest = max(largest, reference.abs().max().item())
        for impl, t in errors:
            err = alpha_grad(official, args, impl, t, seed) - reference
            flips = int((torch.sign(err + reference) != torch.sign(reference)).sum())
            errors[impl, t].append((err.abs().mean().item(), err.abs().max().item(), flips))
    torch.set_num_threads(args.threads)
    print(f"second-order α gradient against the float64 computation, {args.states} states x {reference.numel()} "
          f"entries (largest |g| {largest:.3g}):")  # fmt: skip
    print(
        "| computation (fp32) | threads | mean abs error (mean over states) | max abs error (largest) | signs flipped |"
    )
    print("|---|---|---|---|---|")
    for (impl, t), rows in errors.items():
        mean, worst, flips = statistics.mean(r[0] for r in rows), max(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"| {impl} | {t} | {mean:.2e} | {worst:.2e} | {flips} |")
    return {key: statistics.mean(r[0] for r in rows) for key, rows in errors.items()}


def alternate(pair: dict[str, Searcher], batches: tuple, unrolled: bool, warmup: int, iters: int) -> dict:
    """``warmup + iters`` pairs of iterations, the order swapped every pair; the timed ones' seconds and the share
    of the machine other processes used while they ran."""
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    busy = []
    for i in range(warmup + iters):
        for impl in IMPLS if i % 2 == 0 else IMPLS[::-1]:
            m = measure_steps(lambda s=pair[impl]: s.iteration(batches, unrolled), 0, 1)
            if i >= warmup:
                times[impl].append(m["median_s"])
                busy.append(m["busy_others"])
    return {"times": times, "busy_others": statistics.mean(busy)}


def profile(pair: dict[str, Searcher], batches: tuple, unrolled: bool, top: int) -> None:
    """torch.profiler's top ops (by self CPU time) of one iteration of each implementation, after one warm-up, then
    its convolution and matrix-product calls by input shape (where a small-kernel overhead shows: the cost per call
    against the call's size)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for impl in IMPLS:
        pair[impl].iteration(batches, unrolled)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            pair[impl].iteration(batches, unrolled)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        print(f"\n{impl}, {'second' if unrolled else 'first'} order: {total:.0f} ms self CPU in ops, "
              f"{len(events)} op kinds, {sum(e.count for e in events)} op calls")  # fmt: skip
        print(events.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40))
        kernels = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in SHAPE_OPS]
        print("| op | self ms | calls | µs / call | input shapes |\n|---|---|---|---|---|")
        for e in sorted(kernels, key=lambda e: -e.self_cpu_time_total)[:top]:
            shapes = " ".join(str(tuple(s)) for s in e.input_shapes if s)
            print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.1f} | {e.count} | "
                  f"{e.self_cpu_time_total / e.count:.0f} | {shapes} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", choices=("first", "second", "both"), default="both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5, help="timed iteration pairs per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs at the start of each round")
    parser.add_argument("--C", type=int, default=8)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--official", type=Path, default=OFFICIAL)
    parser.add_argument("--profile", action="store_true", help="print the top ops of one iteration instead of timing")
    parser.add_argument(
        "--accuracy", action="store_true", help="only the accuracy table (second-order α gradients against float64)"
    )
    parser.add_argument("--states", type=int, default=6, help="seeded states the accuracy gate averages over")
    parser.add_argument(
        "--fast-convolutions", action="store_true", help="swinlab with swinlab.nas.use_fast_convolutions (opt-in)"
    )
    parser.add_argument("--top", type=int, default=20, help="ops shown by --profile")
    parser.add_argument("--json", type=Path, default=None, help="write the raw times here")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=UserWarning)  # the official code's deprecated add_(scalar, tensor)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    official = import_official(args.official)
    orders = {"first": False, "second": True}
    orders = orders if args.order == "both" else {args.order: orders[args.order]}
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} threads; super-net C={args.C}, {args.layers} cells, batch "
          f"{args.batch}, {args.img}x{args.img}, fp32")  # fmt: skip

    if args.accuracy:
        second_order_accuracy(official, args)
        return
    for order, unrolled in orders.items():
        if unrolled and args.fast_convolutions:
            errors = second_order_accuracy(official, args)
            bound = max(e for (impl, _), e in errors.items() if impl == "official")
            if max(e for (impl, _), e in errors.items() if impl == "swinlab") > bound:
                raise SystemExit("second-order gate failed: swinlab's α gradient is further from float64 than the "
                                 "official code's; no timing")  # fmt: skip
            continue
        gate = equality_gate(official, args, unrolled)
        print(f"{order}-order gate, after one iteration: " + ", ".join(f"{k} {v:.1e}" for k, v in gate.items()))
        if gate["alpha"] > ALPHA_ATOL or gate["weights"] > WEIGHT_ATOL:
            raise SystemExit(f"{order}-order gate failed (α {ALPHA_ATOL}, weights {WEIGHT_ATOL}); no timing")
    if args.profile:
        for unrolled in orders.values():
            profile(*make_pair(official, args), unrolled, args.top)
        return

    results: dict[str, list[dict]] = {order: [] for order in orders}
    for rnd in range(args.rounds):
        for order, unrolled in orders.items():
            res = alternate(*make_pair(official, args), unrolled, args.warmup, args.iters)
            res["ratio"] = statistics.median(
                b / a for a, b in zip(res["times"]["swinlab"], res["times"]["official"], strict=True)
            )
            results[order].append(res)
            ms = {impl: 1e3 * statistics.median(res["times"][impl]) for impl in IMPLS}
            print(f"  round {rnd + 1}/{args.rounds} {order:<6} swinlab {ms['swinlab']:.0f} ms, official "
                  f"{ms['official']:.0f} ms, ratio {res['ratio']:.2f}, busy* {100 * res['busy_others']:.0f}%",
                  flush=True)  # fmt: skip
    report(results, args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}))


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """The markdown table: per order, each implementation's median iteration, the ratio (median over rounds of the
    per-round median of pair ratios) with its range, and the machine load; then second / first order cost."""

    def median_ms(order: str, impl: str) -> float:
        return 1e3 * statistics.median(t for r in results[order] for t in r["times"][impl])

    print(f"\nDARTS search iteration, {args.rounds} rounds x {args.iters} alternating pairs "
          f"(+{args.warmup} warm-up), {args.threads} threads")  # fmt: skip
    print("| order | swinlab ms | official ms | swinlab / official speed | per-round ratios | busy* |")
    print("|---|---|---|---|---|---|")
    for order, rounds in results.items():
        ratios = [r["ratio"] for r in rounds]
        busy = max(r["busy_others"] for r in rounds)
        print(f"| {order} | {median_ms(order, 'swinlab'):.0f} | {median_ms(order, 'official'):.0f} | "
              f"**{statistics.median(ratios):.2f}x** | {', '.join(f'{v:.2f}' for v in ratios)} | "
              f"{100 * busy:.0f}% |")  # fmt: skip
    if len(results) == 2:
        cost = {impl: median_ms("second", impl) / median_ms("first", impl) for impl in IMPLS}
        print("second / first order cost: " + ", ".join(f"{impl} {v:.2f}x" for impl, v in cost.items()))
    print("busy*: largest share of the machine other processes used during a round's timed iterations")


if __name__ == "__main__":
    main()
