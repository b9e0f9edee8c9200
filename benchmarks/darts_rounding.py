"""How far a DARTS search's outcome moves with fp32 rounding alone (issue 15 §4's "the same numbers").

swinlab's default super-net computes the official code's numbers bit for bit, but only for one choice of kernels:
torch picks other convolution kernels at another thread count, and the opt-in fast convolutions
(``model.kwargs.fast_convolutions``) sum in another order. This runs the same second-order search
(configs/nas/darts_search_nano_fashion.yaml with ``task.unrolled=true``, ``EPOCHS`` epochs of 20 α updates) per
seed in four variants, one after the other (each takes both cores), and compares each with ``default``:

* ``default``: 2 threads;
* ``default_rerun``: the same run again, the control (a run must repeat itself bit for bit);
* ``fast``: 2 threads with the fast convolutions;
* ``one_thread``: the default at 1 thread (the official numbers as torch computes them there).

Printed per variant and seed: the largest difference of softmax(α) after each epoch, how many of the derived
genotype's 16 (operation, input) entries differ after each epoch, and the final validation top-1. Finished runs
are reused, so an interrupted measurement continues.

    python benchmarks/darts_rounding.py --out runs/darts_rounding --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import read_metrics
from darts_collapse import NAS, history, swinlab

EPOCHS = 4
RECIPE = NAS / "darts_search_nano_fashion.yaml"
VARIANTS: dict[str, list[str]] = {
    "default": ["threads=2"],
    "default_rerun": ["threads=2"],
    "fast": ["threads=2", "model.kwargs.fast_convolutions=true"],
    "one_thread": ["threads=1"],
}


def run(out: Path, variant: str, seed: int) -> Path:
    run_dir = out / variant / f"seed{seed}"
    if len(history(run_dir)) < EPOCHS:
        overrides = ["task.unrolled=true", "task.cell_diagrams=false", f"epochs={EPOCHS}", f"seed={seed}",
                     f"output_dir={run_dir}", "resume=false", *VARIANTS[variant]]  # fmt: skip
        print(f"{variant} seed {seed}: {swinlab(RECIPE, overrides, run_dir.with_suffix('.log')):.0f} s", flush=True)
    return run_dir


def largest_alpha_difference(a: dict, b: dict) -> float:
    """Of the softmax(α) rows that one epoch of ``alphas.json`` records for each cell type."""
    rows = [(ra, rb) for cell in ("normal", "reduce") for ra, rb in zip(a[cell], b[cell], strict=True)]
    return max(abs(x - y) for ra, rb in rows for x, y in zip(ra, rb, strict=True))


def differing_entries(run_a: Path, run_b: Path, epoch: int) -> int:
    a, b = (json.loads((r / f"genotype_epoch{epoch}.json").read_text()) for r in (run_a, run_b))
    return sum(x != y for cell in ("normal", "reduce") for x, y in zip(a[cell], b[cell], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/darts_rounding"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    print("| seed | variant | max softmax(α) difference per epoch | genotype entries differing (of 16) per epoch "
          "| val top-1 (default's) |\n|---|---|---|---|---|")  # fmt: skip
    for seed in args.seeds:
        runs = {variant: run(args.out, variant, seed) for variant in VARIANTS}
        base = runs["default"]
        top1 = read_metrics(base)[-1]["val_top1"]
        for variant, run_dir in runs.items():
            if variant == "default":
                continue
            alphas = [largest_alpha_difference(a, b) for a, b in zip(history(base), history(run_dir), strict=True)]
            entries = [differing_entries(base, run_dir, e) for e in range(1, EPOCHS + 1)]
            print(f"| {seed} | {variant} | {', '.join(f'{d:.1e}' for d in alphas)} | {', '.join(map(str, entries))} "
                  f"| {read_metrics(run_dir)[-1]['val_top1']:.2f} ({top1:.2f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
