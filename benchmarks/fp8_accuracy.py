"""FP8-LM's precision-decoupling finding, measured on a tiny GPT: how close FP8 O1/O2 train to FP32, against FP8
master weights and an FP8 second moment, which the paper says must not be FP8.

Every run is the same recipe through the one engine (:func:`swinlab.engine.fit`): ``gpt_nano`` (2 layers, width
64) on the embedded standard-library docstring corpus, 64-byte windows, batch 16, AdamW (betas 0.9/0.95, weight
decay 0.1, clip 1.0, warm-up then cosine). Only the precision changes:

- ``fp32``: the baseline;
- ``O1`` / ``O2``: ``swinlab.fp8.initialize(model, optimizer, level)`` (FP8 GEMMs, E4M3 weight gradients, FP16
  master with a scale; O2 also keeps the first moment in E4M3 and the second in FP16, both scaled), with GPT's
  own policy of keeping its first block in FP32 GEMMs (``GPT.fp8_high_precision``);
- ``fp32_mkl`` (opt-in): FP32 again, with torch's default (MKL) GEMMs instead of swinlab's oneDNN linears: the
  same arithmetic up to fp32 rounding (~1e-7); ``bf16`` (opt-in): BF16 autocast, the mixed precision users
  accept as lossless (8 mantissa bits: rounding ~0.3 %, E4M3's ~2.6 %), for the size of the paired differences
  a numerics change brings;
- ``master_e4m3`` / ``m2_e4m3``: O2 with the master weights, or the second moment, stored as scaled E4M3, the
  negative controls of the paper's ablation (updates smaller than E4M3's spacing are lost / 1/sqrt(v) is coarse);
  ``*_all_fp8``: the same with every eligible linear FP8 (the first block too), the control of ``O2_all_fp8``;
- opt-in diagnostics of where all-FP8 O1/O2 lose: ``O1_all_fp8`` / ``O2_all_fp8`` (every eligible linear in FP8,
  the first block too); with all linears FP8, ``O1_fp32_master`` (an FP32 master), ``O1_e4m3_grads`` (E4M3
  output gradients), ``O1_current`` (current instead of delayed scaling); ``O1_qkv_fp32`` / ``O2_qkv_fp32``
  (only the two q/k/v projections in FP32) and ``O2_first_qkv_fp32`` (only the first block's).

The score is the final validation loss relative to FP32 at the same seed (same initial weights, same batches, same
validation windows). Each FP8 run is also scored with its trained weights in FP32 GEMMs
(``final_val_loss_fp32_gemms``), which separates FP8 training from FP8 inference; each FP32 run is scored with FP8
GEMMs in all its FP8-eligible linears and in each alone (``final_val_loss_fp8_gemms``), which names the GEMM
whose rounding the trained function is sensitive to. The JSON (rewritten after every
run, so a stopped sweep keeps what it finished) holds every run; one PNG shows every validation curve and each
run's gap to FP32 at its seed over training (``--plot-only`` redraws it from the JSON).

Two data settings (``--data``):

- ``stdlib`` (default): the real corpus, 2000 steps (2.0 M training bytes, ~2.4 passes over the 0.84 MB training
  text), peak lr 3e-3 after 100 warm-up steps, cosine to 3e-4, scored on all 1462 held-out 64-byte windows (94 KB:
  every module's last 10 %). A short run (300 steps) ends near the plateau the model leaves at a seed-dependent
  moment, and a paired difference there measures that moment, not the precision; 2000 steps end past it, with
  the learning rate decayed.
- ``successor``: the sensitive fixture of the toy study this reproduces (fp8.md section 4.6, "task C") written as a
  text file: letters where each is the successor of the previous one with probability 0.9 and a uniformly random
  letter otherwise (entropy floor ~0.63 nats/byte), 120 steps of 32-byte windows at a constant lr of 5e-4, the
  size an Adam step has late in a cosine schedule: adjacent E4M3 values are 6-12 % apart, so for a weight of the
  typical size 0.02 such a step is below half the spacing and an E4M3 master loses it, where FP16 keeps it.

    python benchmarks/fp8_accuracy.py                  # stdlib: fp32/O1/O2 on seeds 0 1 2, controls on seed 0
    python benchmarks/fp8_accuracy.py --data successor --control-seeds 0 1 2 \\
        --json benchmarks/fp8_accuracy_successor.json --png benchmarks/fp8_accuracy_successor.png
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

import swinlab
from swinlab import fp8
from swinlab.data import build
from swinlab.engine import fit, precision, run_evaluation
from swinlab.engine.optim import build_optimizer
from swinlab.recipe import load_config
from swinlab.tasks import LanguageModelTask

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "gpt_nano_stdlib.yaml"
E4M3 = torch.float8_e4m3fn


ALL_FP8 = {"high_precision": ()}
"""Every linear the default filter accepts in FP8, GPT's first block too (the policy before GPT kept it)."""
QKV = ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn")
VARIANTS: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "fp32_mkl": None,
    "bf16": None,
    "master_e4m3": {"opt_level": "O2", "master_dtype": E4M3},
    "m2_e4m3": {"opt_level": "O2", "m2_dtype": E4M3},
    "master_e4m3_all_fp8": {"opt_level": "O2", "master_dtype": E4M3, **ALL_FP8},
    "m2_e4m3_all_fp8": {"opt_level": "O2", "m2_dtype": E4M3, **ALL_FP8},
    "O1": {"opt_level": "O1"},
    "O2": {"opt_level": "O2"},
    "O1_all_fp8": {"opt_level": "O1", **ALL_FP8},
    "O2_all_fp8": {"opt_level": "O2", **ALL_FP8},
    "O1_fp32_master": {"opt_level": "O1", "master_dtype": torch.float32, **ALL_FP8},
    "O1_e4m3_grads": {"opt_level": "O1", "grad_format": "e4m3", **ALL_FP8},
    "O1_current": {"opt_level": "O1", "scaling": "current", **ALL_FP8},
    "O1_qkv_fp32": {"opt_level": "O1", "high_precision": QKV},
    "O2_qkv_fp32": {"opt_level": "O2", "high_precision": QKV},
    "O2_first_qkv_fp32": {"opt_level": "O2", "high_precision": QKV[:1]},
}
"""Variant name -> arguments of :func:`swinlab.fp8.initialize` (``None``: plain FP32)."""
CONTROLS = ("master_e4m3", "m2_e4m3", "master_e4m3_all_fp8", "m2_e4m3_all_fp8")
DIAGNOSTICS = tuple(v for v in VARIANTS if v not in ("fp32", "O1", "O2", *CONTROLS))
"""Opt-in: the noise checks (``fp32_mkl``, ``bf16``) and where the gap of all-FP8 O1/O2 comes from (the master, the
gradient format, the scaling policy, the attention's q/k/v projections)."""
SUCCESSOR_RECIPE = (
    "data.name=text", "data.seq_len=32", "data.val_limit=64", "optim.lr=5e-4", "optim.schedule=constant",
    "optim.warmup_epochs=0",
)  # fmt: skip
"""Overrides of the ``successor`` fixture (plus ``data.root``, the file :func:`successor_text` writes)."""


