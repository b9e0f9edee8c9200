"""GMConv's claim at CPU scale: accuracy (non-inferiority) and the receptive-field mechanism.

Two experiments, every run through swinlab's one engine (``swinlab.engine.train`` / ``fit``), one thread each:

* ``accuracy``: configs/resnet18_fashion.yaml vs configs/resnet18_gmconv_fashion.yaml (a quarter-width
  ResNet-18, 5 epochs on the embedded Fashion-MNIST subset) for several seeds; final-epoch validation top-1,
  mean +- sample std. The honest bar at this scale is non-inferiority (GMConv >= plain - 0.3 points); the
  paper's ImageNet gains (+0.85 ResNet-50, +0.98 AlexNet) are not claimed.
* ``mechanism``: two synthetic tasks on white-noise images, read out at the centre unit of a three-layer net
  of 7x7 convolutions (theoretical receptive field 19x19 = the whole image):
  ``local``, the sign of the mean of the central 3x3 pixels (a tiny central neighbourhood suffices), and
  ``wide``, the sign of the mean of all 19x19 pixels (every pixel counts equally). The paper's hypothesis:
  the learned sigma shrinks and the ERF concentrates on ``local``, and not on ``wide``. Sigma gets its own
  learning-rate multiplier (``optim.lr_mult: {log_sigma: m}``) for each ``m`` in ``--lr-mult``; the same
  net with plain convolutions is trained on both tasks for reference.

    python benchmarks/gmconv_claim.py mechanism
    python benchmarks/gmconv_claim.py accuracy --seeds 0 1 2

Runs go to ``runs/gmconv_claim/``; the figures to ``benchmarks/figures/``; a JSON of every number to
``--json``. Results are recorded in benchmarks/RESULTS.md ("GMConv (issue 5)").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from swinlab.config import ModelConfig, OptimConfig
from swinlab.engine import build_optimizer, fit, train
from swinlab.layers import conv2d_factory
from swinlab.metrics.erf import effective_receptive_field, erf_spread, save_erf_figure, save_sigma_plot, sigma_table
from swinlab.recipe import TrainConfig, load_config
from swinlab.tasks import ClassificationConfig, ClassificationTask

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "benchmarks" / "figures"
RUNS = Path("runs/gmconv_claim")
SIZE = 19  # three 7x7 layers: the centre unit sees exactly the whole image


# -- mechanism --------------------------------------------------------------------------------------------


class CentreNet(nn.Module):
    """Three 7x7 conv -> BN -> ReLU layers (plain or GMConv) and a linear classifier on the centre unit."""

    def __init__(self, conv: str, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        make = conv2d_factory(conv)
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [make(1 if i == 0 else width, width, 7, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2)
        self.last_conv = f"features.{3 * (depth - 1)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(f[:, :, f.shape[2] // 2, f.shape[3] // 2])


def noise_task(task: str, n: int, seed: int) -> TensorDataset:
    """``n`` white-noise 1x19x19 images labelled by the sign of the mean over the task's region."""
    x = torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    c = SIZE // 2
    region = x[:, 0, c - 1 : c + 2, c - 1 : c + 2] if task == "local" else x[:, 0]
    return TensorDataset(x, (region.mean(dim=(1, 2)) > 0).long())


