"""SimMIM's claim at CPU scale (issue 14 §3): pre-train -> fine-tune vs. the same fine-tune budget from scratch.

Every run goes through swinlab's one engine (``swinlab.engine.train`` on the recipes in ``configs/``, as
``swinlab train`` does); this script only chooses overrides, runs them one after the other and collects numbers.

Protocol (fixed before any measured run; the overrides below are not changed after looking at outcomes):

* Data: the embedded Fashion-MNIST, upscaled 28 -> 64 px (``data.img_size: 64``), so SimMIM's 16-px mask cells
  make a 4x4 grid of which 10 cells (60 %, rounded up) are masked: real holes in the garment, as 32-px cells at
  192 px are in the official recipe. Pre-training and fine-tuning use the same images: the first ``TRAIN_LIMIT``
  = 2,000 training images (a class-balanced prefix; labels ignored in pre-training), so the pre-trained arm gets no
  image the scratch arm does not see, only extra (self-supervised) compute. Validation: the embedded validation set's
  first 1,000 images for top-1 (500 for the pre-training's masked-L1 ``val_loss``, which chooses nothing).
* Model: ``swinv2_nano_window4_32`` (3 stages, embed 64, depths 2-2-2; 64 px -> 16x16 tokens), drop path 0.
* Seeds 0, 1, 2. Per seed:
  1. ``pretrain``: configs/simmim_nano_fashion.yaml (mask cell 16, ratio 0.6, raw-pixel L1 target, AdamW 2e-3,
     cosine, 0.5-epoch warm-up, wd 0.05, batch 64, SimMIM's crop + flip augmentation), window 4, ``PT_EPOCHS`` = 6
     epochs of the 2,000 images (186 steps; the recipe's 3 epochs of 6,000 are 279). Its last checkpoint
     (``checkpoint.pt``, not ``best.pt``) is what the fine-tunes load.
  2. For each fine-tune window ``w`` in (4, 8) (4 = the pre-training window, 8 = another window: the continuous
     position-bias MLPs load as trained, ``pretrained_window_sizes: [4, 4, 4]`` keeps their coordinate scale):
     * ``ft_w{w}``: configs/simmim_nano_fashion_ft.yaml from the seed's pre-training (AdamW 2e-3, layer decay 0.75
       as the official SwinV2 SimMIM fine-tune, cosine, 0.5-epoch warm-up, batch 64, no augmentation),
       ``FT_EPOCHS`` = 2 epochs (62 steps);
     * ``scratch_w{w}``: the same recipe, the same seed, data, epochs, batch, LR, warm-up, cosine schedule,
       weight decay and window, with ``model.pretrained=null`` and ``optim.layer_decay=1.0``.
  Scratch runs without layer decay, as the official from-scratch Swin / SwinV2 recipes do: layer decay exists to
  keep pre-trained early features; on random weights it only slows the early layers (the patch embedding of this
  model, layer id 0 of 7, would learn at 0.75^7 = 0.13x the LR), a handicap that would be credited to
  pre-training. So the control is "the standard from-scratch recipe at the same budget"; it differs from the
  fine-tune in the initial weights and the per-layer LR scale. (A third arm, scratch with layer decay 0.75 =
  "only the initial weights differ", did not fit the time budget and was not run.)
  The same seed gives both arms the same data order and the same random initialisation of every weight the
  pre-training does not provide (the head).
* Metrics per fine-tune: final-epoch validation top-1 (the headline), best epoch's top-1, the train loss at the
  first logged steps (``log_every=5``, from the run's TensorBoard events) and per epoch. Summary: mean +- sample
  std over the 3 seeds per arm, min-max, and the paired difference (ft - scratch) per seed.
* Budget: every run on 1 torch thread (``threads=1``), runs strictly one after the other (the machine's 2 cores are
  shared). Sized from a 15-step timing probe (about 65-70 images/s per run under the machine's usual load, ~7 s
  start-up per run) to ~25 minutes for the 15 runs. Pre-training compute is extra: the comparison is at equal
  *fine-tune* budget, as in the issue.

    python benchmarks/simmim_claim.py --json benchmarks/simmim_claim.json

Runs go to ``/tmp/simmim_claim/<seed>/<arm>``; a run whose metrics.csv already holds all its epochs is read, not
rerun (a killed run resumes from its checkpoint through the engine). Results: benchmarks/RESULTS.md, "SimMIM (issue
14): pre-train -> fine-tune vs scratch".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from _common import read_metrics
from swinlab.engine import train
from swinlab.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "simmim_nano_fashion.yaml"
FINETUNE = ROOT / "configs" / "simmim_nano_fashion_ft.yaml"

# -- the protocol's budget (decided before the measured run; see the docstring) ----------------------------------
SEEDS = (0, 1, 2)
WINDOWS = (4, 8)
TRAIN_LIMIT = 2000
PT_EPOCHS = 6
FT_EPOCHS = 2
COMMON = ["threads=1", f"data.train_limit={TRAIN_LIMIT}"]
FT_COMMON = [*COMMON, f"epochs={FT_EPOCHS}", "data.val_limit=1000", "tensorboard=true", "log_every=5"]
FIRST_STEPS = (5, 10, 20, 30, 60)
"""Fine-tune steps whose train loss is reported (the start of the curve)."""


def arms(window: int, pretrained: Path | None = None) -> dict[str, list[str]]:
    kw = f"model.kwargs.window_size={window}"
    return {
        f"ft_w{window}": [kw, f"model.pretrained={pretrained}"],
        f"scratch_w{window}": [kw, "model.pretrained=null", "optim.layer_decay=1.0"],
    }


def step_losses(run_dir: Path) -> dict[int, float]:
    """train/loss per logged step from the run's TensorBoard events (the last write of a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    if not (run_dir / "tb").is_dir():
        return out
    for events in sorted((run_dir / "tb").glob("events.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return dict(sorted(out.items()))


def run(recipe: Path, overrides: list[str], run_dir: Path, epochs: int) -> dict:
    """Train (or resume, or just read) one run; its numbers."""
    history = read_metrics(run_dir)
    seconds, log = None, ""
    if len(history) < epochs:
        print(f"-> {run_dir}: {' '.join(overrides)}", flush=True)
        start = time.perf_counter()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):  # keep the engine's lines (the load report) for the JSON
            train(load_config(recipe, [*overrides, f"output_dir={run_dir}"]))
        seconds, log = time.perf_counter() - start, buffer.getvalue()
        sys.stdout.write(log)
        (run_dir / "stdout.txt").write_text(log)
        history = read_metrics(run_dir)
    elif (run_dir / "stdout.txt").is_file():
        log = (run_dir / "stdout.txt").read_text()
    return {
        "run_dir": str(run_dir),
        "overrides": overrides,
        "history": history,
        "seconds_this_call": seconds,
        "seconds_epochs": sum(r.get("epoch_time", 0.0) for r in history),
        "load_report": [line for line in log.splitlines() if "pretrained" in line.lower() or "loaded" in line],
    }


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/simmim_claim"), help="run folders go here")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    runs: dict[str, dict] = {}
    for seed in SEEDS:
        base = args.out / f"seed{seed}"
        pt_dir = base / "pretrain"
        pt = run(PRETRAIN, [*COMMON, f"seed={seed}", f"epochs={PT_EPOCHS}"], pt_dir, PT_EPOCHS)
        recon = sorted(pt_dir.glob("recon_epoch*.png"), key=lambda p: int(p.stem.removeprefix("recon_epoch")))
        pt["recon"] = str(recon[-1]) if recon else None
        runs[f"seed{seed}/pretrain"] = pt
        last = pt["history"][-1]
        print(
            f"seed {seed} pretrain: val masked L1 {last['val_loss']:.4f} (train {last['train_loss']:.4f})", flush=True
        )
        for window in WINDOWS:
            for arm, extra in arms(window, pt_dir).items():
                overrides = [*FT_COMMON, f"seed={seed}", *extra]
                r = run(FINETUNE, overrides, base / arm, FT_EPOCHS)
                steps = step_losses(base / arm)
                r["step_loss"] = {str(k): v for k, v in steps.items()}
                r["first_steps_loss"] = {str(k): steps.get(k) for k in FIRST_STEPS}
                r["final_top1"] = r["history"][-1]["val_top1"]
                r["best_top1"] = max(h["val_top1"] for h in r["history"] if "val_top1" in h)
                r["train_loss_epochs"] = [h["train_loss"] for h in r["history"]]
                runs[f"seed{seed}/{arm}"] = r
                print(f"seed {seed} {arm:<11} top-1 final {r['final_top1']:6.2f} best {r['best_top1']:6.2f} | "
                      "train loss @steps " + " ".join(f"{k}:{v:.3f}" for k, v in r["first_steps_loss"].items()
                                                      if v is not None), flush=True)  # fmt: skip

    summary: dict[str, dict] = {}
    print(f"\n{'arm':<11} {'final top-1 mean +- std':>24} {'best top-1 mean +- std':>24}  per seed (final)")
    for window in WINDOWS:
        for arm in arms(window):
            finals = [runs[f"seed{s}/{arm}"]["final_top1"] for s in SEEDS]
            bests = [runs[f"seed{s}/{arm}"]["best_top1"] for s in SEEDS]
            summary[arm] = {"final": summarise(finals), "best": summarise(bests), "final_per_seed": finals}
            f, b = summary[arm]["final"], summary[arm]["best"]
            print(f"{arm:<11} {f['mean']:>15.2f} +- {f['std']:5.2f} {b['mean']:>15.2f} +- {b['std']:5.2f}  "
                  + " / ".join(f"{v:.2f}" for v in finals))  # fmt: skip
    for window in WINDOWS:
        diffs = [runs[f"seed{s}/ft_w{window}"]["final_top1"] - runs[f"seed{s}/scratch_w{window}"]["final_top1"]
                 for s in SEEDS]  # fmt: skip
        summary[f"ft_minus_scratch_w{window}"] = {**summarise(diffs), "per_seed": diffs}
        d = summary[f"ft_minus_scratch_w{window}"]
        print(f"window {window}: pre-trained - scratch = {d['mean']:+.2f} +- {d['std']:.2f} points (paired; per seed "
              + " / ".join(f"{v:+.2f}" for v in diffs) + ")")  # fmt: skip
    total = time.perf_counter() - t0
    print(f"wall time of this call: {total / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({
            "protocol": {"seeds": SEEDS, "windows": WINDOWS, "train_limit": TRAIN_LIMIT, "pt_epochs": PT_EPOCHS,
                         "ft_epochs": FT_EPOCHS, "pretrain_recipe": str(PRETRAIN.relative_to(ROOT)),
                         "finetune_recipe": str(FINETUNE.relative_to(ROOT)), "threads": 1},
            "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__},
            "wall_seconds_this_call": total, "summary": summary, "runs": runs,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
