"""Swin V2 throughput on CPU: swinlab against timm and torchvision, measured in the same run.

Every (implementation, mode) pair runs in its own subprocess so peak RSS is its own. All implementations get the same
official-layout weights (made once from a seeded swinlab model) and the same input; their logits are compared before
timing, so the speed numbers are for models that compute the same function.

timm and torchvision cannot be installed beside the torch 2.13 CPU wheel (see README, "Benchmarks"), so they run in a
second interpreter given by ``--peer-python`` (a venv with torch 2.14.1 + torchvision 0.29.1 + timm; swinlab installed
there with ``pip install --no-deps -e .`` is measured on that torch too, the fairest ratio).

    python benchmarks/bench_swin.py --peer-python /path/to/peerenv/bin/python --threads 2

Protocol: eval()+inference_mode forward ("infer") and train()+forward+cross-entropy+backward+AdamW step ("train"),
``--warmup`` untimed then ``--iters`` timed iterations, median wall time. All rows are repeated ``--rounds`` times
with the implementations interleaved inside each round; the ratios to the faster peer are taken per round (rows
minutes apart) and their median reported, since this shared machine drifts 10-30 % between runs. FLOPs from
swinlab's ``flop_counter`` (FlopCounterMode taught SDPA's CPU kernel) on one forward (train counted as 3x
forward); "busy" is the share of the machine other processes used during the timed loop
(from /proc/stat) — rows with busy above a few percent were disturbed.

``--compile`` adds a ``torch.compile`` (default inductor) variant of *every* implementation, so compiled ratios
compare compiled with compiled; ``--freeze`` adds inference rows compiled with inductor's ``freezing`` (weights as
constants: prepacked oneDNN linears with fused bias/GELU, the position-bias MLP folded away), again for every
implementation. Compilation happens in the first warm-up step, reported as "first step s". "page faults/step" counts
minor faults (first touches of freshly mapped memory; large tensors are mmapped and unmapped by malloc on every
allocation), a cost that is high in this VM and that the eager rows differ in.

``--linear-backends`` adds swinlab rows with its linears forced onto each GEMM backend, ``+mkl`` (torch's default,
MKL on x86) and ``+onednn`` (``swinlab.layers.Linear``'s oneDNN path; by default the weight gradient takes it on
AVX-512 CPUs only): the ablation that shows how much of swinlab's speed is the GEMM backend, on any machine.

``--allocator reuse`` runs every implementation with freed CPU memory kept for reuse (``swinlab.engine.allocator``,
on in ``swinlab train``; the default ``system`` is glibc's fresh ``mmap`` per large block, whose page faults cost
more than some kernels in this VM): a process setting, so it applies to the peers too.

``--optimizer`` picks the AdamW of the training step (``plain``: torch's default for all, the default; ``fused``:
``fused=True`` for all; ``engine``: swinlab's own ``build_optimizer`` for swinlab rows, torch's default for the
peers). ``--impls`` / ``--no-local`` / ``--modes``
restrict the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import (
    ALLOCATORS,
    LINEAR_BACKENDS,
    available,
    force_linear_backend,
    gemm_peak,
    per_round_ratios,
    run_json,
    run_mode,
    save_shared_weights,
    venv_label,
)

MODEL = "swinv2_tiny_window8_256"


def build(impl: str, weights: str | None):
    """Model of ``impl`` (``name`` or ``name+compile``) with the shared official-layout weights loaded."""
    import torch

    name, _, variant = impl.partition("+")
    model = _build_eager(name, weights)
    if variant == "compile":
        return torch.compile(model)
    if variant in LINEAR_BACKENDS:  # ablation: the same model with its linears forced onto one GEMM backend
        force_linear_backend(variant)
        return model
    if variant == "freeze":  # inference only: weights become constants, linears prepacked, biases/GELU fused
        return torch.compile(model, options={"freezing": True})
    return model


def _build_eager(impl: str, weights: str | None):
    import torch

    if impl == "swinlab":
        from swinlab import create_model
        from swinlab.models.checkpoints import load_official

        model = create_model(MODEL)
        if weights:
            load_official(model, weights)
        return model
    state = torch.load(weights, map_location="cpu", weights_only=True) if weights else None
    state = state.get("model", state) if state is not None else None  # official files wrap it in "model"
    if impl == "timm":
        import timm
        from timm.models.swin_transformer_v2 import checkpoint_filter_fn

        model = timm.create_model(MODEL)
        if state is not None:
            model.load_state_dict(checkpoint_filter_fn(state, model))
        return model
    if impl == "torchvision":
        import torchvision

        model = torchvision.models.swin_v2_t()
        if state is not None:
            missing, unexpected = model.load_state_dict(official_to_torchvision(state), strict=False)
            missing = [k for k in missing if "relative_" not in k]
            if missing or unexpected:
                raise RuntimeError(f"torchvision key map incomplete: {missing[:5]} {unexpected[:5]}")
        return model
    raise ValueError(f"unknown implementation {impl!r}")


def official_to_torchvision(state: dict) -> dict:
    """Official Swin V2 keys -> torchvision's swin_v2_* layout (stages are features.1,3,5,7; merges 2,4,6)."""
    import torch

    out = {}
    for key, value in state.items():
        if any(s in key for s in ("relative_position_index", "relative_coords_table", "attn_mask")):
            continue
        parts = key.split(".")
        if parts[0] == "patch_embed":
            key = key.replace("patch_embed.proj", "features.0.0").replace("patch_embed.norm", "features.0.2")
        elif parts[0] == "layers":
            stage = int(parts[1])
            if parts[2] == "downsample":
                key = ".".join(["features", str(2 * stage + 2), *parts[3:]])
            else:
                # layers.i.blocks.j.<rest> -> features.(2i+1).j.<rest>
                rest = ".".join(parts[4:]).replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.3")
                key = f"features.{2 * stage + 1}.{parts[3]}.{rest}"
                if key.endswith("attn.q_bias"):
                    v_bias = state[".".join([*parts[:-1], "v_bias"])]
                    key = key.replace("q_bias", "qkv.bias")
                    value = torch.cat([value, torch.zeros_like(value), v_bias])
                elif key.endswith("attn.v_bias"):
                    continue
        out[key] = value
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    model = build(args.impl, args.weights)
    result: dict = {"impl": args.impl, "mode": args.mode, "torch": torch.__version__}
    x = torch.randn(args.batch, 3, args.img, args.img)
    measured = run_mode(model, x, args, num_classes=1000, unit="img")
    if measured is not None:
        print(json.dumps({**result, **measured}))


