"""The ``swinlab`` command. Thin: every sub-command parses arguments and calls one library function.

``swinlab`` with no arguments is the main job: a small Swin V2 trained on the Fashion-MNIST subset that ships with
the package, printing progress and the final validation top-1.
Distributed runs use torchrun, e.g. ``torchrun --nproc_per_node 2 -m swinlab train configs/X.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

MAIN_JOB_OUTPUT = "runs/main"


def _cmd_train(args: argparse.Namespace) -> int:
    from swinlab.config import load_config
    from swinlab.engine import train

    cfg = load_config(args.config, args.set)
    result = train(cfg)
    _print_result(result)
    return 0


def _cmd_main_job(_: argparse.Namespace) -> int:
    from swinlab.config import load_config
    from swinlab.engine import train

    print(
        "swinlab main job: Swin V2 (swinv2_nano_window4_32) on the embedded Fashion-MNIST subset "
        "(12,000 train / 2,000 val images)\n"
        f"run folder: {MAIN_JOB_OUTPUT}  (see `swinlab --help` for the other commands)",
        flush=True,
    )
    cfg = load_config(None, [f"output_dir={MAIN_JOB_OUTPUT}"])
    result = train(cfg)
    _print_result(result)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from swinlab.engine import evaluate

    _print_result(evaluate(args.run, args.set))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from swinlab import list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from swinlab import create_model
    from swinlab.metrics.flops import measure

    model = create_model(args.model, **({"img_size": args.img_size} if args.img_size else {}))
    size = args.img_size or getattr(model, "img_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    cost = measure(model, (args.batch, getattr(model, "in_chans", 3), size, size))
    print(f"model             {args.model}")
    print(cost.format())
    return 0


def _print_result(result: dict) -> None:
    for key, value in result.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<18}{text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swinlab",
        description="Swin Transformer V2 and friends. With no command: run the main job (train a small Swin V2 "
        "on the embedded Fashion-MNIST subset).",
    )
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("config", help="path to a YAML recipe (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=3e-4")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder or checkpoint on its validation set")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.root=...")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'swinv2_tiny*'")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("info", help="params, FLOPs and activation memory of a model")
    p.add_argument("model")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own)")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func = getattr(args, "func", _cmd_main_job)
    from swinlab.config import ConfigError

    try:
        return func(args)
    except (ConfigError, ValueError, TypeError, FileNotFoundError) as e:
        # User errors get one clear line, not a stack trace; SWINLAB_DEBUG=1 shows the trace.
        import os

        if os.environ.get("SWINLAB_DEBUG"):
            raise
        print(f"swinlab: error: {e}  (SWINLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; the last completed epoch is in the run folder's checkpoint.pt", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
