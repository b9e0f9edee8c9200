"""Genotypes: a DARTS cell written as ``(operation, input)`` pairs, the published ones, their JSON form and how the
search derives one from α.

A cell with ``n`` nodes lists ``2n`` pairs, two per node in node order; inputs ``0`` and ``1`` are the outputs of the
two previous cells, ``k + 2`` is node ``k``. ``*_concat`` lists the states concatenated into the cell's output.

An :class:`AcaGenotype` (ACA, :mod:`~swinlab.nas.aca`) writes each edge as ``(operation, input, keep)``: the
operation runs on a ``keep`` fraction of the channels and the rest pass as identity. The JSON form says which kind it
is (``"kind": "darts"`` or ``"aca"``) and each loader accepts its own kind only, so a cell is never silently read as
the other; :func:`aca_from_plain` makes a plain genotype the ACA one that keeps every channel.
"""

from __future__ import annotations

import difflib
import json
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from swinlab.nas.operations import OPS
from swinlab.nas.pc import edge_weights

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")
AcaGenotype = namedtuple("AcaGenotype", "normal normal_concat reduce reduce_concat")

# The official search space, in the official order (α columns follow it).
PRIMITIVES = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
]

# ACA's search space: the official one without skip_connect (skip returns implicitly as the identity channels).
ACA_PRIMITIVES = [name for name in PRIMITIVES if name != "skip_connect"]

SEARCH_SPACES = {"darts": PRIMITIVES, "aca": ACA_PRIMITIVES}

# Zoph et al. 2018, as transcribed in the official DARTS repository (5 nodes).
NASNet = Genotype(
    normal=[
        ("sep_conv_5x5", 1), ("sep_conv_3x3", 0),
        ("sep_conv_5x5", 0), ("sep_conv_3x3", 0),
        ("avg_pool_3x3", 1), ("skip_connect", 0),
        ("avg_pool_3x3", 0), ("avg_pool_3x3", 0),
        ("sep_conv_3x3", 1), ("skip_connect", 1),
    ],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[
        ("sep_conv_5x5", 1), ("sep_conv_7x7", 0),
        ("max_pool_3x3", 1), ("sep_conv_7x7", 0),
        ("avg_pool_3x3", 1), ("sep_conv_5x5", 0),
        ("skip_connect", 3), ("avg_pool_3x3", 2),
        ("sep_conv_3x3", 2), ("max_pool_3x3", 1),
    ],
    reduce_concat=[4, 5, 6],
)  # fmt: skip

# Real et al. 2019, as transcribed in the official DARTS repository (5 nodes).
AmoebaNet = Genotype(
    normal=[
        ("avg_pool_3x3", 0), ("max_pool_3x3", 1),
        ("sep_conv_3x3", 0), ("sep_conv_5x5", 2),
        ("sep_conv_3x3", 0), ("avg_pool_3x3", 3),
        ("sep_conv_3x3", 1), ("skip_connect", 1),
        ("skip_connect", 0), ("avg_pool_3x3", 1),
    ],
    normal_concat=[4, 5, 6],
    reduce=[
        ("avg_pool_3x3", 0), ("sep_conv_3x3", 1),
        ("max_pool_3x3", 0), ("sep_conv_7x7", 2),
        ("sep_conv_7x7", 0), ("avg_pool_3x3", 1),
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5),
    ],
    reduce_concat=[3, 4, 6],
)  # fmt: skip

# DARTS first order (the paper's 3.00 % CIFAR-10 cell).
DARTS_V1 = Genotype(
    normal=[
        ("sep_conv_3x3", 1), ("sep_conv_3x3", 0),
        ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0), ("skip_connect", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 2), ("max_pool_3x3", 0),
        ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("avg_pool_3x3", 0),
    ],
    reduce_concat=[2, 3, 4, 5],
)  # fmt: skip

# DARTS second order (the paper's 2.76 % CIFAR-10 cell, the released model).
DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1), ("skip_connect", 0),
        ("skip_connect", 0), ("dil_conv_3x3", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0), ("max_pool_3x3", 1),
        ("skip_connect", 2), ("max_pool_3x3", 1),
        ("max_pool_3x3", 0), ("skip_connect", 2),
        ("skip_connect", 2), ("max_pool_3x3", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)  # fmt: skip

DARTS = DARTS_V2

PUBLISHED = {"NASNet": NASNet, "AmoebaNet": AmoebaNet, "DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2}

_KINDS = {"darts": "a plain DARTS genotype", "aca": "an ACA genotype"}
_LOADERS = {"darts": "load_genotype", "aca": "load_aca_genotype"}
_ENTRY = {"darts": "(operation, input) pair", "aca": "(operation, input, keep) triple"}
_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")


def _check_keep(keep: Any, where: str) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"{where}: keep {keep!r} must be a fraction of the channels in (0, 1]")
    return float(keep)