def run_worker(python: str, impl: str, mode: str, args: argparse.Namespace, **extra) -> dict | None:
    cmd = [
        python,
        __file__,
        "--worker",
        "--impl",
        impl,
        "--mode",
        mode,
        "--threads",
        str(args.threads),
        "--batch",
        str(args.batch),
        "--img",
        str(args.img),
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--weights",
        args.weights,
        "--optimizer",
        args.optimizer,
        "--allocator",
        args.allocator,
    ]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    return run_json(cmd, args.threads, f"{impl}/{mode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=None, help="interpreter with timm + torchvision (torch 2.14.1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img", type=int, default=256)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="repeat all rows, interleaved, this many times")
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile'd variants of every implementation"
    )
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="also measure torch.compile(options={'freezing': True}) variants of every implementation (infer only)",
    )
    parser.add_argument(
        "--linear-backends",
        action="store_true",
        help="also measure swinlab with its linears forced onto MKL (+mkl) and onto oneDNN (+onednn): the ablation",
    )
    parser.add_argument("--impls", default="swinlab,timm,torchvision", help="comma-separated subset to run")
    parser.add_argument(
        "--no-local", action="store_true", help="skip swinlab on this interpreter (only the peer interpreter)"
    )
    parser.add_argument("--modes", default="infer,train", help="comma-separated subset of infer,train")
    parser.add_argument("--optimizer", choices=("plain", "fused", "engine"), default="plain")
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="system", help="CPU allocator setting of every implementation"
    )
    parser.add_argument("--json", default=None, help="write all raw results here")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_swin_"))
    args.weights = str(tmp / "weights.pt")
    save_shared_weights(MODEL, args.weights, key="model")
    # full batch, so a compiled model's check and timing runs share one graph (and inductor's on-disk cache)
    torch.save(torch.randn(args.batch, 3, args.img, args.img), tmp / "input.pt")

    names = args.impls.split(",")
    variants = [""] + ["+compile"] * args.compile + ["+freeze"] * args.freeze
    impls = []
    own = [f"+{b}" for b in LINEAR_BACKENDS] * args.linear_backends  # swinlab-only variants
    if "swinlab" in names and not args.no_local:
        impls += [(sys.executable, "swinlab" + v) for v in variants + own]
    if args.peer_python:
        for impl in names:
            if available(args.peer_python, impl):
                impls += [(args.peer_python, impl + v) for v in variants + (own if impl == "swinlab" else [])]
            else:
                print(f"  {impl} not importable with {args.peer_python}; skipped", file=sys.stderr)

    print(f"fp32 GEMM peak ({args.threads} threads): ", end="", flush=True)
    peaks = gemm_peak(args.threads)
    peak = max(peaks.values())
    print(", ".join(f"{name} {value:.0f}" for name, value in peaks.items()) + " GFLOP/s")
    outputs = {}
    flops = None
    for python, impl in impls:
        out = tmp / f"{impl}-{Path(python).parent.parent.name}.pt"
        run_worker(python, impl, "check", args, input=tmp / "input.pt", output=out)
        if out.exists():
            outputs[venv_label(python, impl)] = torch.load(out, weights_only=True)
        if flops is None:
            flops = run_worker(python, impl, "flops", args)["flops_per_img"]
    rows = []
    for rnd in range(args.rounds):
        for mode in args.modes.split(","):
            for python, impl in impls:
                if mode == "train" and impl.endswith("+freeze"):
                    continue
                print(f"  round {rnd + 1}/{args.rounds} {mode:<5} {venv_label(python, impl)}", flush=True)
                res = run_worker(python, impl, mode, args)
                if res:
                    rows.append({**res, "round": rnd, "label": venv_label(python, impl)})
    base = outputs[venv_label(*impls[0])]
    diffs = {label: float((o - base).abs().max()) for label, o in outputs.items()}
    report(rows, flops, peak, args, diffs)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rows": rows, "flops_per_sample": flops, "gemm_peak": peaks, "max_abs_logit_diff_vs_swinlab": diffs},
                indent=1,
            )
        )


