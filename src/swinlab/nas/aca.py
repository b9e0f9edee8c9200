"""ACA (Li, Ning, Hu, He; arXiv 2204.04681): search without ``skip_connect``, then give each chosen operation only the
channels it needs and refill the rest with identity when the cell is evaluated, so skip is searched implicitly.

Only the paper's abstract is readable and there is no official code: the importance score, the allocation rule and
the refill layout below are **this toolkit's choices**, made to fit the abstract's constraints (no new indicator,
prior or hyper-parameter; plugs into DARTS variants), not the paper's method as published. Each is a strategy object
with its alternatives beside it:

* search space: :data:`~swinlab.nas.genotypes.ACA_PRIMITIVES` (the DARTS operations without ``skip_connect``);
* channel importance, measured per edge of every cell on the output of its mixed operation (the part α weighs; under
  PC-DARTS the ``C / K`` channels that go through it) over a pass of held-out data with the super-net in eval mode:
  :class:`MagnitudeImportance` (default: mean ``|o_c|``) or :class:`TaylorImportance` (``|Σ_hw o_c · ∂L/∂o_c|``);
* allocation, from quantities the search already learned: :class:`MassAllocation` (default: the fewest most
  important channels whose share of the edge's importance reaches the edge's non-``none`` weight ``1 - w_none``) or
  :class:`AlphaAllocation` (keep ``1 - w_none`` of the channels, importance unused). The kept fraction of an edge
  is the mean over the cells that share its α;
* the result is an :class:`~swinlab.nas.genotypes.AcaGenotype` (``(operation, input, keep)`` per edge), built by the
  evaluation networks with :class:`~swinlab.nas.model_eval.AcaEdge` (the operation on the leading
  :func:`~swinlab.nas.model_eval.kept_channels`, identity or FactorizedReduce on the rest). The eval network is
  trained from scratch, so what transfers from the search is the fraction, not the channel indices.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from swinlab.nas.genotypes import AcaGenotype, num_edges
from swinlab.nas.model_search import MixedOp, SearchNetwork

EdgeScores = dict[str, list[list[torch.Tensor]]]
"""``scores[cell_kind][edge]``: one per-channel importance vector per cell of that kind (``normal``, ``reduce``)."""


class ChannelImportance:
    """How much each channel of a mixed edge's output matters: a per-batch sum over samples, averaged over the
    measured samples by :func:`measure_importance`."""

    name = ""
    needs_grad = False
    """Whether :meth:`score` needs ``∂L/∂output`` (a backward pass per batch)."""

    def score(self, output: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class MagnitudeImportance(ChannelImportance):
    """Mean absolute activation of each channel (over positions, summed over samples): the default."""

    name = "magnitude"

    def score(self, output: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        return output.detach().abs().mean((2, 3)).sum(0)


class TaylorImportance(ChannelImportance):
    """First-order Taylor estimate of the loss change when a channel is zeroed, ``|Σ_hw o_c · ∂L/∂o_c|`` per sample
    (``L`` the summed loss), summed over samples."""

    name = "taylor"
    needs_grad = True

    def score(self, output: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
        if grad is None:
            raise ValueError("the Taylor importance needs the gradient of the loss with respect to the edge output")
        return (output.detach() * grad).sum((2, 3)).abs().sum(0)


class ChannelAllocation:
    """How many of an edge's channels its operation keeps, as a fraction, from the importance of the channels and
    the edge's non-``none`` weight ``mass = 1 - softmax(α_e)[none]``."""

    name = ""

    def keep(self, scores: torch.Tensor, mass: float) -> float:
        raise NotImplementedError


class MassAllocation(ChannelAllocation):
    """The fewest most important channels whose share of the edge's total importance reaches ``mass``: the default.
    An edge whose importance is all zero keeps every channel."""

    name = "mass"

    def keep(self, scores: torch.Tensor, mass: float) -> float:
        total = scores.sum()
        if not total > 0:
            return 1.0
        share = (scores.sort(descending=True).values / total).double().cumsum(0)
        k = int((share < mass - 1e-9).sum()) + 1
        return min(k, scores.numel()) / scores.numel()


class AlphaAllocation(ChannelAllocation):
    """``mass`` itself: the edge keeps the fraction of channels that α gives to operations other than ``none``."""

    name = "alpha"

    def keep(self, scores: torch.Tensor, mass: float) -> float:
        return mass


IMPORTANCE: dict[str, type[ChannelImportance]] = {c.name: c for c in (MagnitudeImportance, TaylorImportance)}
ALLOCATION: dict[str, type[ChannelAllocation]] = {c.name: c for c in (MassAllocation, AlphaAllocation)}


def importance_strategy(name: str) -> ChannelImportance:
    if name not in IMPORTANCE:
        raise ValueError(f"unknown channel importance {name!r}; known: {', '.join(IMPORTANCE)}")
    return IMPORTANCE[name]()


def allocation_strategy(name: str) -> ChannelAllocation:
    if name not in ALLOCATION:
        raise ValueError(f"unknown channel allocation {name!r}; known: {', '.join(ALLOCATION)}")
    return ALLOCATION[name]()


def _mixed_part(edge: nn.Module) -> nn.Module:
    """The MixedOp inside a search edge (the edge itself in DARTS, the wrapped one in PC-DARTS)."""
    found = next((m for m in edge.modules() if isinstance(m, MixedOp)), None)
    if found is None:
        raise TypeError(f"a search edge without a MixedOp inside: {type(edge).__name__}")
    return found


