"""Where a training step goes, by op and by layer: swinlab against its peers, in one process (issue 13 §5).

The benchmarks say how fast a step is; this script says where its time goes, so that a speed change is aimed at
what is left. For each implementation it profiles ``--steps`` training steps (after ``--warmup``) of the same
model, input and optimizer as the benchmark (``bench_swin.py`` / ``bench_video_swin.py`` / ``bench_simmim.py``
build them; random weights: the time does not depend on them) with ``torch.profiler`` and prints

* **by layer**: every module the benchmark's models share (patch embedding, attention, MLP, norms, patch merging,
  head / decoder), per stage, forward and backward. Forward time is the module's own range; backward time is each
  autograd node's, charged to the layer whose forward op created it (the profiler's sequence numbers link the two).
  The optimizer step is a row of its own; what nothing claims (loss, gradient accumulation, glue between modules)
  is ``other``. Stages are told apart by the width a module reads (96, 192, ... channels for the tiny models), so
  the same table lines up across implementations whose module names differ;
* **by op**: the ops with the most self CPU time, per implementation side by side.

Peers (timm, torchvision, transformers) run in the interpreter that has them, e.g.::

    /work/peerenv/bin/python benchmarks/profile_step.py --model swinv2 --impls swinlab,timm --threads 1
    /work/peerenv/bin/python benchmarks/profile_step.py --model simmim --impls swinlab,transformers
    /work/peerenv/bin/python benchmarks/profile_step.py --model video_swin --impls swinlab,torchvision --steps 1

Profiling adds a few percent per op (most to the implementation with the most small ops); the step times printed
are from the profiled steps. Use the benchmarks for speed ratios and this for shares.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from _common import machine_line, make_step, setup_worker

LAYER = "layer:"
BACKWARD = "autograd::engine::evaluate_function: "
OPTIMIZER = "Optimizer.step#"
MODELS = {  # the benchmarks' input shapes (num_classes 0: SimMIM's loss is its own)
    "swinv2": {"shape": (8, 3, 256, 256), "num_classes": 1000},
    "simmim": {"shape": (8, 3, 192, 192), "num_classes": 0},
    "video_swin": {"shape": (1, 3, 16, 224, 224), "num_classes": 400},
}


def builder(model: str) -> tuple[Callable[[str], nn.Module], Callable | None]:
    """The benchmark's ``build`` for ``model`` (random weights) and its loss on the model's output (None: cross
    entropy on random labels, as the benchmark)."""
    if model == "swinv2":
        import bench_swin

        return partial(bench_swin.build, weights=None), None
    if model == "video_swin":
        import bench_video_swin

        return partial(bench_video_swin.build, weights=None), None
    import tempfile

    import bench_simmim
    from swinlab.pretrain.simmim import MaskGenerator

    img = MODELS["simmim"]["shape"][-1]
    generator = MaskGenerator(img, bench_simmim.MASK_PATCH, bench_simmim.ENCODER["patch_size"], bench_simmim.MASK_RATIO)
    mask = Path(tempfile.mkdtemp(prefix="profile_step_")) / "mask.pt"
    torch.save(generator(MODELS["simmim"]["shape"][0], generator=torch.Generator().manual_seed(0)), mask)
    return partial(bench_simmim.build, weights=None, img=img, mask=mask), lambda out: out[0]


def layer_kind(name: str, module: nn.Module) -> str | None:
    """Which shared layer ``module`` (named ``name`` in its model) is, under any of the implementations' names."""
    last = name.rsplit(".", 1)[-1]
    cls = type(module).__name__.lower()
    if "merging" in cls or last == "downsample":
        return "patch merging"
    if "embed" in cls or last in ("patch_embed", "embeddings"):
        return "patch embed"
    if last in ("attn", "attention"):
        return "attention"
    if last in ("mlp", "intermediate") or re.search(r"blocks\.\d+\.output$", name):  # transformers splits the MLP
        return "mlp"
    if "norm" in last:
        return "norm"
    if last in ("head", "decoder"):
        return "head / decoder"
    return None


def mark_layers(model: nn.Module) -> None:
    """Wrap the forward of every outermost shared layer of ``model`` in a ``layer:<kind>:<width>`` profiler range."""

    def enter(module: nn.Module, args: tuple, kind: str, output_of_mlp: bool) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        width = 0 if x is None or kind in ("patch embed", "head / decoder") else x.shape[-1]
        width //= 4 if output_of_mlp else 1  # transformers' second MLP half reads the 4x hidden width
        module._profile_range = record_function(f"{LAYER}{kind}:{width}")
        module._profile_range.__enter__()

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        module._profile_range.__exit__(None, None, None)

    marked: list[str] = []
    for name, module in model.named_modules():
        kind = layer_kind(name, module)
        if kind is None or any(name.startswith(m + ".") for m in marked):
            continue
        marked.append(name)
        output_of_mlp = kind == "mlp" and name.endswith(".output")
        module.register_forward_pre_hook(partial(enter, kind=kind, output_of_mlp=output_of_mlp))
        module.register_forward_hook(leave)


def layer_of(event, cache: dict) -> str | None:
    """The ``layer:`` range enclosing a profiler event, if any."""
    chain = []
    while event is not None and event.id not in cache:
        if event.name.startswith(LAYER):
            cache[event.id] = event.name[len(LAYER) :]
            break
        chain.append(event)
        event = event.cpu_parent
    found = cache.get(event.id) if event is not None else None
    for e in chain:
        cache[e.id] = found
    return found


