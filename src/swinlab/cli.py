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
MAIN_JOB = (
    # The main job's recipe, as overrides of the general defaults; configs/swinv2_nano_fashion.yaml writes the
    # same settings out (a test keeps the two equal). Short training on 12k small images underfits, so no
    # augmentation, label smoothing or stochastic depth: measured +4-5 points top-1 over the ImageNet-style ones.
    "model.name=swinv2_nano_window4_32",
    "model.kwargs={drop_path_rate: 0.0}",
    "data.name=fashion_mnist_embedded",
    "data.img_size=32",
    "data.batch_size=64",
    "data.augment=none",
    "epochs=8",
    "label_smoothing=0.0",
    "optim.lr=2e-3",
    "optim.warmup_epochs=1",
    f"output_dir={MAIN_JOB_OUTPUT}",
)


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
        "(12,000 train / 2,000 val images), 8 epochs\n"
        f"run folder: {MAIN_JOB_OUTPUT}  (see `swinlab --help` for the other commands)",
        flush=True,
    )
    cfg = load_config(None, MAIN_JOB)
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
    """The headline numbers of a run or an evaluation on one line each (everything is in metrics.csv)."""
    if "val_top1" in result:
        top5 = f", top-5 {result['val_top5']:.2f}%" if "val_top5" in result else ""
        print(f"validation top-1 {result['val_top1']:.2f}%{top5}, loss {result.get('val_loss', float('nan')):.4f}")
    if result.get("best") is not None:
        print(f"best top-1       {result['best']:.2f}% after {result.get('epochs_completed', '?')} epochs")
    if "run_dir" in result:
        print(f"run folder       {result['run_dir']} (metrics.csv, curves.png, checkpoint.pt)")
    if "checkpoint" in result:
        print(f"checkpoint       {result['checkpoint']} (epoch {result.get('epoch', '?')})")


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
    except BrokenPipeError:  # e.g. `swinlab models | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; the last completed epoch is in the run folder's checkpoint.pt", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