def successor_text(path: Path, length: int = 40_000, seed: int = 0) -> Path:
    """Write the successor-rule letters to ``path`` (deterministic for a seed) and return it."""
    gen = torch.Generator().manual_seed(seed)
    follows = torch.rand(length, generator=gen) < 0.9
    jumps = torch.randint(26, (length,), generator=gen).tolist()
    letters, prev = [], 0
    for follow, jump in zip(follows.tolist(), jumps, strict=True):
        prev = (prev + 1) % 26 if follow else jump
        letters.append(chr(ord("a") + prev))
    path.write_text("".join(letters))
    return path


def fp8_inference_losses(model: torch.nn.Module, loader: Any) -> dict[str, float]:
    """Validation loss of FP32-trained weights with FP8 GEMMs in every linear FP8 would convert (``"all"``) and
    in each such linear alone: which GEMM's E4M3 rounding the trained function is sensitive to."""
    names = [fqn for fqn, module in model.named_modules() if fp8.amp.default_filter(module, fqn)]
    losses = {}
    for subset, keep in (("all", set(names)), *((name, {name}) for name in names)):
        converted = copy.deepcopy(model)
        fp8.initialize(converted, None, "O1", module_filter=lambda module, fqn, keep=keep: fqn in keep, **ALL_FP8)
        losses[subset] = run_evaluation(converted, LanguageModelTask(), loader)["val_loss"]
    return losses


