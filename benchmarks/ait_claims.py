"""AiT's depth claims at CPU scale (issue 16 §4): soft vs hard tokens, mask augmentation against corrupted labels,
autoregressive vs parallel (AiT-P) decoding, on the procedural rooms (exact depth, no download).

Every training run goes through swinlab's one engine (``swinlab.engine.train`` on configs/ait_tokenizer_depth_nano.yaml
and configs/ait_depth_nano.yaml with the overrides below, as ``swinlab train ... --set`` does); re-evaluations of a
trained run in other decoding modes go through ``swinlab.engine.evaluate`` (``swinlab eval``). This script only
chooses overrides, runs them one after the other and collects numbers.

Protocol (the budget was fixed by probes of the *official* variant against the mean-map baseline before any compared
run; nothing below was changed after looking at a comparison):

* Data: ``procedural_depth`` at ``IMG`` px, the first ``TRAIN`` scenes of the training stream, the first ``VAL`` of
  the validation stream; every run sees the same scenes in the same order for a given seed.
* Baseline: the per-pixel mean of the training depth maps, scored on the validation maps (the prior any solver must
  beat), and the shared tokenizer's own reconstruction of the validation maps (the best a solver can reach).
* Shared tokenizer (solver runs): the depth tokenizer recipe at ``IMG`` px, downsample 8 (4x4 = 16 tokens), 128
  codes of 64 dims, seed 0, ``TOKENIZER_EPOCHS`` epochs; every solver run uses this one frozen tokenizer.
* Solver (each variant for every seed): the nano solver recipe with a 2-stage backbone (stride 8 -> 4x4 features at
  32 px), ``SOLVER_EPOCHS`` epochs, AdamW ``SOLVER_LR``:
  - ``soft`` (official AiT): aux SILog loss through the frozen decoder (weight 1, tau 0.8), soft decode, soft
    next-token input;
  - ``hard`` (the paper's "w/o soft token"): aux weight 0, arg-max decode, hard input;
  - ``parallel`` (AiT-P): the ``soft`` recipe with ``model.kwargs.parallel: true`` (one pass from ``[MASK]`` inputs).
  Every trained solver's last checkpoint (not the best epoch: no selection on validation) is evaluated in each
  decoding mode of ``DECODES``, which separates the decoding effect from the training (aux loss) effect.
* Mask augmentation: the tokenizer recipe (same size as above, ``MASK_EPOCHS`` epochs) on training labels with
  ``HOLES`` of their pixels zeroed by rectangular holes (``data.depth_holes``, the same holes in every run), with
  ``task.mask_ratio`` 0 vs 0.5, mask cells of ``MASK_PATCH`` px (half a token's side, as the official 16-px cells of
  32-px tokens). Scored on clean validation maps (clean in, clean target) and on validation maps given holes of the
  same share from another stream (holey in, clean target: the in-painting the augmentation is for).
* Mask augmentation downstream (``--parts masksolver``, the paper's claim): the ``soft`` solver recipe above trained on
  the same ``HOLES``-corrupted training labels (``data.depth_holes`` on the solver run too, so its token targets and
  its aux SILog target are the holey ground truth; the aux loss skips the 0 pixels) with the mask-augmentation
  tokenizer of the same seed and variant (``mask/<variant>_seed<s>``, reused when finished, else trained as above),
  scored on the clean validation maps (last checkpoint, the run's own validation: soft decode, soft input).
* Speed: images/s of the whole prediction (solver decode + tokenizer decode) on the validation images, 1 thread,
  batches of ``SPEED_BATCH``, median of ``SPEED_REPEATS`` passes after one untimed pass; the machine is shared.

    python benchmarks/ait_claims.py --out benchmarks/ait_claims.json [--seeds 0,1,2] [--solver-epochs N]
    python benchmarks/ait_claims.py --parts masksolver --runs /tmp/ait_claims/main   # the downstream mask claim

Runs go to ``--runs`` (default /tmp/ait_claims); a run whose metrics.csv holds all its epochs is read, not rerun (a
killed run resumes from its checkpoint), and numbers already in the JSON are kept. Results: benchmarks/RESULTS.md,
"AiT depth claims at CPU scale (issue 16 §4)".
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from _common import measure_steps, read_metrics
from swinlab.data.depth import HOLES_STREAM, depth_sets, punch_holes
from swinlab.engine import train
from swinlab.engine.trainer import evaluate
from swinlab.metrics.depth import depth_metrics
from swinlab.recipe import load_config
from swinlab.tasks.ait_depth import AitDepthTask, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_RECIPE = ROOT / "configs" / "ait_tokenizer_depth_nano.yaml"
SOLVER_RECIPE = ROOT / "configs" / "ait_depth_nano.yaml"

# -- the protocol's budget (fixed before the compared runs; see the docstring) -----------------------------------
SEEDS = (0, 1, 2)
IMG, TRAIN, VAL = 32, 4096, 128
TOKENIZER_EPOCHS = 6
SOLVER_EPOCHS = 8
SOLVER_LR = 2e-3
MASK_EPOCHS = 6
HOLES = 0.25
MASK_PATCH = 4
SPEED_BATCH, SPEED_REPEATS = 16, 3
DATA = [f"data.img_size={IMG}", f"data.train_limit={TRAIN}", f"data.val_limit={VAL}", "threads=1"]
TOKENIZER = [*DATA, f"model.kwargs.image_size={IMG}", "task.recon_images=0", f"task.mask_patch_size={MASK_PATCH}"]
BACKBONE = "{embed_dim: 32, depths: [2, 2], num_heads: [2, 4], window_size: 4, drop_path_rate: 0.0}"
SOLVER = [*DATA, f"model.kwargs.backbone_kwargs={BACKBONE}", "model.kwargs.max_length=16", f"optim.lr={SOLVER_LR}",
          "task.depth_images=0"]  # fmt: skip
SOFT = ["task.aux_weight=1.0", "task.soft_decode=true", "task.soft_input=true"]
HARD = ["task.aux_weight=0", "task.soft_decode=false", "task.soft_input=false"]
SOLVER_VARIANTS = {"soft": SOFT, "hard": HARD, "parallel": [*SOFT, "model.kwargs.parallel=true"]}
DECODES = {
    "soft": ["task.soft_decode=true", "task.soft_input=true"],
    "hard": ["task.soft_decode=false", "task.soft_input=false"],
    "soft_decode_hard_input": ["task.soft_decode=true", "task.soft_input=false"],
    "hard_decode_soft_input": ["task.soft_decode=false", "task.soft_input=true"],
}
"""Decoding modes every trained solver is scored in (a parallel solver has no next-token input: two modes)."""
MASK_VARIANTS = {"mask0": ["task.mask_ratio=0"], "mask0.5": ["task.mask_ratio=0.5"]}
REPORTED = ("rmse", "abs_rel", "d1")


def run(recipe: Path, overrides: list[str], run_dir: Path, holes: float = 0.0) -> dict:
    """Train (or resume, or just read) one run; its per-epoch history and seconds."""
    cfg = load_config(recipe, [*overrides, f"output_dir={run_dir}", f"data.depth_holes={holes}"])
    history = read_metrics(run_dir)
    seconds = None
    if len(history) < cfg.epochs:
        print(f"-> {run_dir.name}: {' '.join(overrides)}" + (f" data.depth_holes={holes}" if holes else ""), flush=True)
        start = time.perf_counter()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            train(cfg)
        seconds = time.perf_counter() - start
        (run_dir / "stdout.txt").write_text(log.getvalue())
        history = read_metrics(run_dir)
    last = history[-1]
    print(f"   {run_dir.name}: " + ", ".join(f"{k} {last['val_' + k]:.4f}" for k in REPORTED), flush=True)
    return {"run_dir": str(run_dir), "overrides": overrides, "depth_holes": holes, "history": history,
            "seconds_this_call": seconds, "seconds_epochs": sum(r.get("epoch_time", 0.0) for r in history)}  # fmt: skip


def scores(metrics: dict[str, float], prefix: str = "val_") -> dict[str, float]:
    return {k: float(metrics[prefix + k]) for k in REPORTED}


def mean_map_baseline(tokenizer_dir: Path) -> dict[str, dict[str, float]]:
    """The per-pixel mean training map and the shared tokenizer's reconstruction, scored on the validation maps."""
    cfg = load_config(SOLVER_RECIPE, SOLVER)
    train_set, val_set = depth_sets(cfg.data)
    mean = torch.stack([train_set.source[i][1] for i in range(len(train_set))]).mean(0, keepdim=True)
    val = torch.stack([val_set[i][1] for i in range(len(val_set))])
    tokenizer, _ = load_tokenizer(str(tokenizer_dir))
    with torch.no_grad():
        recon = tokenizer.decode_ids(tokenizer.encode(val)).clamp_min(1e-3)
    out = {}
    for name, pred in (("mean_map", mean.expand_as(val)), ("tokenizer_recon", recon)):
        out[name] = {k: float(v.mean()) for k, v in depth_metrics(pred, val).items() if k in REPORTED}
    return out


