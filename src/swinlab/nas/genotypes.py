"""Genotypes: a DARTS cell written as ``(operation, input)`` pairs, the published ones, their JSON form and how the
search derives one from α.

A cell with ``n`` nodes lists ``2n`` pairs, two per node in node order; inputs ``0`` and ``1`` are the outputs of the
two previous cells, ``k + 2`` is node ``k``. ``*_concat`` lists the states concatenated into the cell's output.
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

Genotype = namedtuple("Genotype", "normal normal_concat reduce reduce_concat")

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

_KIND = "darts"
_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")


def _check_cell(cell: str, pairs: Any, concat: Any, known: Sequence[str], space: str) -> tuple[list, list]:
    if not isinstance(pairs, (list, tuple)) or not pairs or len(pairs) % 2:
        raise ValueError(f"{cell} cell: expected an even, non-zero number of (operation, input) pairs, got {pairs!r}")
    checked = []
    for e, pair in enumerate(pairs):
        node = e // 2
        where = f"{cell} cell, node {node} (edge {e})"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{where}: expected an (operation, input) pair, got {pair!r}")
        name, index = pair
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; {space}: {', '.join(known)}"
            raise ValueError(f"{where}: unknown operation {name!r}{hint}")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= node + 1:
            raise ValueError(f"{where}: input {index!r} out of range, node {node} reads states 0..{node + 1}")
        checked.append((name, index))
    states = len(pairs) // 2 + 2
    if not isinstance(concat, (list, tuple, range)) or not concat:
        raise ValueError(f"{cell}_concat: expected a non-empty list of states, got {concat!r}")
    for s in concat:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < states:
            raise ValueError(f"{cell}_concat: state {s!r} out of range 0..{states - 1}")
    return checked, list(concat)


def validate_genotype(genotype: Any, primitives: Sequence[str] | None = None) -> Genotype:
    """Check a genotype and return it with plain lists; ``primitives`` restricts the operations to a search space
    (default: every operation of :data:`~swinlab.nas.operations.OPS`). Raises ``ValueError`` naming the cell, node
    and edge at fault."""
    known = list(OPS) if primitives is None else list(primitives)
    space = "known operations" if primitives is None else "the search space has"
    normal, normal_concat = _check_cell("normal", genotype[0], genotype[1], known, space)
    reduce, reduce_concat = _check_cell("reduce", genotype[2], genotype[3], known, space)
    return Genotype(normal, normal_concat, reduce, reduce_concat)


def genotype_to_dict(genotype: Genotype) -> dict[str, Any]:
    """A JSON-ready dict (``kind`` marks a plain DARTS genotype)."""
    g = validate_genotype(genotype)
    return {
        "kind": _KIND,
        "normal": [list(p) for p in g.normal],
        "normal_concat": g.normal_concat,
        "reduce": [list(p) for p in g.reduce],
        "reduce_concat": g.reduce_concat,
    }


def genotype_from_dict(data: dict[str, Any], primitives: Sequence[str] | None = None) -> Genotype:
    """Inverse of :func:`genotype_to_dict`, validated (see :func:`validate_genotype`)."""
    if not isinstance(data, dict):
        raise ValueError(f"a genotype must be a JSON object, got {type(data).__name__}")
    if data.get("kind", _KIND) != _KIND:
        raise ValueError(f"not a plain DARTS genotype: kind {data['kind']!r} (expected {_KIND!r})")
    missing = [f for f in _FIELDS if f not in data]
    unknown = sorted(set(data) - {*_FIELDS, "kind"})
    if missing or unknown:
        raise ValueError(f"genotype JSON: missing fields {missing}, unknown fields {unknown}")
    return validate_genotype(tuple(data[f] for f in _FIELDS), primitives)


def save_genotype(genotype: Genotype, path: str | Path) -> None:
    Path(path).write_text(json.dumps(genotype_to_dict(genotype), indent=1) + "\n")


def load_genotype(path: str | Path, primitives: Sequence[str] | None = None) -> Genotype:
    return genotype_from_dict(json.loads(Path(path).read_text()), primitives)


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


def derive_genotype(
    alphas_normal: torch.Tensor,
    alphas_reduce: torch.Tensor,
    primitives: Sequence[str] = PRIMITIVES,
    steps: int = 4,
    multiplier: int = 4,
) -> Genotype:
    """The official discrete cell from α (softmax over operations, then :func:`_parse_cell`); the output
    concatenates the last ``multiplier`` nodes."""
    expected = (num_edges(steps), len(primitives))
    for name, alphas in (("alphas_normal", alphas_normal), ("alphas_reduce", alphas_reduce)):
        if tuple(alphas.shape) != expected:
            raise ValueError(
                f"{name} has shape {tuple(alphas.shape)}, the cell needs {expected}: "
                f"{expected[0]} edges for {steps} nodes x {expected[1]} operations"
            )
    if all(name == "none" for name in primitives):
        raise ValueError("the search space has no operation other than 'none' to derive a cell from")
    normal = _parse_cell(torch.softmax(alphas_normal.detach(), -1).tolist(), primitives, steps)
    reduce = _parse_cell(torch.softmax(alphas_reduce.detach(), -1).tolist(), primitives, steps)
    concat = list(range(2 + steps - multiplier, steps + 2))
    return Genotype(normal, concat, reduce, list(concat))