def mechanism(args: argparse.Namespace) -> dict:
    train_sets = {t: noise_task(t, args.train_samples, seed=1) for t in ("local", "wide")}
    val_sets = {t: noise_task(t, 1000, seed=2) for t in ("local", "wide")}
    probe = torch.randn(256, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    settings = [("gmconv", m) for m in args.lr_mult] + [("plain", 1.0)]
    results, erfs, sigmas = {}, {}, {}
    torch.manual_seed(0)
    init = CentreNet("gmconv")
    erfs["GMConv at init"] = effective_receptive_field(init, probe, init.last_conv)
    for conv, mult in settings:
        for task in ("local", "wide"):
            label = f"{task}, {conv}" + (f", sigma lr x{mult:g}" if conv == "gmconv" else "")
            torch.manual_seed(0)  # the same initial weights in every run
            model = CentreNet(conv)
            cfg = TrainConfig(
                model=ModelConfig(name=f"centre_net_{conv}_7x7"), epochs=args.epochs,
                task=ClassificationConfig(label_smoothing=0.0),
                optim=OptimConfig(name=args.optim, lr=args.lr, weight_decay=args.weight_decay, warmup_epochs=0.5,
                                  lr_mult={"log_sigma": mult} if conv == "gmconv" else {}),
                output_dir=str(RUNS / f"mech_{args.optim}_{task}_{conv}_x{mult:g}"), resume=False, threads=1,
                log_every=50,
            )  # fmt: skip
            loader = DataLoader(train_sets[task], batch_size=64, shuffle=True,
                                generator=torch.Generator().manual_seed(0), drop_last=True)  # fmt: skip
            start = time.perf_counter()
            out = fit(model, ClassificationTask(), build_optimizer(model, cfg.optim), loader,
                      DataLoader(val_sets[task], batch_size=500), cfg)  # fmt: skip
            erf = effective_receptive_field(model, probe, model.last_conv)
            rows = sigma_table(model)
            erfs[label], sigmas[label] = erf, rows
            results[label] = {
                "task": task, "conv": conv, "sigma_lr_mult": mult, "val_top1": out["val_top1"],
                "erf_spread_px": erf_spread(erf), "seconds": time.perf_counter() - start,
                "sigma_median": {r.layer: float(r.values.median()) for r in rows},
                "sigma_min": {r.layer: float(r.values.min()) for r in rows},
                "sigma_max": {r.layer: float(r.values.max()) for r in rows},
            }  # fmt: skip
            print(f"{label:<36} top-1 {out['val_top1']:6.2f}  ERF spread {erf_spread(erf):5.2f} px  sigma median "
                  + " ".join(f"{v:.2f}" for v in results[label]["sigma_median"].values()), flush=True)  # fmt: skip
    results["GMConv at init"] = {"erf_spread_px": erf_spread(erfs["GMConv at init"]), "sigma_init": 3.5}
    FIGURES.mkdir(parents=True, exist_ok=True)
    for mult in args.lr_mult:
        keep = ["GMConv at init", *(k for k in erfs if k.endswith(f"x{mult:g}")), "local, plain", "wide, plain"]
        save_erf_figure({k: erfs[k] for k in keep}, FIGURES / f"gmconv_mechanism_{args.optim}_erf_x{mult:g}.png",
                        title=f"ERF of the last 7x7 layer's centre unit (noise probe); {args.optim}, "
                        f"sigma lr x{mult:g}")  # fmt: skip
    save_sigma_plot({k: v for k, v in sigmas.items() if v}, FIGURES / f"gmconv_mechanism_{args.optim}_sigma.png")
    return results


# -- accuracy ---------------------------------------------------------------------------------------------


def accuracy(args: argparse.Namespace) -> dict:
    runs = {}
    for seed in args.seeds:
        for kind in ("plain", "gmconv"):
            recipe = ROOT / "configs" / f"resnet18{'_gmconv' if kind == 'gmconv' else ''}_fashion.yaml"
            overrides = [f"seed={seed}", f"output_dir={RUNS / f'acc_{kind}_s{seed}'}", "resume=false", "threads=1"]
            overrides += [f"epochs={args.epochs}"] if args.epochs else []
            start = time.perf_counter()
            out = train(load_config(recipe, overrides))
            runs[f"{kind}/seed{seed}"] = {"val_top1": out["val_top1"], "seconds": time.perf_counter() - start}
            print(f"{kind:<7} seed {seed}: top-1 {out['val_top1']:.2f}", flush=True)
    summary = {}
    for kind in ("plain", "gmconv"):
        accs = [r["val_top1"] for k, r in runs.items() if k.startswith(kind + "/")]
        summary[kind] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
        print(f"{kind:<7} top-1 {summary[kind]['mean']:.2f} +- {summary[kind]['std']:.2f} over {len(accs)} seeds")
    diff = summary["gmconv"]["mean"] - summary["plain"]["mean"]
    verdict = "meets" if diff >= -0.3 else "misses"
    print(f"GMConv - plain = {diff:+.2f} points: {verdict} the non-inferiority bar (>= -0.3)")
    return {"runs": runs, "summary": summary, "gmconv_minus_plain": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="experiment", required=True)
    p = sub.add_parser("mechanism", help="learned sigma and ERF on a local vs a wide synthetic task")
    p.add_argument("--lr-mult", type=float, nargs="+", default=[1.0, 10.0], help="sigma LR multipliers to try")
    p.add_argument("--optim", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--train-samples", type=int, default=8192)
    p = sub.add_parser("accuracy", help="plain vs GMConv quarter-width ResNet-18 on the embedded Fashion-MNIST")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' 5 epochs")
    for p in sub.choices.values():
        p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = mechanism(args) if args.experiment == "mechanism" else accuracy(args)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))


if __name__ == "__main__":
    main()
