"""DARTS's skip collapse at CPU scale (issue 15 §3): DARTS (with skip_connect) vs ACA (without), several seeds.

Every run is ``swinlab train`` on a recipe in ``configs/nas/`` (the one engine); this script only chooses overrides,
runs them as subprocesses (1 torch thread each, at most 2 at a time: the machine has 2 shared cores) and collects
the per-epoch numbers the search task writes to ``alphas.json``.

Protocol (fixed before any measured run; not changed after looking at outcomes):

* Data: the embedded Fashion-MNIST at 28 px, 1 channel, as configs/nas/darts_search_nano_fashion.yaml: the first
  640 training images split 50/50 into the weights' part and the held-out part α learns on, batch 16, so one epoch
  = 20 weight steps = 20 α updates (first order, ``task.unrolled: false``); validation on the first 320 images of
  the embedded validation set (the search's ``val_top1``, which chooses nothing). ACA gets the same data overrides
  (its recipe's default is 480 images), so every variant sees the same images and the same number of α updates.
* Super-net: C 4, 5 cells (the nano recipe); α: Adam 3e-3 (the recipe's value, 10x the official 3e-4, so that α
  moves in hundreds rather than ~20k updates), weight decay 1e-3; weights: official SGD 0.025 cosine to 0.001.
  Nothing is tuned here: the recipes are run as they are, only ``epochs``, ``seed``, ``threads`` and the variant's
  search space change.
* Variants (each for seeds 0, 1, 2):
  - ``darts``: the official 8-operation space with skip_connect, ``EPOCHS_MAIN`` = 10 epochs = 200 α updates;
  - ``aca``: configs/nas/aca_search_nano_fashion.yaml (the same space without skip; the toolkit's ACA importance
    ``magnitude`` and allocation ``mass``), 10 epochs = 200 α updates;
  - ``darts_r3``: DARTS in the space where collapse is easiest to provoke, {none, skip_connect, sep_conv_3x3}
    (``model.kwargs.primitives``), ``EPOCHS_R3`` = 20 epochs = 400 α updates (this space is ~3x cheaper per step).
  Sizes were chosen from a 2-epoch timing probe (full space ~0.44 steps/s, 3-op space ~1.4 steps/s per process with
  2 processes running) to fit ~30 minutes of wall time on 2 processes.
* Recorded per epoch (from ``alphas.json``): α updates so far, skip share (mean softmax weight of skip_connect over
  the 14 normal-cell edges; 0 for ACA, which has no skip), skip count in the derived normal cell (of 8 edges),
  the search's ``val_top1``, and for ACA the mean identity fraction of the derived ACA normal cell (1 - kept
  channel fraction, averaged over its 8 edges: the skip ACA puts back implicitly).
* Summary per variant at the last epoch: mean, sample std, min and max over the seeds of skip share, skip count,
  search val top-1 (and ACA's identity fraction). "Collapse" is read, not thresholded-for: the table reports the
  numbers and the per-epoch trajectory is in the JSON.
* Optional second phase (``--retrain``, run only if time allows; the first recorded run may not include it): train
  each derived cell of the last epoch with configs/nas/darts_eval_nano_fashion.yaml (ACA: aca_eval_nano_fashion.yaml
  on genotype_aca.json) exactly as the recipe is (C 8, 6 cells, 3 epochs of 2,000 images, 500 val), same seed,
  and record the final val top-1. The ``darts_r3`` cells are retrained too (their ops are in the DARTS op set).

    python benchmarks/darts_collapse.py --json benchmarks/darts_collapse.json [--retrain]

Runs go to ``/tmp/darts_collapse/<variant>/seed<N>``; a run whose alphas.json already holds all its epochs is read,
not rerun. ``--summarise-only`` writes the JSON from whatever runs exist (partial runs are marked as such).
Results: benchmarks/RESULTS.md, "DARTS skip collapse at CPU scale (issue 15 §3)".
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from _common import read_metrics

ROOT = Path(__file__).resolve().parents[1]
NAS = ROOT / "configs" / "nas"

# -- the protocol's budget (decided before the measured run; see the docstring) ----------------------------------
SEEDS = (0, 1, 2)
EPOCHS_MAIN = 10
EPOCHS_R3 = 20
DATA = ["data.train_limit=640", "data.heldout_fraction=0.5", "data.val_limit=320"]
COMMON = ["threads=1", "task.cell_diagrams=false", *DATA]
VARIANTS: dict[str, tuple[Path, int, list[str]]] = {
    "darts": (NAS / "darts_search_nano_fashion.yaml", EPOCHS_MAIN, []),
    "aca": (NAS / "aca_search_nano_fashion.yaml", EPOCHS_MAIN, []),
    "darts_r3": (
        NAS / "darts_search_nano_fashion.yaml",
        EPOCHS_R3,
        ["model.kwargs.primitives=[none,skip_connect,sep_conv_3x3]"],
    ),
}
WORKERS = 2


def history(run_dir: Path) -> list[dict]:
    path = run_dir / "alphas.json"
    return json.loads(path.read_text()) if path.is_file() else []


def swinlab(recipe: Path, overrides: list[str], log: Path) -> float:
    cmd = [sys.executable, "-m", "swinlab", "train", str(recipe)]
    for o in overrides:
        cmd += ["--set", o]
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    return time.perf_counter() - start


def search(out: Path, variant: str, seed: int) -> None:
    recipe, epochs, extra = VARIANTS[variant]
    run_dir = out / variant / f"seed{seed}"
    if len(history(run_dir)) >= epochs:
        return
    print(f"-> search {variant} seed {seed}", flush=True)
    secs = swinlab(recipe, [*COMMON, *extra, f"epochs={epochs}", f"seed={seed}", f"output_dir={run_dir}"],
                   run_dir.with_name(run_dir.name + "_search.log"))  # fmt: skip
    (run_dir / "seconds.txt").write_text(f"{secs:.1f}\n")
    print(f"<- search {variant} seed {seed}: {secs:.0f} s", flush=True)


def retrain(out: Path, variant: str, seed: int) -> None:
    run_dir = out / variant / f"seed{seed}"
    eval_dir = out / variant / f"seed{seed}_retrain"
    if (eval_dir / "metrics.csv").is_file() and len(read_metrics(eval_dir)) >= 3:
        return
    if variant == "aca":
        recipe, genotype = NAS / "aca_eval_nano_fashion.yaml", run_dir / "genotype_aca.json"
    else:
        recipe, genotype = NAS / "darts_eval_nano_fashion.yaml", run_dir / "genotype.json"
    print(f"-> retrain {variant} seed {seed}", flush=True)
    secs = swinlab(recipe, ["threads=1", f"seed={seed}", f"model.kwargs.genotype={genotype}", f"output_dir={eval_dir}"],
                   eval_dir.with_name(eval_dir.name + ".log"))  # fmt: skip
    print(f"<- retrain {variant} seed {seed}: {secs:.0f} s", flush=True)


def identity_fraction(genotype: dict | None) -> float | None:
    """Mean (1 - kept channel fraction) over the ACA normal cell's edges."""
    if not genotype or genotype.get("kind") != "aca":
        return None
    return statistics.mean(1.0 - float(edge[2]) for edge in genotype["normal"])


