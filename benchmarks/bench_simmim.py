"""SimMIM pre-training step on CPU: swinlab's ``SimMIM`` against transformers' ``Swinv2ForMaskedImageModeling``,
measured in the same run, interleaved (issue 14 §4).

Configuration (both implementations): the SwinV2-T encoder (embed 96, depths 2-2-6-2, heads 3-6-12-24, patch 4, MLP
ratio 4, q/v biases), window 12 at every stage (clamped to the grid where the grid is smaller: at 192 px stage 3's
12x12 grid is one unshifted window, stage 4's 6x6 grid has window 6 and no shift, in both), no pretrained windows,
encoder stride 32, 1x1-conv + PixelShuffle decoder; dropout, attention dropout and drop path 0; **target
normalisation off** for both (transformers' MIM head has none: its loss is the official L1 on raw pixels, which
swinlab computes with ``norm_target=False``). Images 192x192, batch 8, fp32. transformers' attention is its default
and only Swinv2 path, ``eager`` (hand-written matmul + softmax; Swinv2 declares no SDPA support in transformers
5.25, and the worker checks that this is what it got); swinlab uses its own (SDPA-based) attention.

Same weights, same input, same mask: the parent makes a seeded swinlab SimMIM (norm weights, mask token and all
non-trivial) and saves it in the official layout; the transformers worker loads it through
:func:`official_to_transformers`, the inverse, key by key, of ``swinlab.models.hf_keys`` (checked by converting back
with ``hf_to_official``); the mask is one batch of ``swinlab.pretrain.simmim.MaskGenerator`` (mask patch 32, ratio
0.6, seeded), given to swinlab as ``(B, H/4, W/4)`` and to transformers as ``bool_masked_pos`` flattened to
``(B, N)``. Before any timing every implementation's loss and reconstruction on the shared input are compared with
the first row's; the run stops if the loss differs by more than 1e-5 relative or the reconstruction by more than
3e-4 absolute (issue 14's parity tolerances).

transformers is a benchmark-only dependency (the ``hf`` extra, for tests and this script): it runs in the
interpreter given by ``--peer-python`` (a venv with torch 2.14.1 and transformers, swinlab installed there with
``pip install --no-deps -e .``), where swinlab is measured as well, on the same torch: the fair ratio. The full
measurement, from the dev venv:

    python benchmarks/bench_simmim.py --peer-python /work/peerenv/bin/python --no-local --threads 2

Protocol (as ``bench_swin.py``, helpers in ``_common.py``): every (implementation, mode) in its own subprocess (its
own peak RSS, which includes what its imports cost: transformers for the transformers rows); "train" = train() +
each library's own training call + backward + AdamW step (``--optimizer plain``: torch's default AdamW for both):
transformers' forward decodes every cell of the image and returns the masked L1 loss with the reconstruction,
swinlab's ``model(x, mask)`` (what the engine's SimMIM task calls) decodes only the cells with masked pixels and
returns the loss; "infer" = eval() + ``inference_mode`` forward with the mask (transformers computes the loss
whenever it is given a mask, so both compute reconstruction and loss); ``--warmup`` untimed and ``--iters`` timed
steps, median. All rows are repeated ``--rounds`` times with the implementations interleaved inside each round; the
ratios are taken per round and their median reported. "busy" is the share of the machine other processes used during
the timed loop (rows above a few percent were disturbed); "page faults/step" counts minor faults. FLOPs from
``swinlab.metrics.flops.flop_counter`` on one forward of the first row's implementation; train counted as 3x
forward. ``--img`` must be a multiple of 32 whose every stage grid the window divides or covers (transformers pads
other grids with zero tokens that it attends, swinlab masks them: different functions), e.g. 96 for a quick check.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

from _common import (
    LINEAR_BACKENDS,
    add_arguments,
    available,
    check_logits,
    force_linear_backend,
    measure,
    perturb_norms,
    print_ratios,
    print_rows,
    report_gemm_peak,
    run_worker,
    shared_inputs,
    worker,
)

ENCODER = dict(
    patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=12,
    mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
    pretrained_window_sizes=(0, 0, 0, 0),
)  # fmt: skip
"""The SwinV2-T encoder as kwargs of the official ``SwinTransformerV2ForSimMIM`` (``img_size`` from ``--img``)."""
ENCODER_STRIDE, MASK_PATCH, MASK_RATIO = 32, 32, 0.6
LOSS_RTOL, RECONSTRUCTION_ATOL = 1e-5, 3e-4
"""The equality gate before timing: loss relative difference, reconstruction largest absolute difference."""


def encoder_kwargs(img: int) -> dict:
    return {"img_size": img, **ENCODER}


def check_size(img: int) -> None:
    """``img`` must be a multiple of the encoder stride and of the mask patch, and the window must divide every
    stage's grid or cover it (clamped): otherwise transformers pads and the two compute different functions."""
    if img % ENCODER_STRIDE or img % MASK_PATCH:
        raise SystemExit(f"--img {img} is not a multiple of the encoder stride / mask patch {ENCODER_STRIDE}")
    grids = [img // ENCODER["patch_size"] // 2**i for i in range(len(ENCODER["depths"]))]
    window = ENCODER["window_size"]
    bad = [g for g in grids if g > window and g % window]
    if bad:
        raise SystemExit(
            f"--img {img}: stage grids {grids}, window {window} divides neither {bad} nor covers them; transformers "
            "would pad there (zero tokens attended as keys) and swinlab mask: not the same function. Try 96 or 192."
        )


def adapter(impl: str, model, mask):
    """``model`` (swinlab ``SimMIM`` or transformers ``Swinv2ForMaskedImageModeling``) as a module whose forward
    takes images only and returns ``(loss, reconstruction)`` for the shared ``mask`` ``(B, H/4, W/4)`` (its first
    ``len(x)`` entries), given in the form the implementation takes. In training mode each runs the call its own
    training makes: transformers' forward (which always decodes the whole image), swinlab's ``model(x, mask)``
    (the loss alone, as the engine's SimMIM task calls it; reconstruction ``None``)."""
    from torch import nn

    class MaskedImageModeling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.impl, self.model = impl, model
            form = mask.flatten(1).bool() if impl == "transformers" else mask.long()
            self.register_buffer("mask", form, persistent=False)

        def forward(self, x):
            mask = self.mask[: x.shape[0]]
            if self.impl == "transformers":
                out = self.model(x, bool_masked_pos=mask)
                return out.loss, out.reconstruction
            if self.training:  # the engine's training call: the loss alone, decoding the masked cells only
                return self.model(x, mask), None
            return self.model.loss_and_reconstruction(x, mask)

        # what swinlab's build_optimizer reads (--optimizer engine), under this wrapper's "model." prefix
        def no_weight_decay(self) -> set[str]:
            names = getattr(self.model, "no_weight_decay", set)()
            return {f"model.{name}" for name in names}

        def no_weight_decay_keywords(self) -> set[str]:
            return set(getattr(self.model, "no_weight_decay_keywords", set)())

    return MaskedImageModeling()


def build(impl: str, weights: str | None, *, img: int, mask: str):
    """``impl`` (``swinlab``, ``swinlab+<backend>``, ``transformers``) with the shared official-layout SimMIM
    weights and the shared mask, wrapped by :func:`adapter`."""
    import torch

    name, _, backend = impl.partition("+")
    if backend:
        force_linear_backend(backend)
    state = torch.load(weights, map_location="cpu", weights_only=True)["model"] if weights else None
    if name == "swinlab":
        from swinlab.models.checkpoints import load_official
        from swinlab.pretrain.simmim import SimMIM

        model = SimMIM.from_official(encoder_kwargs(img), {"encoder_stride": ENCODER_STRIDE})
        if state is not None:
            load_official(model, state, strict=True)
    elif name == "transformers":
        model = build_transformers(img, state)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    del state
    return adapter(name, model, torch.load(mask, weights_only=True))


def build_transformers(img: int, state: dict | None):
    """transformers' ``Swinv2ForMaskedImageModeling`` with the configuration of :data:`ENCODER` (checked with
    ``hf_config_to_kwargs``, the project's reading of a ``Swinv2Config``) and the official ``state`` loaded."""
    import transformers

    from swinlab.models.hf_keys import hf_config_to_kwargs

    e = ENCODER
    config = transformers.Swinv2Config(
        image_size=img, patch_size=e["patch_size"], num_channels=e["in_chans"], embed_dim=e["embed_dim"],
        depths=list(e["depths"]), num_heads=list(e["num_heads"]), window_size=e["window_size"],
        mlp_ratio=e["mlp_ratio"], qkv_bias=e["qkv_bias"], hidden_dropout_prob=e["drop_rate"],
        attention_probs_dropout_prob=e["attn_drop_rate"], drop_path_rate=e["drop_path_rate"],
        pretrained_window_sizes=list(e["pretrained_window_sizes"]), encoder_stride=ENCODER_STRIDE,
    )  # fmt: skip
    if hf_config_to_kwargs(config) != {**encoder_kwargs(img), "num_classes": 0}:
        raise RuntimeError(f"Swinv2Config differs from the swinlab encoder: {hf_config_to_kwargs(config)}")
    model = transformers.Swinv2ForMaskedImageModeling(config)
    if model.config._attn_implementation != "eager":  # the module docstring says which attention is measured
        raise RuntimeError(f"transformers chose attention {model.config._attn_implementation!r}, not 'eager'")
    if state is not None:
        model.load_state_dict(official_to_transformers(state, model.state_dict()), strict=True)
    return model


def official_to_transformers(state: dict, hf_state: dict) -> dict:
    """The official SimMIM ``state`` in the layout of transformers' ``hf_state`` (its model's state dict): each
    transformers key's official name from ``swinlab.models.hf_keys.hf_key_to_official`` (the project's one mapping
    table, inverted key by key), the fused ``qkv.weight`` split into ``query`` / ``key`` / ``value`` rows. Checked:
    every official parameter is used, and ``hf_to_official`` of the result gives ``state`` back exactly."""
    import torch

    from swinlab.models.hf_keys import hf_key_to_official, hf_to_official

    out = {}
    for name in hf_state:
        official = hf_key_to_official(name)
        official = official if official.startswith("decoder.") else "encoder." + official
        head, _, leaf = official.rpartition("attn.")
        projections = ("query", "key", "value")
        if leaf.endswith(".weight") and leaf[: -len(".weight")] in projections:
            out[name] = state[head + "attn.qkv.weight"].chunk(3)[projections.index(leaf[: -len(".weight")])]
        else:
            out[name] = state[official]
    back = hf_to_official(out)
    derived = ("relative_position_index", "relative_coords_table", "attn_mask")
    unused = [k for k in state if k not in back and not k.endswith(derived)]
    wrong = [k for k, v in back.items() if not torch.equal(v, state[k])]
    if unused or wrong:
        raise RuntimeError(f"official -> transformers mapping incomplete: unused {unused[:5]}, differ {wrong[:5]}")
    return out


def compare(out: tuple, base: tuple) -> dict[str, float]:
    """The equality gate's numbers: loss relative difference, reconstruction largest absolute difference, and the
    reconstruction's size (a comparison of near-zero tensors would prove nothing)."""
    (loss, reconstruction), (base_loss, base_reconstruction) = out, base
    return {
        "loss": float(loss),
        "loss_rel": float((loss - base_loss).abs() / base_loss.abs()),
        "recon_max_abs": float((reconstruction - base_reconstruction).abs().max()),
        "recon_scale": float(base_reconstruction.abs().max()),
    }


def make_shared(args: argparse.Namespace) -> Path:
    """The temporary folder of the run: ``weights.pt`` (a seeded swinlab SimMIM in the official layout, norms
    and mask token non-trivial), ``input.pt`` (the batch of the check) and ``mask.pt`` (one seeded batch of the
    official mask generator)."""
    import torch

    from swinlab.pretrain.simmim import MaskGenerator, SimMIM

    torch.manual_seed(0)
    model = SimMIM.from_official(encoder_kwargs(args.img), {"encoder_stride": ENCODER_STRIDE})
    with torch.no_grad():
        model.encoder.mask_token.normal_()
    perturb_norms(model)
    tmp = shared_inputs(model, "model", (args.batch, 3, args.img, args.img), prefix="bench_simmim_")
    generator = MaskGenerator(args.img, MASK_PATCH, ENCODER["patch_size"], MASK_RATIO)
    torch.save(generator(args.batch, generator=torch.Generator().manual_seed(0)), tmp / "mask.pt")
    return tmp


def version(python: str, module: str) -> str:
    proc = subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"], capture_output=True)
    return proc.stdout.decode().strip() or "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=None, help="interpreter with transformers (torch 2.14.1)")
    add_arguments(parser, batch=8, img=192, iters=7, warmup=2)
    parser.add_argument("--impls", default="swinlab,transformers", help="comma-separated subset to run")
    parser.add_argument(
        "--no-local", action="store_true", help="skip this interpreter (only the peer interpreter's rows)"
    )
    parser.add_argument("--check-only", action="store_true", help="stop after the equality gate (no timing)")
    parser.add_argument("--mask", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_size(args.img)
    if args.worker:
        import torch

        def criterion(out: tuple) -> torch.Tensor:
            return out[0]

        build_impl = partial(build, img=args.img, mask=args.mask)
        worker(args, build_impl, (3, args.img, args.img), num_classes=0, unit="img", criterion=criterion)
        return

    tmp = make_shared(args)
    args.weights, args.mask = str(tmp / "weights.pt"), str(tmp / "mask.pt")
    run = partial(run_worker, __file__, args=args, forward=("mask",))

    names = args.impls.split(",")
    pythons = ([] if args.no_local else [sys.executable]) + ([args.peer_python] if args.peer_python else [])
    impls = []
    for python in pythons:
        for impl in names:
            if available(python, impl):
                own = [f"+{b}" for b in LINEAR_BACKENDS] * (args.linear_backends and impl == "swinlab")
                impls += [(python, impl + v) for v in ["", *own]]
            else:
                print(f"  {impl} not importable with {python}; skipped", file=sys.stderr)
    if not impls:
        raise SystemExit("nothing to measure")
    print("transformers:", {python: version(python, "transformers") for python in pythons})

    peaks = report_gemm_peak(args.threads)
    checks = check_logits(run, impls, tmp, compare=compare)
    print("equality gate (vs the first row):", json.dumps(checks))
    failed = [k for k, c in checks.items() if c["loss_rel"] > LOSS_RTOL or c["recon_max_abs"] > RECONSTRUCTION_ATOL]
    if failed or len(checks) < len(impls):
        raise SystemExit(f"equality gate failed (or a check did not run): {failed or 'see above'}; no timing")
    if args.check_only:
        return
    flops = run(*impls[0], "flops")["flops_per_img"]
    raw = {"flops_per_sample": flops, "gemm_peak": peaks, "equality_gate": checks}
    measure(run, impls, args, partial(report, flops=flops, peak=max(peaks.values()), args=args, checks=checks),
            ("transformers",), raw)  # fmt: skip


def report(rows: list[dict], flops: float, peak: float, args: argparse.Namespace, checks: dict) -> None:
    print(
        f"\nSimMIM SwinV2-T (window 12, mask patch {MASK_PATCH}, ratio {MASK_RATIO}, no target normalisation), "
        f"batch {args.batch}, {args.img}x{args.img}, {args.threads} threads, median of {args.iters} after "
        f"{args.warmup} warm-up, {args.rounds} interleaved rounds; {flops / 1e9:.2f} GFLOP/sample forward; "
        "transformers attention: eager"
    )
    faults = ("page faults/step", lambda r: f"{r['page_faults'] / 1e3:.0f}k")
    rate = ("img/s", lambda r: f"{r['imgs_per_s']:.2f}")
    print_rows(rows, flops, peak, args, name=("impl", lambda r: r["label"]), rate=rate, extra=(faults,))
    for mode in ("infer", "train"):
        for label in sorted({r["label"] for r in rows if r["impl"].startswith("swinlab")}):
            # against transformers on the same interpreter (same torch; the venvs' baseline RSS differs by 100s of MiB)
            venv = label[label.rindex(" (") :]
            same = [r for r in rows if r["label"].endswith(venv)]
            print_ratios(same, mode, label, ("transformers",), "imgs_per_s", "img/s")
    gate = {k: f"loss rel {c['loss_rel']:.1e}, recon max abs {c['recon_max_abs']:.1e}" for k, c in checks.items()}
    print(f"equality gate vs the first row (recon scale {next(iter(checks.values()))['recon_scale']:.2f}):", gate)


if __name__ == "__main__":
    main()