def reconstruction(run_dir: Path) -> dict[str, dict[str, float]]:
    """A tokenizer run's reconstruction of the clean validation maps from clean and from holey input."""
    cfg = load_config(TOKENIZER_RECIPE, TOKENIZER)
    val_set = depth_sets(cfg.data)[1]
    clean = torch.stack([val_set[i][1] for i in range(len(val_set))])
    holey = torch.stack([punch_holes(d, HOLES, HOLES_STREAM + 1, i) for i, d in enumerate(clean)])
    tokenizer, _ = load_tokenizer(str(run_dir))
    out = {}
    with torch.no_grad():
        for name, given in (("clean_input", clean), ("holey_input", holey)):
            recon = tokenizer.decode_ids(tokenizer.encode(given)).clamp_min(1e-3)
            out[name] = {k: float(v.mean()) for k, v in depth_metrics(recon, clean).items() if k in REPORTED}
    return out


def decode_speed(run_dir: Path) -> dict[str, float]:
    """Images/s of a trained solver's prediction (solver decode + tokenizer decode) over the validation images."""
    from swinlab.data.build import build
    from swinlab.engine.checkpoint import load_checkpoint
    from swinlab.engine.trainer import build_run_model, config_from_checkpoint

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = config_from_checkpoint(ckpt)
    bundle = build(cfg.data, seed=cfg.seed)
    task = AitDepthTask.from_config(cfg.task, bundle)
    model = build_run_model(cfg, bundle, task, torch.device("cpu"), pretrained=None)
    model.load_state_dict(ckpt["model"])
    model.eval()
    images = torch.stack([bundle.val_loader.dataset[i][0] for i in range(len(bundle.val_loader.dataset))])
    batches = images.split(SPEED_BATCH)

    def one_pass() -> None:
        for batch in batches:
            task.predict(model, batch)

    with torch.inference_mode():
        seconds = measure_steps(one_pass, 1, SPEED_REPEATS)["median_s"]
    return {"images_per_s": len(images) / seconds, "batch": SPEED_BATCH, "images": len(images), "threads": 1}


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}  # fmt: skip