def summarise(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def collect(out: Path) -> tuple[dict, dict]:
    runs: dict[str, dict] = {}
    summary: dict[str, dict] = {}
    for variant, (recipe, epochs, extra) in VARIANTS.items():
        finals: dict[str, list[float]] = {"skip_share": [], "skip_count": [], "val_top1": [], "identity_fraction": [],
                                          "retrain_top1": [], "arch_updates": []}  # fmt: skip
        for seed in SEEDS:
            run_dir = out / variant / f"seed{seed}"
            hist = history(run_dir)
            if not hist:
                continue
            per_epoch = [{
                "epoch": r["epoch"], "arch_updates": r["arch_updates"], "skip_share": r["skip_share"],
                "skip_count": r["skip_count"], "val_top1": r.get("val_top1"),
                "identity_fraction": identity_fraction(r.get("aca_genotype")),
                "normal": r["genotype"]["normal"],
            } for r in hist]  # fmt: skip
            last = hist[-1]
            timing = run_dir / "seconds.txt"
            seconds = float(timing.read_text()) if timing.is_file() else None
            entry = {
                "recipe": str(recipe.relative_to(ROOT)),
                "overrides": [*COMMON, *extra, f"epochs={epochs}", f"seed={seed}"],
                "complete": len(hist) >= epochs,
                "epochs_done": len(hist),
                "per_epoch": per_epoch,
                "final_genotype": last["genotype"],
                "final_aca_genotype": last.get("aca_genotype"),
                "final_normal_softmax": last["normal"],
                "primitives": last["primitives"],
                "seconds": seconds,
            }
            rows = read_metrics(out / variant / f"seed{seed}_retrain")
            if rows:
                entry["retrain_history"] = rows
                if len(rows) >= 3:
                    entry["retrain_top1"] = rows[-1]["val_top1"]
                    finals["retrain_top1"].append(rows[-1]["val_top1"])
            runs[f"{variant}/seed{seed}"] = entry
            if not entry["complete"]:
                continue  # partial runs are kept in `runs` but not summarised
            finals["skip_share"].append(last["skip_share"])
            finals["skip_count"].append(last["skip_count"])
            finals["arch_updates"].append(last["arch_updates"])
            if last.get("val_top1") is not None:
                finals["val_top1"].append(last["val_top1"])
            frac = identity_fraction(last.get("aca_genotype"))
            if frac is not None:
                finals["identity_fraction"].append(frac)
        summary[variant] = {k: summarise(v) for k, v in finals.items()}
        summary[variant]["per_seed_skip_count"] = finals["skip_count"]
    return runs, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/darts_collapse"), help="run folders go here")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--retrain", action="store_true", help="also retrain the last epoch's cells (phase 2)")
    parser.add_argument("--summarise-only", action="store_true", help="run nothing; collect what exists")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if not args.summarise_only:
        jobs = [(v, s) for s in SEEDS for v in VARIANTS]  # seed by seed: a cut-short run still has whole seeds
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda job: search(args.out, *job), jobs))
        if args.retrain:
            with ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(lambda job: retrain(args.out, *job), jobs))
    runs, summary = collect(args.out)
    print(f"\n{'variant':<9} {'n':>2} {'α upd':>6} {'skip share':>16} {'skip count':>14} {'search top-1':>16} "
          f"{'ACA identity':>14} {'retrain top-1':>16}")  # fmt: skip

    def fmt(s: dict | None, p: int = 3) -> str:
        return "-" if s is None else f"{s['mean']:.{p}f} ± {s['std']:.{p}f}"

    for variant, s in summary.items():
        n = s["skip_share"]["n"] if s["skip_share"] else 0
        upd = int(s["arch_updates"]["mean"]) if s["arch_updates"] else 0
        print(f"{variant:<9} {n:>2} {upd:>6} {fmt(s['skip_share']):>16} {fmt(s['skip_count'], 2):>14} "
              f"{fmt(s['val_top1'], 2):>16} {fmt(s['identity_fraction']):>14} "
              f"{fmt(s['retrain_top1'], 2):>16}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "protocol": {"seeds": SEEDS, "epochs_main": EPOCHS_MAIN, "epochs_r3": EPOCHS_R3, "common": COMMON,
                         "variants": {k: {"recipe": str(r.relative_to(ROOT)), "epochs": e, "extra": x}
                                      for k, (r, e, x) in VARIANTS.items()},
                         "threads_per_process": 1, "parallel_processes": WORKERS},
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
            "wall_seconds_this_call": time.perf_counter() - t0, "summary": summary, "runs": runs,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