def measure_importance(
    net: SearchNetwork,
    loader: Iterable[Any],
    importance: ChannelImportance | None = None,
    max_batches: int | None = None,
) -> EdgeScores:
    """Per-channel importance of every mixed edge of every cell, averaged over the samples of ``loader`` (``(images,
    labels)`` batches; the first ``max_batches`` only, if given), with ``net`` in eval mode (BN running statistics, no
    state changed). Under ``torch.distributed`` every rank measures its own shard and the average is over the samples
    of all ranks (a collective: call it on every rank, each with at least one batch)."""
    importance = importance or MagnitudeImportance()
    device = next(net.parameters()).device
    # (cell kind, edge index, the edge's MixedOp) for every edge of every cell
    edges = [
        ("reduce" if cell.reduction else "normal", e, _mixed_part(op))
        for cell in net.cells
        for e, op in enumerate(cell._ops)
    ]
    outputs: dict[int, torch.Tensor] = {}
    sums: dict[int, torch.Tensor] = {}
    hooks = [
        mixed.register_forward_hook(lambda m, args, out, key=key: outputs.__setitem__(key, out))
        for key, (_, _, mixed) in enumerate(edges)
    ]
    was_training = net.training
    net.eval()
    samples = 0
    try:
        for b, (images, labels) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            images, labels = images.to(device), labels.to(device)
            grads: Sequence[torch.Tensor | None] = [None] * len(edges)
            with torch.set_grad_enabled(importance.needs_grad):
                loss = net._loss(images, labels)
                if importance.needs_grad:  # of the summed loss: per-sample scores not scaled by the batch size
                    grads = torch.autograd.grad(loss * labels.numel(), [outputs[k] for k in range(len(edges))])
            for key in range(len(edges)):
                s = importance.score(outputs[key], grads[key]).double()
                sums[key] = s if key not in sums else sums[key] + s
            samples += labels.numel()
            outputs.clear()
    finally:
        for hook in hooks:
            hook.remove()
        net.train(was_training)
    if not samples:
        raise ValueError("measuring channel importance needs at least one batch of data")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        keys = range(len(edges))
        packed = torch.cat([*(sums[k] for k in keys), torch.tensor([samples], dtype=torch.float64, device=device)])
        dist.all_reduce(packed)
        sums = dict(zip(keys, packed[:-1].split([len(sums[k]) for k in keys]), strict=True))
        samples = packed[-1].item()
    scores: EdgeScores = {kind: [[] for _ in range(num_edges(net._steps))] for kind in ("normal", "reduce")}
    for key, (kind, e, _) in enumerate(edges):
        scores[kind][e].append((sums[key] / samples).float())
    return scores


def derive_aca_genotype(
    net: SearchNetwork, scores: EdgeScores, allocation: ChannelAllocation | None = None
) -> AcaGenotype:
    """The ACA genotype: the super-net's derived cell (its own rule: DARTS's, or PC-DARTS's with β), each chosen edge
    keeping the mean over its cells of ``allocation``'s fraction."""
    if "skip_connect" in net.primitives:
        raise ValueError(
            "ACA searches without skip_connect (model.kwargs.primitives: aca); this super-net's search space has it"
        )
    allocation = allocation or MassAllocation()
    E = num_edges(net._steps)
    for kind in ("normal", "reduce"):
        if len(scores.get(kind, ())) != E or not all(scores[kind]):
            raise ValueError(f"channel importance of the {kind} cell: expected scores for {E} edges from every cell")
    plain = net.genotype()
    none = net.primitives.index("none") if "none" in net.primitives else None
    cells = []
    for kind, pairs, alphas in (
        ("normal", plain.normal, net.alphas_normal),
        ("reduce", plain.reduce, net.alphas_reduce),
    ):
        weights = torch.softmax(alphas.detach().double(), -1)
        entries = []
        for n, (name, j) in enumerate(pairs):
            e = num_edges(n // 2) + j  # edges of the earlier nodes, then the input
            mass = 1.0 if none is None else 1.0 - weights[e, none].item()
            fractions = [allocation.keep(s, mass) for s in scores[kind][e]]
            entries.append((name, j, sum(fractions) / len(fractions)))
        cells.append(entries)
    return AcaGenotype(cells[0], plain.normal_concat, cells[1], plain.reduce_concat)


def aca_genotype(
    net: SearchNetwork,
    loader: Iterable[Any],
    importance: str = "magnitude",
    allocation: str = "mass",
    max_batches: int | None = None,
) -> AcaGenotype:
    """:func:`measure_importance` then :func:`derive_aca_genotype`, strategies by name."""
    scores = measure_importance(net, loader, importance_strategy(importance), max_batches)
    return derive_aca_genotype(net, scores, allocation_strategy(allocation))


__all__ = [
    "ALLOCATION",
    "IMPORTANCE",
    "AlphaAllocation",
    "ChannelAllocation",
    "ChannelImportance",
    "EdgeScores",
    "MagnitudeImportance",
    "MassAllocation",
    "TaylorImportance",
    "aca_genotype",
    "allocation_strategy",
    "derive_aca_genotype",
    "importance_strategy",
    "measure_importance",
]