def table(entries: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per row: mean, sample std, min and max over seeds of each reported metric."""
    return {row: {k: summarise([e[k] for e in runs]) for k in REPORTED} for row, runs in entries.items() if runs}


def print_table(title: str, summary: dict[str, dict[str, dict[str, float]]]) -> None:
    print(f"\n{title}\n{'row':<34} {'n':>2} " + " ".join(f"{k + ' mean±std [min, max]':>34}" for k in REPORTED))
    for row, s in summary.items():
        cells = [f"{s[k]['mean']:.4f}±{s[k]['std']:.4f} [{s[k]['min']:.4f}, {s[k]['max']:.4f}]" for k in REPORTED]
        print(f"{row:<34} {s['rmse']['n']:>2} " + " ".join(f"{c:>34}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ait_claims.json", help="the JSON")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/ait_claims"), help="run folders go here")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--solver-epochs", type=int, default=SOLVER_EPOCHS)
    parser.add_argument("--mask-epochs", type=int, default=MASK_EPOCHS)
    parser.add_argument("--parts", default="mask,solver", help="which claims to run: mask, solver, masksolver")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = set(args.parts.split(","))
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs: dict[str, dict] = result.setdefault("runs", {})

    def save() -> None:
        result["protocol"] = {
            "seeds": seeds, "img": IMG, "train_scenes": TRAIN, "val_scenes": VAL, "tokenizer_epochs": TOKENIZER_EPOCHS,
            "solver_epochs": args.solver_epochs, "solver_lr": SOLVER_LR, "mask_epochs": args.mask_epochs,
            "holes": HOLES, "mask_patch": MASK_PATCH, "tokenizer_overrides": TOKENIZER, "solver_overrides": SOLVER,
            "solver_variants": SOLVER_VARIANTS, "decodes": DECODES, "mask_variants": MASK_VARIANTS,
            "tokenizer_recipe": str(TOKENIZER_RECIPE.relative_to(ROOT)),
            "solver_recipe": str(SOLVER_RECIPE.relative_to(ROOT)), "threads": 1,
            "speed": {"batch": SPEED_BATCH, "repeats": SPEED_REPEATS},
        }  # fmt: skip
        result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                             "torch": torch.__version__}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=1))

    def mask_tokenizer(variant: str, seed: int) -> Path:
        """The mask-augmentation tokenizer run of a variant and seed (trained, or read, once) and its folder."""
        key = f"mask/{variant}/seed{seed}"
        if "reconstruction" not in runs.get(key, {}):
            overrides = [*TOKENIZER, *MASK_VARIANTS[variant], f"epochs={args.mask_epochs}", f"seed={seed}"]
            runs[key] = run(TOKENIZER_RECIPE, overrides, args.runs / "mask" / f"{variant}_seed{seed}", HOLES)
            runs[key]["reconstruction"] = reconstruction(Path(runs[key]["run_dir"]))
            save()
        return Path(runs[key]["run_dir"])

    def shared_tokenizer() -> Path:
        """The shared tokenizer of the solver runs (trained, or read, once) and the baseline it gives."""
        tok_dir = args.runs / "tokenizer"
        if "tokenizer" not in runs:
            runs["tokenizer"] = run(TOKENIZER_RECIPE, [*TOKENIZER, f"epochs={TOKENIZER_EPOCHS}", "seed=0"], tok_dir)
            save()
        if "baseline" not in result:
            result["baseline"] = mean_map_baseline(tok_dir)
            save()
        print("baseline:", json.dumps(result["baseline"]), flush=True)
        return tok_dir

    if "mask" in parts:
        for seed in seeds:
            for variant in MASK_VARIANTS:
                mask_tokenizer(variant, seed)
        rows = {f"{v} {given}": [runs[f"mask/{v}/seed{s}"]["reconstruction"][given] for s in seeds
                                 if f"mask/{v}/seed{s}" in runs]
                for given in ("clean_input", "holey_input") for v in MASK_VARIANTS}  # fmt: skip
        result["mask_summary"] = table(rows)
        save()
        print_table("mask augmentation (tokenizer reconstruction of clean validation maps)", result["mask_summary"])

    if "solver" in parts:
        tok_dir = shared_tokenizer()
        order = [(v, s) for v in ("soft", "hard") for s in seeds] + [("parallel", s) for s in seeds]
        for variant, seed in order:  # the soft/hard claim first: a cut-short call still has its seeds
            extra = SOLVER_VARIANTS[variant]
            key = f"solver/{variant}/seed{seed}"
            entry = runs.get(key, {})
            if "decodes" not in entry or "speed" not in entry:
                overrides = [*SOLVER, *extra, f"task.tokenizer={tok_dir}", f"epochs={args.solver_epochs}",
                             f"seed={seed}"]  # fmt: skip
                entry = run(SOLVER_RECIPE, overrides, args.runs / "solver" / f"{variant}_seed{seed}")
                modes = ("soft", "hard") if variant == "parallel" else tuple(DECODES)
                entry["decodes"] = {m: scores(evaluate(entry["run_dir"], DECODES[m])) for m in modes}
                entry["speed"] = decode_speed(Path(entry["run_dir"]))
                runs[key] = entry
                save()
            d = entry["decodes"]
            print(f"   {variant} seed {seed}: " + " | ".join(f"{m} RMSE {v['rmse']:.4f}" for m, v in d.items())
                  + f" | {entry['speed']['images_per_s']:.1f} images/s", flush=True)  # fmt: skip
        rows = {}
        for variant in SOLVER_VARIANTS:
            entries = [runs[f"solver/{variant}/seed{s}"] for s in seeds if f"solver/{variant}/seed{s}" in runs]
            for mode in DECODES:
                rows[f"{variant} trained, {mode} decode"] = [
                    e["decodes"][mode] for e in entries if mode in e["decodes"]
                ]
            speeds = [e["speed"]["images_per_s"] for e in entries]
            if speeds:
                result.setdefault("speed_summary", {})[variant] = summarise(speeds)
        result["solver_summary"] = table(rows)
        save()
        print_table("solver (validation, last checkpoint)", result["solver_summary"])
        print("images/s (1 thread):", json.dumps(result.get("speed_summary")))

    if "masksolver" in parts:
        shared_tokenizer()  # the mean-map baseline
        for seed in seeds:  # seed by seed: a cut-short call still has both variants of its seeds
            for variant in MASK_VARIANTS:
                key = f"masksolver/{variant}/seed{seed}"
                if "scores" in runs.get(key, {}):
                    continue
                tokenizer_dir = mask_tokenizer(variant, seed)
                overrides = [*SOLVER, *SOFT, f"task.tokenizer={tokenizer_dir}", f"epochs={args.solver_epochs}",
                             f"seed={seed}"]  # fmt: skip
                entry = run(SOLVER_RECIPE, overrides, args.runs / "masksolver" / f"{variant}_seed{seed}", HOLES)
                entry["scores"] = scores(entry["history"][-1])
                runs[key] = entry
                save()
        rows = {}
        for variant in MASK_VARIANTS:
            done = [s for s in seeds if f"masksolver/{variant}/seed{s}" in runs]
            rows[f"{variant} solver (holey labels)"] = [runs[f"masksolver/{variant}/seed{s}"]["scores"] for s in done]
            rows[f"{variant} tokenizer recon (its ceiling)"] = [
                runs[f"mask/{variant}/seed{s}"]["reconstruction"]["clean_input"] for s in done
            ]
        result["masksolver_summary"] = table(rows)
        save()
        print_table("mask augmentation downstream (soft solver on holey labels, clean validation maps)",
                    result["masksolver_summary"])  # fmt: skip
        print("mean map:", json.dumps(result["baseline"]["mean_map"]))


if __name__ == "__main__":
    main()
