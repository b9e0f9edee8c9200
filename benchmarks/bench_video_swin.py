"""Video Swin-T throughput on CPU: swinlab's ``video_swin_tiny`` against torchvision's ``swin3d_t``, measured in the
same run, interleaved.

Both load the same weights (a seeded swinlab model with non-trivial norms, mapped to torchvision's key layout) and
get the same clip; their logits are compared before timing. torchvision cannot be installed beside the torch 2.13 CPU
wheel, so it runs in a second interpreter (``--peer-python``, a venv with torch 2.14.1 + torchvision 0.29.1 and
swinlab installed ``--no-deps``); swinlab is measured on both torches, the same-torch row being the fair ratio.

    python benchmarks/bench_video_swin.py --peer-python /work/peerenv/bin/python --threads 2

Protocol (as ``bench_swin.py``, helpers in ``_common.py``): every (implementation, mode) in its own subprocess;
"infer" = eval() + inference_mode forward, "train" = train() + forward + cross entropy + backward + AdamW step;
``--warmup`` untimed and ``--iters`` timed steps, median. The machine is shared, so the whole set of rows is repeated
``--rounds`` times with the implementations interleaved inside each round, and the ratios are taken per round (rows
measured minutes apart on a busy machine are not comparable); ``--alternate`` adds a run of both in one peer
process, alternating single steps, whose per-pair ratios are the most robust to a machine whose load changes by the
second. Default clip 1x3x8x224x224: 224 px keeps every
stage's spatial grid at least one 7x7 window, so both implementations compute the same function (the official
relative-position slicing that torchvision copies is wrong only when a spatial axis is clamped); 8 frames (4 temporal
tokens, the temporal window clamped from 8 to 4) halves the cost of the paper's 16-32 frames. FLOPs from
``swinlab.metrics.flops.flop_counter`` (FlopCounterMode taught SDPA's CPU kernel) on one forward of each
implementation, the largest used; train counted as 3x forward. ``--allocator reuse`` applies
``swinlab.engine.allocator.reuse_freed_memory`` to every implementation (see ``bench_swin.py``).
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
    make_step,
    measure_steps,
    per_round_ratios,
    run_json,
    run_mode,
    save_shared_weights,
    use_allocator,
    venv_label,
)

MODEL = "video_swin_tiny"


def build(impl: str, weights: str | None):
    """``impl`` (``swinlab``, ``swinlab+mkl``, ``swinlab+onednn`` or ``torchvision``) with the shared weights
    (official recognizer layout) loaded; ``swinlab+<backend>`` is the ablation with every swinlab linear GEMM on
    that backend."""
    import torch

    impl, _, backend = impl.partition("+")
    if backend:
        force_linear_backend(backend)
    if impl == "swinlab":
        from swinlab import create_model
        from swinlab.models.video_checkpoints import load_official_video

        model = create_model(MODEL)
        if weights:
            load_official_video(model, weights, strict=True)
        return model
    if impl == "torchvision":
        import torchvision

        model = torchvision.models.video.swin3d_t()
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)["state_dict"]
            missing, unexpected = model.load_state_dict(official_to_torchvision(state), strict=False)
            missing = [k for k in missing if not k.endswith("relative_position_index")]
            if missing or unexpected:
                raise RuntimeError(f"torchvision key map incomplete: {missing[:5]} {unexpected[:5]}")
        return model
    raise ValueError(f"unknown implementation {impl!r}")


def official_to_torchvision(state: dict) -> dict:
    """Official Video Swin recognizer keys -> torchvision's ``swin3d_*`` layout: stages are ``features.0,2,4,6``,
    patch merging ``features.1,3,5``, the MLP's ``fc1`` / ``fc2`` are ``mlp.0`` / ``mlp.3``, the head is ``head``."""
    out = {}
    for key, value in state.items():
        if key.startswith("cls_head.fc_cls."):
            out["head." + key.rsplit(".", 1)[1]] = value
            continue
        parts = key.removeprefix("backbone.").split(".")
        if parts[0] == "layers":
            stage = int(parts[1])
            if parts[2] == "downsample":
                parts = ["features", str(2 * stage + 1), *parts[3:]]
            else:  # layers.i.blocks.j.<rest>
                rest = ".".join(parts[4:]).replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.3")
                parts = ["features", str(2 * stage), parts[3], rest]
        out[".".join(parts)] = value
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    model = build(args.impl, args.weights)
    result: dict = {"impl": args.impl, "mode": args.mode, "torch": torch.__version__, "round": args.round}
    x = torch.randn(args.batch, 3, args.frames, args.img, args.img)
    measured = run_mode(model, x, args, num_classes=400, unit="clip")
    if measured is not None:
        print(json.dumps({**result, **measured}))


