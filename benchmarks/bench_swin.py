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
    worker,
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
            load_torchvision(model, official_to_torchvision(state), computed="relative_")
        return model
    raise ValueError(f"unknown implementation {impl!r}")


def official_to_torchvision(state: dict) -> dict:
    """Official Swin V2 keys -> torchvision's swin_v2_* layout (stages are features.1,3,5,7; merges 2,4,6; the
    patch embedding features.0); the V2 ``q_bias`` / ``v_bias`` become one ``qkv.bias`` with a zero key bias."""
    import torch

    out = {}
    for key, value in state.items():
        if any(s in key for s in ("relative_position_index", "relative_coords_table", "attn_mask")):
            continue
        parts = key.split(".")
        if parts[0] == "patch_embed":
            key = key.replace("patch_embed.proj", "features.0.0").replace("patch_embed.norm", "features.0.2")
        elif parts[0] == "layers":
            key = ".".join(torchvision_stage_key(parts, first=1))
            if key.endswith("attn.q_bias"):
                v_bias = state[".".join([*parts[:-1], "v_bias"])]
                key = key.replace("q_bias", "qkv.bias")
                value = torch.cat([value, torch.zeros_like(value), v_bias])
            elif key.endswith("attn.v_bias"):
                continue
        out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=None, help="interpreter with timm + torchvision (torch 2.14.1)")
    add_arguments(parser, batch=8, img=256, iters=7, warmup=2)
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile'd variants of every implementation"
    )
    parser.add_argument(
        "--freeze",
        action="store_true",
        help="also measure torch.compile(options={'freezing': True}) variants of every implementation (infer only)",
    )
    parser.add_argument("--impls", default="swinlab,timm,torchvision", help="comma-separated subset to run")
    parser.add_argument(
        "--no-local", action="store_true", help="skip swinlab on this interpreter (only the peer interpreter)"
    )
    args = parser.parse_args()
    if args.worker:
        worker(args, build, (3, args.img, args.img), num_classes=1000, unit="img")
        return

    tmp = shared_inputs(MODEL, "model", (args.batch, 3, args.img, args.img), prefix="bench_swin_")
    args.weights = str(tmp / "weights.pt")
    run = partial(run_worker, __file__, args=args)

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

    peaks = report_gemm_peak(args.threads)
    diffs = check_logits(run, impls, tmp)
    flops = run(*impls[0], "flops")["flops_per_img"]
    raw = {"flops_per_sample": flops, "gemm_peak": peaks, "max_abs_logit_diff_vs_swinlab": diffs}
    measure(run, impls, args, partial(report, flops=flops, peak=max(peaks.values()), args=args, diffs=diffs),
            ("timm", "torchvision"), raw)  # fmt: skip


def report(rows: list[dict], flops: float, peak: float, args: argparse.Namespace, diffs: dict) -> None:
    print(
        f"\n{MODEL}, batch {args.batch}, {args.img}x{args.img}, {args.threads} threads, "
        f"median of {args.iters} after {args.warmup} warm-up, {args.rounds} interleaved rounds; "
        f"{flops / 1e9:.2f} GFLOP/sample forward"
    )
    faults = ("page faults/step", lambda r: f"{r['page_faults'] / 1e3:.0f}k")
    first_step = ("first step s", lambda r: f"{r['first_step_s']:.1f}")
    rate = ("img/s", lambda r: f"{r['imgs_per_s']:.2f}")
    print_rows(rows, flops, peak, args, name=("impl", lambda r: r["impl"]), rate=rate, extra=(faults, first_step))
    for variant in ("", "+compile", "+freeze", *(f"+{b}" for b in LINEAR_BACKENDS)):
        peer_variant = variant if variant in ("+compile", "+freeze") else ""  # ablations vs the eager peers
        peers = ("timm" + peer_variant, "torchvision" + peer_variant)
        for mode in ("infer", "train"):
            labels = sorted({r["label"] for r in rows if r["mode"] == mode and r["impl"] == "swinlab" + variant})
            for label in labels:
                print_ratios(rows, mode, label, peers, "imgs_per_s", "img/s")
    print("max |logits - swinlab logits| on the shared weights:", {k: f"{v:.2e}" for k, v in diffs.items()})


if __name__ == "__main__":
    main()