def run(
    variant: str, seed: int, steps: int, eval_every: int, out_dir: Path, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Train one variant for ``steps`` updates, evaluating every ``eval_every``; returns its curves and score.

    ``overrides`` (``key=value``) change the recipe further, e.g. ``data.name=text data.root=FILE``.
    """
    if steps % eval_every:
        raise ValueError(f"steps ({steps}) must be a multiple of eval_every ({eval_every})")
    recipe = [
        "data.seq_len=64", "data.batch_size=16", "data.val_limit=null", f"epochs={steps // eval_every}",
        f"max_steps_per_epoch={eval_every}", "optim.warmup_epochs=1", "optim.lr=3e-3", "optim.min_lr=3e-4",
        f"seed={seed}", f"output_dir={out_dir / f'{variant}_seed{seed}'}", "resume=false", "log_every=1000000",
        *overrides,
    ]  # fmt: skip
    cfg = load_config(CONFIG, recipe)
    data = build(cfg.data, seed=cfg.seed)
    torch.manual_seed(cfg.seed)  # as swinlab.engine.train: the initial weights belong to the seed
    model = swinlab.create_model(cfg.model.name, **data.model_kwargs, **cfg.model.kwargs)
    optimizer = build_optimizer(model, cfg.optim)
    spec = VARIANTS[variant]
    autocast = contextlib.nullcontext
    if spec is not None:
        model, optimizer = fp8.initialize(model, optimizer, **spec)
    elif variant == "bf16":
        model, optimizer, autocast = precision.wrap(model, optimizer, "bf16")
    onednn = swinlab.layers.linear.ONEDNN_LINEAR
    swinlab.layers.linear.ONEDNN_LINEAR = onednn and variant != "fp32_mkl"
    start = time.perf_counter()
    try:
        result = fit(model, LanguageModelTask(), optimizer, data.train_loader, data.val_loader, cfg,
                     autocast=autocast)  # fmt: skip
    finally:
        swinlab.layers.linear.ONEDNN_LINEAR = onednn
    seconds = time.perf_counter() - start
    rows = list(csv.DictReader((Path(result["run_dir"]) / "metrics.csv").open()))
    fp32_gemm_loss = fp8_gemm_losses = None
    if variant == "fp32":
        fp8_gemm_losses = fp8_inference_losses(model, data.val_loader)
    elif spec is not None:
        # The trained weights again with FP32 GEMMs: how much of a gap is FP8 inference, not FP8 training.
        plain = swinlab.create_model(cfg.model.name, **data.model_kwargs, **cfg.model.kwargs)
        missing = plain.load_state_dict(model.state_dict(), strict=False).missing_keys  # FP8 metas are extra
        if missing:
            raise RuntimeError(f"FP8 state dict lacks {missing}")
        fp32_gemm_loss = run_evaluation(plain, LanguageModelTask(), data.val_loader)["val_loss"]
    return {
        "variant": variant,
        "seed": seed,
        "steps": [int(r["step"]) for r in rows],
        "val_loss": [float(r["val_loss"]) for r in rows],
        "train_loss": [float(r["train_loss"]) for r in rows],
        "final_val_loss": float(rows[-1]["val_loss"]),
        "final_val_loss_fp32_gemms": fp32_gemm_loss,
        "final_val_loss_fp8_gemms": fp8_gemm_losses,
        "skipped_steps": sum(int(r["skipped_steps"]) for r in rows),
        "seconds": seconds,
    }


def relative_to_fp32(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per variant, ``final / final_fp32 - 1`` for every seed that has an FP32 run."""
    base = {r["seed"]: r["final_val_loss"] for r in runs if r["variant"] == "fp32"}
    rel: dict[str, list[float]] = {}
    for r in runs:
        if r["variant"] != "fp32" and r["seed"] in base:
            rel.setdefault(r["variant"], []).append(r["final_val_loss"] / base[r["seed"]] - 1.0)
    return rel


def plot(runs: list[dict[str, Any]], path: Path, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = ("black", "dimgray", "tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown",
               "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "maroon", "teal", "lime")
    colors = dict(zip(VARIANTS, palette[: len(VARIANTS)], strict=True))
    fig, (full, zoom, paired) = plt.subplots(1, 3, figsize=(16, 4))
    base = {r["seed"]: r["val_loss"] for r in runs if r["variant"] == "fp32"}
    for r in runs:
        label = r["variant"] if r["seed"] == min(x["seed"] for x in runs if x["variant"] == r["variant"]) else None
        style = {"color": colors[r["variant"]], "alpha": 0.8, "marker": "."}
        for ax in (full, zoom):
            ax.plot(r["steps"], r["val_loss"], label=label, **style)
        if r["variant"] != "fp32" and r["seed"] in base:
            gap = [100.0 * (v / b - 1.0) for v, b in zip(r["val_loss"], base[r["seed"]], strict=True)]
            paired.plot(r["steps"], gap, **style)
    tail = [v for r in runs for v in r["val_loss"][len(r["val_loss"]) // 2 :]]
    zoom.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    zoom.set_xlim(max(r["steps"][-1] for r in runs) / 2, None)
    for bound in (-0.5, 0.5):
        paired.axhline(bound, color="gray", linestyle="--", linewidth=1)
    paired.set_yscale("symlog", linthresh=2.0)  # linear within +-2 %, where O1/O2 are; the controls compressed
    paired.set_yticks([-2, -1, 0, 1, 2, 5, 10, 20, 40], labels=["-2", "-1", "0", "1", "2", "5", "10", "20", "40"])
    panels = ((full, "validation loss (nats/byte)"), (zoom, "second half, zoomed"),
              (paired, "vs FP32 at the same seed (%, symlog; dashed: +-0.5 %)"))  # fmt: skip
    for ax, title in panels:
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    full.legend()
    seeds = sorted({r["seed"] for r in runs})
    fig.suptitle(f"gpt_nano on {data}: FP32 vs FP8 O1/O2 and negative controls (seeds {seeds})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_in_process(threads: int, *args: Any) -> dict[str, Any]:
    """:func:`run` in a worker process of ``--jobs``, with its own thread count."""
    torch.set_num_threads(threads)
    return run(*args)


def report(r: dict[str, Any]) -> None:
    rescored = r["final_val_loss_fp32_gemms"]
    rescored = "" if rescored is None else f", {rescored:.4f} with FP32 GEMMs"
    if r["final_val_loss_fp8_gemms"]:
        rescored = ", with FP8 GEMMs in " + ", ".join(
            f"{name} {loss:.4f}" for name, loss in r["final_val_loss_fp8_gemms"].items())
    print(f"{r['variant']:12s} seed {r['seed']}: final val loss {r['final_val_loss']:.4f}{rescored} "
          f"({r['seconds']:.0f} s, {r['skipped_steps']} skipped steps)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=("stdlib", "successor"), default="stdlib")
    parser.add_argument("--steps", type=int, default=None, help="default: 2000 (stdlib), 120 (successor)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: 100 (stdlib), 20 (successor)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--control-seeds", type=int, nargs="+", default=[0],
                        help="seeds of the negative controls (far off by design: one seed shows it)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in DIAGNOSTICS],
                        choices=list(VARIANTS), help=f"default: all but {', '.join(DIAGNOSTICS)}")  # fmt: skip
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="further recipe overrides, e.g. model.kwargs.n_embd=128")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time, each its own process (results do not depend on it)")  # fmt: skip
    parser.add_argument("--json", type=Path, default=Path("benchmarks/fp8_accuracy.json"))
    parser.add_argument("--png", type=Path, default=Path("benchmarks/fp8_accuracy.png"))
    parser.add_argument("--plot-only", action="store_true", help="redraw --png from the runs in --json")
    args = parser.parse_args()
    title = "stdlib_docs" if args.data == "stdlib" else "the successor-rule letters"
    if args.plot_only:
        plot(json.loads(args.json.read_text())["runs"], args.png, title)
        return
    torch.set_num_threads(args.threads)
    successor = args.data == "successor"
    args.steps = args.steps or (120 if successor else 2000)
    args.eval_every = args.eval_every or (20 if successor else 100)
    # Seed by seed the compared variants, then the controls: a sweep stopped early has complete paired seeds.
    plan = [(s, v) for s in args.seeds for v in args.variants if v not in CONTROLS]
    plan += [(s, v) for v in args.variants if v in CONTROLS for s in args.control_seeds]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        recipe = list(args.overrides)
        if successor:
            recipe = [*recipe, *SUCCESSOR_RECIPE, f"data.root={successor_text(Path(tmp) / 'successor.txt')}"]
        pending = [pool.submit(run_in_process, args.threads, variant, seed, args.steps, args.eval_every, Path(tmp),
                               recipe) for seed, variant in plan]  # fmt: skip
        for future in as_completed(pending):
            r = future.result()
            runs.append(r)
            runs.sort(key=lambda x: plan.index((x["seed"], x["variant"])))
            report(r)
            relative = relative_to_fp32(runs)
            summary = {v: {"per_seed": rel, "mean": statistics.mean(rel)} for v, rel in relative.items()}
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json), "png": str(args.png)},
                                             "relative_to_fp32": summary, "runs": runs}, indent=1))  # fmt: skip
            plot(runs, args.png, title)
    print("\nvariant       final val loss / FP32 - 1, per seed (mean)")
    for variant, rel in relative.items():
        print(f"{variant:12s}  {' '.join(f'{x:+.2%}' for x in rel)}  ({statistics.mean(rel):+.2%})")
    print(f"wrote {args.json} and {args.png}")


if __name__ == "__main__":
    main()
