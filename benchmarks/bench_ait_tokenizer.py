"""AiT tokenizer speed on CPU (issue 16 §5): training-step images/s and encode (inference) token ids/s of the official
tokenizer sizes, ``ait_depth_vqvae`` (480x480 depth -> 15x15 tokens, 128 codes of 512 dims, width 16) and
``ait_insseg_vqvae`` (64x64 instance masks -> 4x4 tokens), at small CPU batch sizes.

A training step is what the tokenizer task runs: forward (encode, quantise with the EMA codebook update, decode,
reconstruction + commitment loss) with the depth recipe's mask augmentation (ratio 0.5, 16-px cells) for depth,
backward and an Adam step (lr 3e-4, as the official recipe). Encode is ``SoftVQVAE.encode`` (no gradients).
Inputs are synthetic (depth: uniform 0.5-10 m; masks: random boxes of 1s): cost does not depend on the values.
Weights are random and seeded. Each row reports the median of ``--iters`` timed calls after ``--warmup`` untimed
ones, and ``busy_others``: the share of the machine other processes used meanwhile (the machine may be shared).

    python benchmarks/bench_ait_tokenizer.py --threads 1 --batches 1,4 --mask-batches 16,64
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from _common import machine_line, measure_steps
from swinlab import create_model
from swinlab.ait import mask_patches

MODELS = {"ait_depth_vqvae": 480, "ait_insseg_vqvae": 64}
"""Registered official sizes and their input side in pixels."""
BATCH_OPTIONS = {"ait_depth_vqvae": "batches", "ait_insseg_vqvae": "mask_batches"}
"""The option giving each tokenizer's batch sizes (a 64 px mask crop costs ~1/56 of a 480 px depth map)."""


def inputs(name: str, side: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A synthetic batch of the kind the tokenizer reads: depth in metres, or binary masks."""
    if name == "ait_depth_vqvae":
        return 0.5 + 9.5 * torch.rand(batch, 1, side, side, generator=generator)
    masks = torch.zeros(batch, 1, side, side)
    for b in range(batch):
        top, left = torch.randint(0, side // 2, (2,), generator=generator).tolist()
        masks[b, :, top : top + side // 2, left : left + side // 2] = 1.0
    return masks


def bench(name: str, side: int, batch: int, warmup: int, iters: int) -> dict:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = create_model(name)
    x = inputs(name, side, batch, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)

    def train_step() -> None:
        given = mask_patches(x, 0.5, 16, generator)[0] if model.kind == "depth" else x
        optimizer.zero_grad(set_to_none=True)
        model(given, x)["loss"].backward()
        optimizer.step()

    model.train()
    step = measure_steps(train_step, warmup, iters)
    tokens = batch * model.grid[0] * model.grid[1]
    with torch.inference_mode():
        enc = measure_steps(lambda: model.encode(x), warmup, iters)
    return {
        "model": name, "side": side, "batch": batch, "tokens_per_image": tokens // batch,
        "train_images_per_s": batch / step["median_s"], "encode_ids_per_s": tokens / enc["median_s"],
        "encode_images_per_s": batch / enc["median_s"], "train_step": step, "encode": enc,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,4", help="depth tokenizer batch sizes")
    parser.add_argument("--mask-batches", default="16,64", help="instance-mask tokenizer batch sizes")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="append this run's rows to this JSON list")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    print(f"AiT tokenizers, {args.threads} thread(s), median of {args.iters} after {args.warmup} warm-up calls")
    print("| tokenizer | input | batch | train images/s | encode ids/s | encode images/s | others' CPU share |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in args.models.split(","):
        for batch in (int(b) for b in getattr(args, BATCH_OPTIONS[name]).split(",")):
            r = bench(name, MODELS[name], batch, args.warmup, args.iters)
            rows.append(r)
            busy = max(r["train_step"]["busy_others"], r["encode"]["busy_others"])
            print(f"| {name} | {r['side']}x{r['side']} -> {r['tokens_per_image']} tokens | {batch} | "
                  f"{r['train_images_per_s']:.2f} | {r['encode_ids_per_s']:.0f} | {r['encode_images_per_s']:.1f} | "
                  f"{busy:.0%} |", flush=True)  # fmt: skip
    if args.json:
        old = json.loads(args.json.read_text()) if args.json.is_file() else []
        run = {"threads": args.threads, "machine": machine_line(), "platform": platform.platform(),
               "torch": torch.__version__, "rows": rows}  # fmt: skip
        args.json.write_text(json.dumps([*old, run], indent=1))


if __name__ == "__main__":
    main()
