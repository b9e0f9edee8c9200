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
import sys
from functools import partial

from _common import (
    LINEAR_BACKENDS,
    add_arguments,
    available,
    check_logits,
    force_linear_backend,
    load_torchvision,
    measure,
    print_ratios,
    print_rows,
    report_gemm_peak,
    run_worker,
    shared_inputs,
    torchvision_stage_key,
    venv_label,
    worker,
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
            load_torchvision(model, official_to_torchvision(state), computed="relative_position_index")
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
            parts = torchvision_stage_key(parts, first=0)
        out[".".join(parts)] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=None, help="interpreter with torchvision (torch 2.14.1)")
    add_arguments(parser, batch=1, img=224, iters=5, warmup=1)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--no-local", action="store_true", help="skip swinlab on this interpreter")
    args = parser.parse_args()
    if args.worker:
        worker(args, build, (3, args.frames, args.img, args.img), num_classes=400, unit="clip")
        return

    tmp = shared_inputs(MODEL, "state_dict", (args.batch, 3, args.frames, args.img, args.img), prefix="bench_vswin_")
    args.weights = str(tmp / "weights.pt")
    run = partial(run_worker, __file__, args=args, forward=("frames",))

    impls = [] if args.no_local else [(sys.executable, "swinlab")]
    if args.peer_python:
        impls += [(args.peer_python, impl) for impl in ("swinlab", "torchvision") if available(args.peer_python, impl)]
    if args.linear_backends:
        own = [(python, impl) for python, impl in impls if impl == "swinlab"]
        impls += [(python, f"swinlab+{b}") for python, _ in own for b in LINEAR_BACKENDS]
    peaks = report_gemm_peak(args.threads)
    diffs = check_logits(run, impls, tmp)
    counted = {venv_label(python, impl): run(python, impl, "flops")["flops_per_clip"] for python, impl in impls}
    # Both count the same function (swinlab's counter includes SDPA's CPU kernel); the largest is used in case an
    # implementation calls an op the counter does not know.
    flops = max(counted.values())
    print("counted GFLOP/clip:", {k: f"{v / 1e9:.2f}" for k, v in counted.items()}, flush=True)
    raw = {"flops_per_clip": flops, "gemm_peak": peaks, "max_abs_logit_diff": diffs}
    measure(run, impls, args, partial(report, flops=flops, peak=max(peaks.values()), args=args, diffs=diffs),
            ("torchvision",), raw)  # fmt: skip


def report(rows: list[dict], flops: float, peak: float, args: argparse.Namespace, diffs: dict) -> None:
    clip = f"{args.batch}x3x{args.frames}x{args.img}x{args.img}"
    print(
        f"\n{MODEL} vs torchvision swin3d_t, clip {clip}, {args.threads} threads, median of {args.iters} after "
        f"{args.warmup} warm-up, {args.rounds} interleaved rounds; {flops / 1e9:.1f} GFLOP/clip forward"
    )
    rate = ("clips/s", lambda r: f"{r['clips_per_s']:.3f}")
    print_rows(rows, flops, peak, args, name=("impl", lambda r: r["label"]), rate=rate)
    for mode in ("infer", "train"):
        for label in sorted({r["label"] for r in rows if r["impl"].startswith("swinlab")}):
            print_ratios(rows, mode, label, ("torchvision",), "clips_per_s", "clips/s")
    print("max |logits - first row's logits| on the shared weights:", {k: f"{v:.2e}" for k, v in diffs.items()})


if __name__ == "__main__":
    main()
