"""AiT task-solver decoding speed on CPU (issue 16 §5): autoregressive tokens/s with and without the key/value cache
at several sequence lengths, and images/s of the parallel ([MASK], AiT-P) mode.

The solver is the nano depth recipe's (``configs/ait_depth_nano.yaml``: a 3-stage SwinV2 of width 32 on 64 px
images, a 2 + 2 layer head of width 64) with ``max_length`` raised to the longest length measured. Weights are
random and seeded: decoding cost does not depend on what was learned. Tokens/s counts decoded tokens only, but each
call also encodes its images once (the same work for every row of one batch size), so at short lengths the figure
includes that fixed cost. A cache keeps the cost of a step flat in its position; without it step ``t`` re-runs the
whole prefix, so tokens/s falls with the length.

    python benchmarks/bench_ait_decode.py --threads 1 --lengths 64,256,1024 --batch 1
"""

from __future__ import annotations

import argparse

import torch

from _common import measure_steps
from swinlab import create_model

NANO = {
    "backbone": "swinv2_tiny_window8_256",
    "backbone_kwargs": {"embed_dim": 32, "depths": [2, 2, 2], "num_heads": [2, 4, 8], "window_size": 4},
    "image_size": 64,
    "prompts": ["depth"],
    "dim": 64,
    "heads": 4,
    "hidden": 256,
    "encoder_layers": 2,
    "decoder_layers": 2,
}


def seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls after one untimed call."""
    return measure_steps(fn, 1, repeats)["median_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lengths", default="64,256,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uncached-max", type=int, default=256, help="longest length decoded without the cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.manual_seed(0)
    solver = create_model("ait_task_solver", max_length=max(lengths), **NANO).eval()
    parallel = create_model("ait_task_solver", max_length=max(lengths), parallel=True, **NANO).eval()
    images = torch.randn(args.batch, 3, 64, 64)
    print(f"nano AiT solver, batch {args.batch}, {args.threads} thread(s), median of {args.repeats}")
    print("| length | cached tokens/s | uncached tokens/s | cache speed-up | parallel images/s |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for length in lengths:
            tokens = args.batch * length
            cached = seconds(lambda n=length: solver.generate(images, "depth", n, use_cache=True), args.repeats)
            row = [f"{tokens / cached:.0f}"]
            if length <= args.uncached_max:
                plain = seconds(lambda n=length: solver.generate(images, "depth", n, use_cache=False), args.repeats)
                row += [f"{tokens / plain:.0f}", f"{plain / cached:.1f}x"]
            else:
                row += ["not run", "—"]
            par = seconds(lambda n=length: parallel.generate(images, "depth", n), args.repeats)
            row.append(f"{args.batch / par:.0f}")
            print(f"| {length} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