def report(rows: list[dict], flops: float, peak: float, args: argparse.Namespace, diffs: dict) -> None:
    print(
        f"\n{MODEL}, batch {args.batch}, {args.img}x{args.img}, {args.threads} threads, "
        f"median of {args.iters} after {args.warmup} warm-up, {args.rounds} interleaved rounds; "
        f"{flops / 1e9:.2f} GFLOP/sample forward"
    )
    print(
        "| round | impl | torch | mode | img/s | median ms | GFLOP/s | % of GEMM peak | peak RSS MiB "
        "| page faults/step | first step s | busy* |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        work = flops * args.batch * (3 if r["mode"] == "train" else 1)
        gflops = work / r["median_s"] / 1e9
        print(
            f"| {r['round'] + 1} | {r['impl']} | {r['torch']} | {r['mode']} | {r['imgs_per_s']:.2f} | "
            f"{r['median_s'] * 1e3:.0f} | "
            f"{gflops:.0f} | {100 * gflops / peak:.0f}% | {r['peak_rss_mib']:.0f} | {r['page_faults'] / 1e3:.0f}k | "
            f"{r['first_step_s']:.1f} | {100 * r['busy_others']:.0f}% |"
        )
    print(f"training step optimizer: {args.optimizer} (see _common.make_optimizer); allocator: {args.allocator}")
    for variant in ("", "+compile", "+freeze", *(f"+{b}" for b in LINEAR_BACKENDS)):
        peer_variant = variant if variant in ("+compile", "+freeze") else ""  # ablations vs the eager peers
        peers = ("timm" + peer_variant, "torchvision" + peer_variant)
        for mode in ("infer", "train"):
            labels = sorted({r["label"] for r in rows if r["mode"] == mode and r["impl"] == "swinlab" + variant})
            for label in labels:
                speed, memory = per_round_ratios(rows, mode, label, peers, "imgs_per_s")
                if speed:
                    print(
                        f"{mode}: {label} / faster of {' and '.join(peers)}: img/s ratio per round "
                        f"{', '.join(f'{v:.2f}' for v in speed)} (median {statistics.median(speed):.2f}x); "
                        f"peak RSS ratio median {statistics.median(memory):.2f}x"
                    )
    print("max |logits - swinlab logits| on the shared weights:", {k: f"{v:.2e}" for k, v in diffs.items()})


if __name__ == "__main__":
    main()