def _check_cell(
    cell: str, pairs: Any, concat: Any, known: Sequence[str], space: str, kind: str = "darts"
) -> tuple[list, list]:
    entry = _ENTRY[kind]
    if not isinstance(pairs, (list, tuple)) or not pairs or len(pairs) % 2:
        raise ValueError(f"{cell} cell: expected an even, non-zero number of {entry}s, got {pairs!r}")
    size = 3 if kind == "aca" else 2
    checked = []
    for e, pair in enumerate(pairs):
        node = e // 2
        where = f"{cell} cell, node {node} (edge {e})"
        if not isinstance(pair, (list, tuple)) or len(pair) != size:
            other = next(k for k in _ENTRY if k != kind)
            hint = ""
            if isinstance(pair, (list, tuple)) and len(pair) == 5 - size:
                hint = f": that is {_KINDS[other]}'s entry (see {_LOADERS[other]})"
            raise ValueError(f"{where}: expected an {entry}, got {pair!r}{hint}")
        name, index = pair[:2]
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; {space}: {', '.join(known)}"
            raise ValueError(f"{where}: unknown operation {name!r}{hint}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= node + 1:
            raise ValueError(f"{where}: input {index!r} out of range, node {node} reads states 0..{node + 1}")
        checked.append((name, index, _check_keep(pair[2], where)) if kind == "aca" else (name, index))
    states = len(pairs) // 2 + 2
    if not isinstance(concat, (list, tuple, range)) or not concat:
        raise ValueError(f"{cell}_concat: expected a non-empty list of states, got {concat!r}")
    for s in concat:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < states:
            raise ValueError(f"{cell}_concat: state {s!r} out of range 0..{states - 1}")
    return checked, list(concat)


def _validate(genotype: Any, primitives: Sequence[str] | None, kind: str) -> tuple[list, list, list, list]:
    if isinstance(genotype, (Genotype, AcaGenotype)) and (kind == "aca") != isinstance(genotype, AcaGenotype):
        other = "aca" if isinstance(genotype, AcaGenotype) else "darts"
        raise ValueError(f"expected {_KINDS[kind]}, got {_KINDS[other]} ({type(genotype).__name__})")
    if not isinstance(genotype, (list, tuple)) or len(genotype) != 4:
        raise ValueError(f"a genotype has four fields {', '.join(_FIELDS)}, got {genotype!r}")
    known = list(OPS) if primitives is None else list(primitives)
    space = "known operations" if primitives is None else "the search space has"
    normal, normal_concat = _check_cell("normal", genotype[0], genotype[1], known, space, kind)
    reduce, reduce_concat = _check_cell("reduce", genotype[2], genotype[3], known, space, kind)
    return normal, normal_concat, reduce, reduce_concat


def validate_genotype(genotype: Any, primitives: Sequence[str] | None = None) -> Genotype:
    """Check a plain genotype and return it with plain lists; ``primitives`` restricts the operations to a search
    space (default: every operation of :data:`~swinlab.nas.operations.OPS`). Raises ``ValueError`` naming the cell,
    node and edge at fault."""
    return Genotype(*_validate(genotype, primitives, "darts"))


def validate_aca_genotype(genotype: Any, primitives: Sequence[str] | None = None) -> AcaGenotype:
    """:func:`validate_genotype` for an :class:`AcaGenotype` (every ``keep`` in (0, 1])."""
    return AcaGenotype(*_validate(genotype, primitives, "aca"))


def aca_from_plain(genotype: Genotype) -> AcaGenotype:
    """The ACA genotype that keeps every channel of every edge: it builds exactly the plain network."""
    g = validate_genotype(genotype)
    keep = lambda pairs: [(name, index, 1.0) for name, index in pairs]
    return AcaGenotype(keep(g.normal), g.normal_concat, keep(g.reduce), g.reduce_concat)


def genotype_to_dict(genotype: Genotype | AcaGenotype) -> dict[str, Any]:
    """A JSON-ready dict; ``kind`` says whether it is a plain (``darts``) or an ACA (``aca``) genotype."""
    kind = "aca" if isinstance(genotype, AcaGenotype) else "darts"
    normal, normal_concat, reduce, reduce_concat = _validate(genotype, None, kind)
    return {
        "kind": kind,
        "normal": [list(p) for p in normal],
        "normal_concat": normal_concat,
        "reduce": [list(p) for p in reduce],
        "reduce_concat": reduce_concat,
    }


def _from_dict(data: Any, primitives: Sequence[str] | None, kind: str) -> tuple[list, list, list, list]:
    if not isinstance(data, dict):
        raise ValueError(f"a genotype must be a JSON object, got {type(data).__name__}")
    found = data.get("kind", "darts")
    if found not in _KINDS:
        raise ValueError(f"unknown genotype kind {found!r}; known: {', '.join(_KINDS)}")
    if found != kind:
        raise ValueError(
            f"the JSON holds {_KINDS[found]} (kind {found!r}), not {_KINDS[kind]}: read it with {_LOADERS[found]}"
        )
    missing = [f for f in _FIELDS if f not in data]
    unknown = sorted(set(data) - {*_FIELDS, "kind"})
    if missing or unknown:
        raise ValueError(f"genotype JSON: missing fields {missing}, unknown fields {unknown}")
    return _validate(tuple(data[f] for f in _FIELDS), primitives, kind)


def genotype_from_dict(data: dict[str, Any], primitives: Sequence[str] | None = None) -> Genotype:
    """Inverse of :func:`genotype_to_dict` for a plain genotype, validated (see :func:`validate_genotype`); an ACA
    genotype is refused."""
    return Genotype(*_from_dict(data, primitives, "darts"))


def aca_genotype_from_dict(data: dict[str, Any], primitives: Sequence[str] | None = None) -> AcaGenotype:
    """Inverse of :func:`genotype_to_dict` for an ACA genotype; a plain genotype is refused (see
    :func:`aca_from_plain`)."""
    return AcaGenotype(*_from_dict(data, primitives, "aca"))


def save_genotype(genotype: Genotype | AcaGenotype, path: str | Path) -> None:
    """Write either kind of genotype as JSON."""
    Path(path).write_text(json.dumps(genotype_to_dict(genotype), indent=1) + "\n")


def load_genotype(path: str | Path, primitives: Sequence[str] | None = None) -> Genotype:
    """A plain genotype from JSON (an ACA one is refused: see :func:`load_aca_genotype`)."""
    return genotype_from_dict(json.loads(Path(path).read_text()), primitives)


def load_aca_genotype(path: str | Path, primitives: Sequence[str] | None = None) -> AcaGenotype:
    """An ACA genotype from JSON (a plain one is refused: see :func:`load_genotype`)."""
    return aca_genotype_from_dict(json.loads(Path(path).read_text()), primitives)


def read_genotype(path: str | Path) -> Genotype | AcaGenotype:
    """A genotype of either kind from JSON, as its ``kind`` says: for what builds both (the evaluation networks)."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and data.get("kind") == "aca":
        return aca_genotype_from_dict(data)
    return genotype_from_dict(data)


def num_edges(steps: int) -> int:
    """Edges of a search cell: node ``i`` reads the two cell inputs and the ``i`` earlier nodes."""
    return sum(2 + i for i in range(steps))


def _parse_cell(weights: list[list[float]], primitives: Sequence[str], steps: int) -> list[tuple[str, int]]:
    """Per node, the two incoming edges whose strongest non-``none`` weight is largest (strongest first; ties keep
    the lower input), each with its strongest non-``none`` operation (ties: the earlier primitive)."""
    candidates = [k for k, name in enumerate(primitives) if name != "none"]
    gene, start = [], 0
    for i in range(steps):
        rows = weights[start : start + i + 2]
        strength = [max(row[k] for k in candidates) for row in rows]
        for j in sorted(range(i + 2), key=lambda j: -strength[j])[:2]:
            gene.append((primitives[max(candidates, key=lambda k, j=j: rows[j][k])], j))
        start += i + 2
    return gene


def _edge_op_weights(alphas: torch.Tensor, betas: torch.Tensor | None, steps: int) -> list[list[float]]:
    weights = torch.softmax(alphas.detach(), -1)
    if betas is not None:
        weights = weights * edge_weights(betas.detach(), steps)[:, None]
    return weights.tolist()


def derive_genotype(
    alphas_normal: torch.Tensor,
    alphas_reduce: torch.Tensor,
    primitives: Sequence[str] = PRIMITIVES,
    steps: int = 4,
    multiplier: int = 4,
    betas_normal: torch.Tensor | None = None,
    betas_reduce: torch.Tensor | None = None,
) -> Genotype:
    """The official discrete cell from α (softmax over operations, then :func:`_parse_cell`); the output
    concatenates the last ``multiplier`` nodes. With PC-DARTS's edge weights β, each edge's operation weights are
    first scaled by its normalised β (:func:`~swinlab.nas.pc.edge_weights`), as PC-DARTS derives."""
    expected = (num_edges(steps), len(primitives))
    for name, alphas in (("alphas_normal", alphas_normal), ("alphas_reduce", alphas_reduce)):
        if tuple(alphas.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(alphas.shape)}, the cell needs {expected}: "
                f"{expected[0]} edges for {steps} nodes x {expected[1]} operations"
            )
    if (betas_normal is None) != (betas_reduce is None):
        raise ValueError("edge normalisation needs both betas_normal and betas_reduce, or neither")
    if all(name == "none" for name in primitives):
        raise ValueError("the search space has no operation other than 'none' to derive a cell from")
    normal = _parse_cell(_edge_op_weights(alphas_normal, betas_normal, steps), primitives, steps)
    reduce = _parse_cell(_edge_op_weights(alphas_reduce, betas_reduce, steps), primitives, steps)
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal, concat, reduce, list(concat))
