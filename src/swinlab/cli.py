"""The ``swinlab`` command. Thin: every sub-command parses arguments and calls one library function.

``swinlab`` with no arguments is the main job: a small Swin V2 trained on the Fashion-MNIST subset that ships with
the package, printing progress and the final validation top-1.
Distributed runs use torchrun, e.g. ``torchrun --nproc_per_node 2 -m swinlab train configs/X.yaml``.
"""

from __future__ import annotations

import argparse
import os
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
    "task.label_smoothing=0.0",
    "optim.lr=2e-3",
    "optim.warmup_epochs=1",
    f"output_dir={MAIN_JOB_OUTPUT}",
)


def _cmd_train(args: argparse.Namespace) -> int:
    from swinlab.engine import train
    from swinlab.recipe import load_config

    cfg = load_config(args.config, args.set)
    result = train(cfg)
    _print_result(result)
    return 0


def _cmd_main_job(_: argparse.Namespace) -> int:
    from swinlab.engine import train
    from swinlab.recipe import load_config

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


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from swinlab.config import to_dict
    from swinlab.recipe import load_config, recipe_keys

    cfg = load_config(args.recipe, args.set)
    if args.keys is None:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    section = args.keys.rstrip(".")
    keys = [k for k in recipe_keys(cfg.task.name) if not section or k.key == section or k.key.startswith(section + ".")]
    if not keys:
        print(f"no key or section {args.keys!r} (sections: model, data, task, optim, fp8; or a top-level key)",
              file=sys.stderr)  # fmt: skip
        return 1
    width = max(len(k.key) for k in keys)
    for k in keys:
        print(f"{k.key:<{width}}  {k.type}, default {k.default!r}\n{'':<{width}}  {k.doc}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from swinlab import list_models

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print("\n".join(names))
    return 0


def _needs_more_than_images(model) -> bool:
    import inspect

    required = [
        p
        for p in inspect.signature(model.forward).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(required) > 1


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from swinlab import create_model
    from swinlab.metrics.flops import measure
    from swinlab.models.registry import model_meta

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    if args.img_size and "clip_size" in model_meta(args.model):  # video models take any clip: nothing to size
        kwargs = {}
    with torch.device("meta"):  # shapes only: GPT-175B or a 32-frame video clip cost nothing to measure
        model = create_model(args.model, **kwargs)
    params = sum(p.numel() for p in model.parameters())
    if hasattr(model, "vocab_size") and hasattr(model, "block_size"):  # a language model: one full context
        cost = measure(model, (args.batch, model.block_size), dtype=torch.int64)
    elif hasattr(model, "clip_size"):  # a video model: clips (B, C, T, H, W), its specified view unless asked
        frames, height, width = model.clip_size
        side = args.img_size
        shape = (args.batch, model.in_chans, args.frames or frames, side or height, side or width)
        cost = measure(model, shape)
    else:
        # A model whose forward needs more than images (the AiT solver: task and targets) is measured on the
        # image path it declares (its backbone); the rest of its cost depends on the task.
        measured = getattr(model, "backbone", model) if _needs_more_than_images(model) else model
        size = args.img_size or getattr(measured, "img_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        cost = measure(measured, (args.batch, getattr(measured, "in_chans", 3), size, size))
        if measured is not model:
            print(f"note              FLOPs and activations of the backbone only ({args.model}'s forward needs "
                  "task inputs); parameters below are the backbone's, the whole model has "
                  f"{params:,}")  # fmt: skip
    print(f"model             {args.model} (measured on the meta device: shapes only, nothing allocated; fused "
          "attention kernels may save less on a real device)")  # fmt: skip
    print(cost.format())
    # FP8-LM's accounting of persistent training state: mixed-precision Adam keeps 16 B/param (FP32 master,
    # gradient, two moments), its O2 level 6 B/param (FP16 master 2, FP8 gradient 1, FP8 m1 1, FP16 m2 2).
    print(f"training state    {16 * params / 2**30:.2f} GiB with mixed-precision Adam (16 B/param), "
          f"{6 * params / 2**30:.2f} GiB with FP8-LM O2 (6 B/param)")  # fmt: skip
    return 0


def _cmd_erf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from swinlab.engine.runs import load_source, probe_inputs
    from swinlab.metrics.erf import erf_report

    sources = [load_source(s, img_size=args.img_size, pretrained=args.pretrained if i == 0 else None)
               for i, s in enumerate([args.source, *args.compare])]  # fmt: skip
    probes = {src.label: (src.model, probe_inputs(src, args.inputs, args.batch, args.seed)) for src in sources}
    first = Path(args.source)
    out = args.out or (first if first.is_dir() else first.parent if first.is_file() else Path("erf"))
    print(erf_report(probes, args.layer, out, inputs=args.inputs).format())
    return 0


def _print_result(result: dict) -> None:
    """The task's closing lines, then where the run or checkpoint is (everything else is in metrics.csv).

    Under torchrun only rank 0 prints them: every rank holds the same all-reduced metrics.
    """
    if os.environ.get("RANK", "0") != "0":
        return
    for line in result.get("summary", []):
        print(line)
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
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("config", help="path to a YAML recipe (see configs/)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override, e.g. optim.lr=3e-4 or precision=fp8-o2 (fp32|bf16|fp8-o1|fp8-o2|fp8-o3; fp8-o3 shards over "
        "ranks: run it under torchrun); `swinlab config --keys` lists every key",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder or checkpoint on its validation set")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. data.root=...")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "config",
        help="print a recipe as it resolves, or list the keys --set takes",
        description="Without --keys: the resolved recipe (defaults, base: files and --set overrides applied) as YAML. "
        "With --keys [SECTION]: every key with its type, default and meaning, for the recipe's task "
        "(e.g. swinlab config --keys optim; swinlab config --keys task --set task=language_model).",
    )
    p.add_argument("recipe", nargs="?", default=None, help="a YAML recipe (default: swinlab's defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as for train")
    p.add_argument("--keys", nargs="?", const="", default=None, metavar="SECTION",
                   help="list the keys (of one section: model, data, task, optim, fp8)")  # fmt: skip
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("models", help="list registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'swinv2_tiny*'")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("info", help="params, FLOPs and activation memory of a model")
    p.add_argument("model")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the model's own)")
    p.add_argument(
        "--batch", type=int, default=2,
        help="batch of the measured forward (per-sample numbers are printed; >= 2 lets BatchNorm models train)",
    )
    p.add_argument("--frames", type=int, default=None, help="clip length for video models (default: the model's)")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser(
        "erf",
        help="effective receptive field heatmap and learned GMConv sigmas of a run or model",
        description="Measure the effective receptive field (mean |d centre output / d input|) of a layer's centre "
        "unit and write erf_<layer>.png (heatmaps + radial profiles) and sigma.png (learned sigma per GMConv layer); "
        "print the ERF spread and the sigma table. Compare e.g. a GMConv run with its plain twin: "
        "swinlab erf runs/resnet18_gmconv_fashion --layer layer2.1.conv2 --compare runs/resnet18_fashion",
    )
    p.add_argument("source", help="run folder, checkpoint file, or registered model name")
    p.add_argument("--layer", default=None, help="module name, e.g. layer2.1.conv2 (default: the last conv)")
    p.add_argument("--compare", action="append", default=[], metavar="SOURCE",
                   help="another run / checkpoint / model to show side by side (repeatable)")  # fmt: skip
    p.add_argument("--inputs", choices=("data", "noise"), default="data",
                   help="validation images of the source's data (a model name: the embedded Fashion-MNIST), "
                   "or standard-normal noise")  # fmt: skip
    p.add_argument("--batch", type=int, default=32, help="images averaged over")
    p.add_argument("--img-size", type=int, default=None, help="input side (default: the run's or the model's)")
    p.add_argument("--pretrained", default=None, help="weights (checkpoint path) for SOURCE when it is a model name")
    p.add_argument("--out", default=None, help="output folder (default: the run folder, or ./erf for a model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise inputs")
    p.set_defaults(func=_cmd_erf)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's recipe, data, files or machine can cause: reported in one line, not a stack trace."""
    from swinlab.config import ConfigError
    from swinlab.engine.checkpoint import CheckpointError
    from swinlab.engine.loop import TrainingError
    from swinlab.engine.runfolder import RunFolderError

    return ConfigError, ValueError, TypeError, CheckpointError, RunFolderError, TrainingError, OSError


def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror and not isinstance(error, FileNotFoundError):
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror}{where}"  # e.g. "No space left on device: runs/main/.checkpoint.pt.tmp-123"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func = getattr(args, "func", _cmd_main_job)
    try:
        return func(args)
    except BrokenPipeError:  # e.g. `swinlab models | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; the last completed epoch is in the run folder's checkpoint.pt", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if args.debug or os.environ.get("SWINLAB_DEBUG"):
            raise
        print(f"swinlab: error: {_one_line(e)}  (--debug or SWINLAB_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
