"""FP8 GEMM numerics: FP8Linear's forward, input gradient and weight gradient against FP32, next to the error
the FP8 casts alone cost on the same tensors.

An FP8 GEMM rounds its operands to FP8 and then multiplies exactly and accumulates in FP32, so its error should
be the cast errors of its operands and nothing more. For independent rounding errors on Gaussian data those add
in quadrature: ``forward = hypot(x, w)``, ``dgrad = hypot(g, w)``, ``wgrad = hypot(g, x, dW)`` where each term is
the relative L2 error of one cast alone (the input ``x`` and weight ``w`` to E4M3, the output gradient ``g`` to
the gradient format, the FP32 weight gradient ``dW`` re-quantised to E4M3 as O1 stores it). A GEMM that added
error of its own (a low-precision accumulation, a scale off by a power of two, an extra rounding) would sit above
that prediction.

The gradient format sets the floor: E5M2 (FP8-LM / MS-AMP's choice, 2 mantissa bits, range first) costs ~5.3 %
by itself, so no E5M2 gradient GEMM can be within 5 % of FP32; E4M3 (3 mantissa bits, ~2.7 %) is.

    python benchmarks/bench_fp8_gemm.py            # 256 x 512 x 384 (fp8.md section 6.6), seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from swinlab.fp8 import E4M3, FP8Linear
from swinlab.fp8.formats import get_format
from swinlab.fp8.tensor import quantize_current
from swinlab.metrics import relative_l2_error

ROLES = ("forward", "dgrad", "wgrad")


def cast_error(t: torch.Tensor, fmt: str) -> float:
    """Relative L2 error of one current-scaled round trip of ``t`` through ``fmt`` (what a first FP8 cast does)."""
    return relative_l2_error(quantize_current(t, get_format(fmt)).dequantize(), t)


def gemm_errors(m: int, k: int, n: int, grad_format: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """One FP8Linear(k, n) step on a Gaussian ``(m, k)`` input and ``(m, n)`` output gradient vs ``nn.Linear``.

    Returns ``{"cast": {x, w, g, dW}, "measured": {forward, dgrad, wgrad}, "predicted": {...}}``, all relative L2.
    The layer's first call falls back from delayed to current scaling, so the casts measured alone use the
    same scales as the GEMMs.
    """
    torch.manual_seed(seed)
    ref = nn.Linear(k, n)
    fp8 = FP8Linear(k, n, grad_format=grad_format)
    fp8.load_state_dict(ref.state_dict())
    x, grad = torch.randn(m, k), torch.randn(m, n)
    outputs = {}
    for name, layer in (("ref", ref), ("fp8", fp8)):
        inp = x.clone().requires_grad_()
        out = layer(inp)
        out.backward(grad)
        outputs[name] = (out.detach(), inp.grad)
    cast = {
        "x": cast_error(x, E4M3.name),
        "w": cast_error(ref.weight.detach(), E4M3.name),
        "g": cast_error(grad, grad_format),
        "dW": cast_error(ref.weight.grad, E4M3.name),
    }
    measured = {
        "forward": relative_l2_error(outputs["fp8"][0], outputs["ref"][0]),
        "dgrad": relative_l2_error(outputs["fp8"][1], outputs["ref"][1]),
        "wgrad": relative_l2_error(fp8.weight.fp8_grad.dequantize(), ref.weight.grad),
    }
    predicted = {
        "forward": math.hypot(cast["x"], cast["w"]),
        "dgrad": math.hypot(cast["g"], cast["w"]),
        "wgrad": math.hypot(cast["g"], cast["x"], cast["dW"]),
    }
    return {"cast": cast, "measured": measured, "predicted": predicted}


def mean(runs: list[dict[str, dict[str, float]]], part: str, key: str) -> float:
    return sum(r[part][key] for r in runs) / len(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 512, 384], metavar=("M", "K", "N"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    m, k, n = args.shape
    print(f"FP8Linear({k}, {n}) on a ({m}, {k}) input, relative L2 vs FP32, mean over seeds {args.seeds}\n")
    print("| grad format | cast floor of g | forward (pred.) | dgrad (pred.) | wgrad (pred.) | all <= 5 % |")
    print("| --- | --- | --- | --- | --- | --- |")
    for grad_format in ("e5m2", "e4m3"):
        runs = [gemm_errors(m, k, n, grad_format, seed) for seed in args.seeds]
        cells = [f"{mean(runs, 'measured', role):.2%} ({mean(runs, 'predicted', role):.2%})" for role in ROLES]
        ok = all(r["measured"][role] <= 0.05 for r in runs for role in ROLES)
        print(f"| {grad_format} | {mean(runs, 'cast', 'g'):.2%} | {' | '.join(cells)} | {'yes' if ok else 'no'} |")
    floors = runs[0]["cast"]
    print(f"\nE4M3 cast floors (seed {args.seeds[0]}): x {floors['x']:.2%}, w {floors['w']:.2%}, dW {floors['dW']:.2%}")


if __name__ == "__main__":
    main()