def alternate(args: argparse.Namespace) -> None:
    """Both implementations in one process (the peer interpreter), one step of each in turn: a busy machine
    changes speed from one second to the next, so steps taken side by side are the comparable ones. Prints the
    per-pair clips/s ratios swinlab / torchvision (no per-implementation peak memory in this mode)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    use_allocator(args.allocator)
    x = torch.randn(args.batch, 3, args.frames, args.img, args.img)
    steps = {
        impl: make_step(build(impl, args.weights), x, args.mode, impl, args.optimizer, num_classes=400)
        for impl in ("swinlab", "torchvision")
    }
    times = {impl: [] for impl in steps}
    for i in range(args.warmup + args.iters):
        for impl in (("swinlab", "torchvision") if i % 2 == 0 else ("torchvision", "swinlab")):
            seconds = measure_steps(steps[impl], 0, 1)["median_s"]
            if i >= args.warmup:
                times[impl].append(seconds)
    ratios = [t / s for s, t in zip(times["swinlab"], times["torchvision"], strict=True)]
    print(json.dumps({"mode": args.mode, "torch": torch.__version__, "times": times, "ratios": ratios}))


def run_worker(python: str, impl: str, mode: str, args: argparse.Namespace, **extra) -> dict | None:
    cmd = [python, __file__, "--worker", "--impl", impl, "--mode", mode, "--weights", args.weights]
    for key in ("threads", "batch", "frames", "img", "iters", "warmup", "optimizer", "allocator"):
        cmd += [f"--{key}", str(getattr(args, key))]
    for key, value in extra.items():
        cmd += [f"--{key}", str(value)]
    return run_json(cmd, args.threads, f"{impl}/{mode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=None, help="interpreter with torchvision (torch 2.14.1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="repeat all rows, interleaved, this many times")
    parser.add_argument("--modes", default="infer,train", help="comma-separated subset of infer,train")
    parser.add_argument("--no-local", action="store_true", help="skip swinlab on this interpreter")
    parser.add_argument(
        "--linear-backends",
        action="store_true",
        help="also measure swinlab with its linears forced onto MKL (+mkl) and onto oneDNN (+onednn): the ablation",
    )
    parser.add_argument("--optimizer", choices=("plain", "fused", "engine"), default="plain")
    parser.add_argument(
        "--allocator", choices=ALLOCATORS, default="system", help="CPU allocator setting of every implementation"
    )
    parser.add_argument("--json", default=None, help="write all raw results here")
    parser.add_argument(
        "--alternate", action="store_true", help="also run both in one peer process, alternating steps (see alternate)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        (alternate if args.impl == "alternate" else worker)(args)
        return

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="bench_vswin_"))
    args.weights = str(tmp / "weights.pt")
    save_shared_weights(MODEL, args.weights, key="state_dict")
    torch.save(torch.randn(args.batch, 3, args.frames, args.img, args.img), tmp / "input.pt")

    impls = [] if args.no_local else [(sys.executable, "swinlab")]
    if args.peer_python:
        impls += [(args.peer_python, impl) for impl in ("swinlab", "torchvision") if available(args.peer_python, impl)]
    if args.linear_backends:
        own = [(python, impl) for python, impl in impls if impl == "swinlab"]
        impls += [(python, f"swinlab+{b}") for python, _ in own for b in LINEAR_BACKENDS]
    print(f"fp32 GEMM peak ({args.threads} threads): ", end="", flush=True)
    peaks = gemm_peak(args.threads)
    peak = max(peaks.values())
    print(", ".join(f"{name} {value:.0f}" for name, value in peaks.items()) + " GFLOP/s", flush=True)
    outputs, counted = {}, {}
    for python, impl in impls:
        out = tmp / f"{impl}-{Path(python).parent.parent.name}.pt"
        run_worker(python, impl, "check", args, input=tmp / "input.pt", output=out)
        if out.exists():
            outputs[venv_label(python, impl)] = torch.load(out, weights_only=True)
        counted[venv_label(python, impl)] = run_worker(python, impl, "flops", args)["flops_per_clip"]
    # Both count the same function (swinlab's counter includes SDPA's CPU kernel); the largest is used in case an
    # implementation calls an op the counter does not know.
    flops = max(counted.values())
    print("counted GFLOP/clip:", {k: f"{v / 1e9:.2f}" for k, v in counted.items()}, flush=True)
    base = next(iter(outputs.values()))
    diffs = {label: float((o - base).abs().max()) for label, o in outputs.items()}
    rows = []
    for r in range(args.rounds):
        for mode in args.modes.split(","):
            for python, impl in impls:
                print(f"  round {r + 1}/{args.rounds} {mode:<5} {venv_label(python, impl)}", flush=True)
                res = run_worker(python, impl, mode, args, round=r)
                if res:
                    res["label"] = venv_label(python, impl)
                    rows.append(res)
    if args.alternate and args.peer_python:
        for mode in args.modes.split(","):
            res = run_worker(args.peer_python, "alternate", mode, args)
            if res:
                rows.append(res)
                ratios = ", ".join(f"{r:.2f}" for r in res["ratios"])
                print(f"{mode}, alternating steps in one process (torch {res['torch']}): swinlab / torchvision "
                      f"clips/s per step pair {ratios} (median {statistics.median(res['ratios']):.2f}x)")  # fmt: skip
    report([r for r in rows if "impl" in r], flops, peak, args, diffs)
    if args.json:
        raw = {"rows": rows, "flops_per_clip": flops, "gemm_peak": peaks, "max_abs_logit_diff": diffs}
        Path(args.json).write_text(json.dumps(raw, indent=1))


def report(rows: list[dict], flops: float, peak: float, args: argparse.Namespace, diffs: dict) -> None:
    clip = f"{args.batch}x3x{args.frames}x{args.img}x{args.img}"
    print(
        f"\n{MODEL} vs torchvision swin3d_t, clip {clip}, {args.threads} threads, median of {args.iters} after "
        f"{args.warmup} warm-up, {args.rounds} interleaved rounds; {flops / 1e9:.1f} GFLOP/clip forward"
    )
    print("| round | impl | torch | mode | clips/s | median ms | GFLOP/s | % of GEMM peak | peak RSS MiB | busy* |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        work = flops * args.batch * (3 if r["mode"] == "train" else 1)
        gflops = work / r["median_s"] / 1e9
        print(
            f"| {r['round'] + 1} | {r['label']} | {r['torch']} | {r['mode']} | {r['clips_per_s']:.3f} | "
            f"{r['median_s'] * 1e3:.0f} | {gflops:.0f} | {100 * gflops / peak:.0f}% | {r['peak_rss_mib']:.0f} | "
            f"{100 * r['busy_others']:.0f}% |"
        )
    print(f"training step optimizer: {args.optimizer} (see _common.make_optimizer); allocator: {args.allocator}")
    for mode in ("infer", "train"):
        for label in sorted({r["label"] for r in rows if r["impl"].startswith("swinlab")}):
            speed, memory = per_round_ratios(rows, mode, label, ("torchvision",), "clips_per_s")
            if speed:
                print(
                    f"{mode}: {label} / torchvision: clips/s ratio per round {', '.join(f'{s:.2f}' for s in speed)} "
                    f"(median {statistics.median(speed):.2f}x); peak RSS ratio median {statistics.median(memory):.2f}x"
                )
    print("max |logits - first row's logits| on the shared weights:", {k: f"{v:.2e}" for k, v in diffs.items()})


if __name__ == "__main__":
    main()
