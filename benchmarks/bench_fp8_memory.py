"""FP8-LM memory evidence: resident training state per parameter, by role, measured after a real training step.

For each model and recipe: build it, run ``--warmup`` + ``--steps`` training steps (forward, loss, backward,
optimizer step), then :func:`swinlab.fp8.memory_report` walks the live tensors (gradients still alive) and the
table prints bytes/param per role, for the whole model and for the FP8 linears only. Step times are medians
with the steps of all recipes interleaved (so machine load hits them alike), the optimizer step also on its own.
On CPU the FP8 GEMM is emulated (dequantise + FP32 GEMM), so FP8 costs time here rather than saving it
(the GPU path is the same code).

Recipes:
  * ``fp32``    FP32 weights and gradients, ``torch.optim.AdamW`` (FP32 moments): 4 + 4 + 8 = 16.
  * ``bf16-mp`` BF16 mixed precision as ZeRO / ``reference/fp8.md`` §5 count it: BF16 weights and gradients for
                compute, FP32 master weights and FP32 moments in the optimizer (``swinlab.fp8.FP8AdamW``'s
                mixed-precision path for non-FP8 parameters): 2 + 2 + 4 + 8 = 16.
  * ``fp8-o1``  ``swinlab.fp8.initialize(..., "O1")``: FP16+scale weight (the master), E4M3+scale gradient,
                FP32 moments: 2 + 1 + 8 = 11 on the FP8 linears.
  * ``fp8-o2``  ``initialize(..., "O2")``: moments E4M3+scale / FP16+scale: 2 + 1 + 1 + 2 = 6 on the FP8 linears.

    python benchmarks/bench_fp8_memory.py    # gpt_micro, swinv2_nano_window4_32, swinv2_tiny_window8_256
    python benchmarks/bench_fp8_memory.py --models gpt_micro --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import swinlab
from swinlab.fp8 import FP8AdamW, initialize, memory_report
from swinlab.fp8.memory import ROLES

RECIPES = ("fp32", "bf16-mp", "fp8-o1", "fp8-o2")
MODELS = ("gpt_micro", "swinv2_nano_window4_32", "swinv2_tiny_window8_256")
SHORT = {"weights": "weight", "gradients": "grad", "master_weights": "master", "optimizer_states": "states",
         "scale_metadata": "scales"}  # fmt: skip


def build(name: str, recipe: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = swinlab.create_model(name) if name.startswith("gpt") else swinlab.create_model(name, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if recipe == "bf16-mp":
        model.to(torch.bfloat16)
        optimizer = FP8AdamW(model.parameters(), lr=1e-4)
    elif recipe.startswith("fp8"):
        model, optimizer = initialize(model, optimizer, recipe[-2:].upper())
    return model, optimizer


def make_batch(model: nn.Module, batch_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if hasattr(model, "vocab_size"):
        tokens = torch.randint(0, model.vocab_size, (batch_size, 65), generator=g)
        return tokens[:, :-1], tokens[:, 1:]
    height, width = model.img_size
    images = torch.randn(batch_size, model.patch_embed.proj.in_channels, height, width, generator=g)
    return images.to(dtype), torch.randint(0, 10, (batch_size,), generator=g)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch, bf16: bool) -> tuple[float, float]:
    """One step; returns (step seconds, of which optimizer.step)."""
    inputs, targets = batch
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    # bf16-mp: BF16 parameters, and autocast for the tensors a model makes itself (SwinV2's FP32 coordinate table)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(inputs).float()
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    before_step = time.perf_counter()
    optimizer.step()
    end = time.perf_counter()
    return end - start, end - before_step


def measure(name: str, recipes: list[str], *, batch_size: int, warmup: int, steps: int) -> list[str]:
    """All recipes of one model side by side, their timed steps interleaved (so machine load hits all alike)."""
    runs = {}
    for recipe in recipes:
        model, optimizer = build(name, recipe)
        bf16 = recipe == "bf16-mp"
        batch = make_batch(model, batch_size, torch.bfloat16 if bf16 else torch.float32)
        runs[recipe] = (model, optimizer, batch, bf16)
        for _ in range(warmup):
            train_step(*runs[recipe])
    times: dict[str, list[tuple[float, float]]] = {recipe: [] for recipe in recipes}
    for _ in range(steps):
        for recipe, run in runs.items():
            times[recipe].append(train_step(*run))
    rows = []
    for recipe, (model, optimizer, _, _) in runs.items():
        report = memory_report(model, optimizer)  # the last step's gradients are still alive
        step_ms = 1e3 * statistics.median(t for t, _ in times[recipe])
        opt_ms = 1e3 * statistics.median(t for _, t in times[recipe])
        for scope_name, scope in report.scopes.items():
            if not scope.params:
                continue
            cells = " | ".join(f"{scope.per_param(role):.3f}" for role in ROLES)
            rows.append(
                f"| {name} | {recipe} | {scope_name} | {scope.params / 1e6:.3f} | {cells} | "
                f"**{scope.per_param():.3f}** | {scope.total / 2**20:.1f} | {step_ms:.0f} | {opt_ms:.0f} |"
            )
    return rows


def add_arguments(parser: argparse.ArgumentParser, batch_help: str | None = None) -> None:
    """The options of this benchmark's protocol, which ``bench_fp8_o3.py`` repeats per rank: models, batch size,
    warm-up and timed steps, threads."""
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=4, help=batch_help)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--threads", type=int, default=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    roles = " | ".join(SHORT[role] for role in ROLES)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, "
          f"median of {args.steps} steps after {args.warmup} warm-up; bytes/param by role after a step")
    print(f"| model | recipe | scope | M params | {roles} | total B/param | MiB | step ms | of which opt. step |")
    print("|" + " --- |" * (8 + len(ROLES)))
    for name in args.models:
        for row in measure(name, args.recipes, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps):
            print(row, flush=True)


if __name__ == "__main__":
    main()
