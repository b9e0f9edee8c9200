"""Configuration sections as frozen dataclasses, and the machinery that reads YAML and ``--set key=value`` into them.

Why dataclasses and not a free-form dict: a typo in a recipe (``optim.lr_rate``) must fail at load time with the
list of valid keys, not be ignored for a whole training run. The whole recipe of a run (these sections plus its
task's own) is :class:`swinlab.recipe.TrainConfig`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import difflib
import inspect
import itertools
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take, checked when a recipe is read so the error names the key (a negative
    ``clip_grad`` would otherwise flip every gradient, a negative ``lr`` fail deep inside torch)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def __str__(self) -> str:
        bounds = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                  if v is not None]  # fmt: skip
        return " and ".join(bounds)


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(ge=0, lt=1)]
"""In [0, 1): a share that cannot be all (label smoothing, a held-out part, Adam's betas)."""
Probability = Annotated[float, Range(ge=0, le=1)]
UnitInterval = Annotated[float, Range(gt=0, le=1)]
"""In (0, 1]: a factor that may shrink a value but not erase it (layer-wise learning-rate decay)."""
Count = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str = "swinv2_nano_window4_32"
    """A registered model name (``swinlab models`` lists them)."""
    num_classes: Count | None = None
    """Classifier size; ``None`` takes the dataset's class count."""
    pretrained: str | None = None
    """Path to an official or swinlab checkpoint loaded before training."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30 % more compute."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Constructor overrides, e.g. ``{drop_path_rate: 0.2, window_size: 16}``."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    name: str = "fashion_mnist_embedded"
    """``fashion_mnist_embedded`` (ships with swinlab), ``fashion_mnist`` (IDX files in ``root``),
    ``imagefolder`` (``root/train/<class>/*``, ``root/val/<class>/*``), ``cifar10`` / ``cifar100``
    (the python pickle batches in ``root``); videos: ``video`` (Kinetics-style lists ``train_list`` /
    ``val_list`` under ``root``), ``motion_demo`` (generated, ships with swinlab); text (byte-level language
    modelling): ``stdlib_docs`` (the Python standard library's docstrings, in every install), ``text`` (a
    ``.txt`` file or a folder of them in ``root``); depth (image + metric depth map): ``nyu_depth`` (BTS/GLPDepth
    file lists ``train_list`` / ``val_list`` under ``root``, 16-bit PNG millimetres), ``procedural_depth``
    (ray-cast rooms, generated), ``middlebury_motorcycle`` (scikit-image's stereo pair, extra ``depth``);
    instances (image + boxes, classes, masks): ``coco_instances`` (COCO instances JSON ``train_list`` /
    ``val_list``, images under ``root``), ``procedural_instances`` (the same rooms, classes sphere and box)."""
    root: str | None = None
    """Folder (or file) the dataset is read from; not needed for embedded or generated data."""
    img_size: Count = 32
    """Side of the square images the model sees (video: the crop size)."""
    in_chans: Count | None = None
    """``None``: keep the dataset's channels (1 for Fashion-MNIST, 3 for RGB sets)."""
    batch_size: Count = 64
    """Per-process batch size; the global batch is ``batch_size * world_size * accum_steps``."""
    eval_batch_size: Count | None = None
    """Per-process batch size of evaluation; ``None``: ``batch_size``."""
    num_workers: NonNegativeInt = 0
    """DataLoader worker processes (0: load in the training process)."""
    augment: str = "standard"
    """``standard`` (random resized crop + flip, as the Swin recipes), ``simmim`` (SimMIM's pre-training crop: area
    0.67-1, aspect 3/4-4/3, + flip), ``light`` (pad-crop + flip), ``none``."""
    hflip: bool = True
    """Random horizontal flips in training (off for data where left and right differ)."""
    mean: tuple[float, ...] | None = None
    """Per-channel normalisation mean; ``None``: the dataset's own."""
    std: tuple[Positive, ...] | None = None
    """Per-channel normalisation standard deviation; ``None``: the dataset's own."""
    train_limit: Count | None = None
    """Use only the first N training samples (quick experiments); text data: at most N windows per epoch."""
    val_limit: Count | None = None
    """Use only the first N validation samples (text: windows)."""
    heldout_fraction: Fraction = 0.0
    """Hold out this last fraction of the training set as a second training loader, ``heldout``, for tasks that
    learn something on data the weights do not see (DARTS's architecture step: 0.5, as the official search)."""
    # -- video datasets (``video``: annotation lists, ``motion_demo``: generated); img_size is the crop size --
    train_list: str | None = None
    """``video``: the training annotation list or CSV (``path label`` lines), relative to ``root``; ``nyu_depth``:
    the BTS/GLPDepth file list (``rgb depth focal`` lines); ``coco_instances``: the instances JSON (default
    ``annotations/instances_train2017.json``)."""
    val_list: str | None = None
    """``video``: the validation annotation list or CSV, relative to ``root``; ``nyu_depth``: the test file list;
    ``coco_instances``: the instances JSON (default ``annotations/instances_val2017.json``)."""
    clip_len: Count = 32
    """Frames per clip (the Video Swin K400 recipe: 32)."""
    frame_interval: Count = 2
    """Take every k-th frame (K400: 2, so a clip spans 64 frames)."""
    test_clips: Count = 1
    """Clips per video at evaluation, spread uniformly (K400: 4); scores are averaged over all views."""
    test_crops: Count = 1
    """Crops per clip at evaluation: 1 (centre) or 3 (along the longer side; K400: 3)."""
    scale_size: Count | None = None
    """Short side before the training crop; ``None``: ``img_size / 0.875`` for video (256 for 224), the frame's own
    size for depth sets."""
    depth_holes: Fraction = 0.0
    """Depth sets: share of each *training* label's pixels zeroed by rectangular sensor holes (the same holes for a
    sample in every run; validation stays clean), to study label corruption and mask augmentation; 0: off."""
    # -- text datasets (``stdlib_docs``, ``text``); val_limit caps the validation windows --
    seq_len: Count = 256
    """Bytes per window; the model is built with ``block_size = seq_len``."""


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """``adamw`` or ``sgd``."""
    lr: Positive = 1e-3
    """Peak learning rate: for the run's global batch, or for ``base_batch`` under ``lr_scaling: linear``."""
    weight_decay: NonNegative = 0.05
    """Decoupled (AdamW) or L2 (SGD) decay; norms, biases and position tables are exempt."""
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    """AdamW's moment decay rates."""
    eps: Positive = 1e-8
    """AdamW's denominator term."""
    momentum: Fraction = 0.9
    """SGD's (Nesterov) momentum."""
    warmup_lr: NonNegative = 1e-6
    """Learning rate at the first step, rising linearly to ``lr`` over the warm-up."""
    min_lr: NonNegative = 1e-5
    """Learning rate at the end of the cosine decay."""
    warmup_epochs: NonNegative = 1.0
    """Length of the linear warm-up, in epochs (fractions allowed)."""
    lr_mult: dict[str, float] = field(default_factory=dict)
    """Learning-rate factors by parameter-name substring, e.g. ``{log_sigma: 10}`` for GMConv's sigmas."""
    layer_decay: UnitInterval = 1.0
    """Layer-wise learning-rate decay for fine-tuning a Swin (SimMIM: 0.75 for SwinV2-B): block k of n gets
    ``layer_decay ** (n + 1 - k)`` times the rate, the patch embedding the smallest, head and final norm the full
    rate (the official per-block ids); combines with ``lr_mult`` by multiplication. ``1``: off."""
    lr_scaling: str = "none"
    """``none``: ``lr``, ``warmup_lr`` and ``min_lr`` are used as written; ``linear``: they are given for a global
    batch of ``base_batch`` and multiplied by global batch / ``base_batch`` at start (the official Swin recipes:
    base LR x total batch / 512), so a recipe keeps its meaning on any number of GPUs."""
    base_batch: Count = 512
    """The global batch the rates are given for under ``lr_scaling: linear``."""
    schedule: str = "cosine"
    """``cosine`` (per-iteration, after a linear warm-up), ``constant``, or ``multistep`` (``lr`` times ``gamma``
    after each of ``milestones``)."""
    milestones: tuple[NonNegative, ...] = ()
    """``multistep``: the epochs after which the rate is multiplied by ``gamma`` (SimMIM's pre-training: [700])."""
    gamma: Positive = 0.1
    """``multistep``: the factor applied at each milestone."""


@dataclass(frozen=True, kw_only=True)
class FP8Config:
    """The FP8 recipe of ``precision=fp8-o1|o2|o3`` (keywords of ``swinlab.fp8.initialize``)."""

    grad_format: str = "e5m2"
    """Output-gradient format: ``e5m2`` (FP8-LM / MS-AMP: range first; its rounding alone costs ~5.3 % relative
    L2) or ``e4m3`` (precision first: gradient GEMMs within 5 % of FP32, less head-room against overflow)."""
    history_len: Count = 16
    """Amaxes remembered by delayed scaling (activations, output gradients)."""
    margin: NonNegativeInt = 0
    """Scales leave ``2**margin`` head-room below the format's maximum."""
    scaling: str = "delayed"
    """Activation / output-gradient scales: ``delayed`` (from the amax history, FP8-LM's default) or ``current``
    (from the tensor being cast)."""
    high_precision: tuple[str, ...] | None = None
    """Module names whose linears stay out of FP8; ``null``: the model's own choice (GPT: its first block),
    ``[]``: every eligible linear in FP8."""


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """Base of every task's section (``task:`` in a recipe). ``name`` picks the task (``swinlab.tasks.registry``);
    each task subclasses this with its own fields, so a recipe is checked against the task it names."""

    name: str = "classification"
    """A registered task (``classification``, ``video_classification``, ``language_model``, ...) or the import path
    ``module:Class`` of your own; ``task: <name>`` is short for ``task: {name: <name>}``."""


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: typing.Iterable[str], where: str) -> ConfigError:
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {where + key!r}{hint} (valid: {', '.join(valid)})")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type, naming the key on failure."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *constraints = typing.get_args(tp)
        value = _coerce(value, inner, where)
        for allowed in (c for c in constraints if isinstance(c, Range)):
            if value not in allowed:
                raise ConfigError(f"{where}={value!r}: must be {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build_section(tp, value, where + ".")
    if tp is Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, item_tp, where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def build_section(cls: type, values: dict[str, Any], where: str = "", **built: Any) -> Any:
    """``cls(**values)`` with every value checked and converted to its field's type (errors name ``where + key``);
    ``built`` passes fields that are already typed objects."""
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise _unknown_key(key, types_, where)
        kwargs[key] = _coerce(value, types_[key], where + key)
    return cls(**kwargs, **built)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        if isinstance(node.get(part), str):  # a section given by name only (``task: language_model``)
            node[part] = {"name": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``optim.lr=3e-4`` -> ``("optim.lr", 3e-4)``; the value is parsed as YAML so lists and numbers work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else ""
    # YAML reads 3e-4 as a string (it wants 3.0e-4); accept what Python would.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else int(value)
    return key, value


def apply_overrides(values: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """A deep copy of the nested ``values`` with each ``key=value`` override applied."""
    values = copy.deepcopy(values)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(values, key, value)
    return values


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) suitable for YAML and checkpoints."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


@dataclass(frozen=True)
class KeyInfo:
    """One settable key of a recipe, for ``swinlab config --keys``."""

    key: str
    type: str
    default: Any
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under the fields of ``cls`` and its bases (Python keeps none of them at run time,
    so they are read from the source: the one place each key is explained)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source at hand (e.g. a frozen install): keys without explanations
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for field_node, doc_node in itertools.pairwise(body):
            if (isinstance(field_node, ast.AnnAssign) and isinstance(field_node.target, ast.Name)
                    and isinstance(doc_node, ast.Expr) and isinstance(doc_node.value, ast.Constant)
                    and isinstance(doc_node.value.value, str)):  # fmt: skip
                docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *constraints = typing.get_args(tp)
        ranges = [str(c) for c in constraints if isinstance(c, Range)]
        return f"{_type_name(inner)} {' '.join(ranges)}".strip()
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def section_keys(cls: type, prefix: str = "") -> list[KeyInfo]:
    """Every key of the config section ``cls``, nested sections flattened as ``section.key``."""
    docs, keys = _field_docs(cls), []
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += section_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        keys.append(KeyInfo(prefix + f.name, _type_name(tp), default, docs.get(f.name, "")))
    return keys


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe; a top-level ``base: other.yaml`` (relative to this file) is read first and deep-merged under it,
    so a variant recipe states only what differs from its parent."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: circular 'base:' chain")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = loaded.pop("base", None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    return _merge(read_yaml(path.parent / base, (*chain, path.resolve())), loaded)