def by_layer(events: list, steps: int) -> dict[str, float]:
    """Milliseconds per step of each ``<kind>:<width>:<fwd|bwd>`` and of the optimizer step."""
    cache: dict = {}
    seq_layer: dict[int, str] = {}
    out: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith(LAYER):  # the marked layers never nest (mark_layers)
            out[e.name[len(LAYER) :] + ":fwd"] += e.cpu_time_total / 1e3
        elif e.name.startswith(OPTIMIZER):
            out["optimizer"] += e.cpu_time_total / 1e3
        elif e.sequence_nr >= 0 and not e.name.startswith(BACKWARD):
            layer = layer_of(e, cache)
            if layer is not None:
                seq_layer.setdefault(e.sequence_nr, layer)
    for e in events:
        if e.name.startswith(BACKWARD):
            layer = seq_layer.get(e.sequence_nr)
            if layer is not None:
                out[layer + ":bwd"] += e.cpu_time_total / 1e3
    return {k: v / steps for k, v in out.items()}


def profile_training(step: Callable[[], None], steps: int) -> dict:
    """Profile ``steps`` calls of ``step`` (a training step of a model passed through :func:`mark_layers`): the
    mean step time, milliseconds per step by layer (:func:`by_layer`, the remainder as ``other``) and by op."""
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            with record_function("step"):
                step()
            times.append(time.perf_counter() - t0)
    layers = by_layer(prof.events(), steps)
    step_ms = 1e3 * statistics.mean(times)
    layers["other"] = step_ms - sum(layers.values())
    ops = {
        e.key: e.self_cpu_time_total / 1e3 / steps
        for e in prof.key_averages()
        if e.key != "step" and not e.key.startswith(LAYER)
    }
    return {"step_ms": step_ms, "layers": layers, "ops": ops}


def profile_impl(model_name: str, impl: str, args: argparse.Namespace) -> dict:
    """One implementation's training step as the benchmark builds it, warmed up, then :func:`profile_training`."""
    build, criterion = builder(model_name)
    spec = MODELS[model_name]
    try:
        model = build(impl)
    except ImportError as e:
        hint = "run it with the peers' venv"
        raise SystemExit(f"{impl}: {e.name} is not installed in this interpreter ({hint})") from None
    mark_layers(model)
    x = torch.randn(spec["shape"], generator=torch.Generator().manual_seed(0))
    step = make_step(model, x, "train", impl, "plain", spec["num_classes"], criterion=criterion)
    for _ in range(args.warmup):
        step()
    return profile_training(step, args.steps)


def stage_names(results: dict[str, dict]) -> dict[int, str]:
    """Width → stage label (``s0`` for the narrowest block width, ...), from the attention widths seen."""
    widths = sorted({int(k.split(":")[1]) for r in results.values() for k in r["layers"] if k.startswith("attention")})
    return {w: f"s{i}" for i, w in enumerate(widths)}


def print_tables(results: dict[str, dict], top: int) -> None:
    impls = list(results)
    stages = stage_names(results)

    def label(key: str) -> str:
        if key in ("other", "optimizer"):
            return {"other": "other (loss, gradient accumulation, glue)", "optimizer": "optimizer step"}[key]
        kind, width, phase = key.split(":")
        stage = stages.get(int(width), "") if int(width) else ""
        return f"{kind} {stage} {phase}".replace("  ", " ")

    def order(key: str) -> tuple:
        if key in ("other", "optimizer"):
            return (1, key)
        kind, width, phase = key.split(":")
        return (0, kind, int(width), phase != "fwd")

    keys = sorted({k for r in results.values() for k in r["layers"]}, key=order)
    print("\nBy layer, ms per step (share of the step)")
    print("| layer | " + " | ".join(impls) + (f" | {impls[1]} / {impls[0]} |" if len(impls) > 1 else " |"))
    print("|---" * (len(impls) + 1 + (len(impls) > 1)) + "|")
    for k in keys:
        vals = [results[i]["layers"].get(k, 0.0) for i in impls]
        cells = [f"{v:.0f} ({100 * v / results[i]['step_ms']:.1f} %)" for v, i in zip(vals, impls, strict=True)]
        ratio = [f"{vals[1] / vals[0]:.2f}" if len(vals) > 1 and vals[0] > 0.5 else "-"] if len(vals) > 1 else []
        print(f"| {label(k)} | " + " | ".join(cells + ratio) + " |")
    print(
        "| **step** | "
        + " | ".join(f"**{results[i]['step_ms']:.0f}**" for i in impls)
        + (f" | **{results[impls[1]]['step_ms'] / results[impls[0]]['step_ms']:.2f}** |" if len(impls) > 1 else " |")
    )

    ops = sorted(
        {k for r in results.values() for k in r["ops"]},
        key=lambda k: -max(r["ops"].get(k, 0) for r in results.values()),
    )
    print(f"\nBy op (self CPU), ms per step, top {top}")
    print("| op | " + " | ".join(impls) + " |")
    print("|---" * (len(impls) + 1) + "|")
    for k in ops[:top]:
        print(f"| `{k}` | " + " | ".join(f"{results[i]['ops'].get(k, 0.0):.1f}" for i in impls) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=tuple(MODELS), default="swinv2")
    parser.add_argument("--impls", default="swinlab", help="comma-separated, e.g. swinlab,timm")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="profiled training steps (averaged)")
    parser.add_argument("--top", type=int, default=25, help="ops in the by-op table")
    args = parser.parse_args()
    setup_worker(args.threads)
    print(machine_line())
    print(f"torch {torch.__version__}, {args.threads} thread(s), model {args.model} {MODELS[args.model]['shape']}, "
          f"fp32, AdamW, {args.steps} profiled steps after {args.warmup}")  # fmt: skip
    results = {impl: profile_impl(args.model, impl, args) for impl in args.impls.split(",")}
    print_tables(results, args.top)


if __name__ == "__main__":
    main()
