"""The DARTS search super-net: every edge of the cell mixes all candidate operations by softmax(α).

α is kept as two buffers, ``alphas_normal`` and ``alphas_reduce`` (leaf tensors with ``requires_grad``):

* out of ``parameters()``, as in the official code, so ``SGD(model.parameters())`` trains the weights only and
  :class:`~swinlab.nas.architect.Architect` owns α;
* in ``state_dict()``, so a checkpoint of the super-net carries the architecture;
* optional when loading: an official state dict (weights and BN statistics only) loads with ``strict=True`` and leaves
  α as it is.

A dtype or device change keeps them leaves but makes new tensors: move the model before creating the optimizer of α
(as with parameters).

Variants plug in by constructor argument, not by a copied network: ``mixed_op`` builds each edge (default
:class:`MixedOp`; PC-DARTS: :func:`~swinlab.nas.pc.partial_channels`) and ``edge_normalization`` adds PC-DARTS's
per-edge weights ``betas_normal`` / ``betas_reduce`` (kept like α).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from swinlab.models.registry import register_model
from swinlab.nas import pc, stacked_cell
from swinlab.nas.genotypes import PRIMITIVES, SEARCH_SPACES, Genotype, derive_genotype, num_edges
from swinlab.nas.operations import OPS, FactorizedReduce, ReLUConvBN, apply_pool, stack_cells, use_fast_convolutions

ALPHA_NAMES = ("alphas_normal", "alphas_reduce")
BETA_NAMES = ("betas_normal", "betas_reduce")


class MixedOp(nn.Module):
    """Σ_o w_o · o(x) over the search space; pools get a non-affine BN (the official search space).

    Bit-exact to the official sum, with less work: ``none`` adds ``w · 0`` (zeros, whose gradients are zeros) and is
    skipped; the pools take torch's faster kernels for the same numbers
    (:func:`~swinlab.nas.operations.apply_pool`, whose backward is made of differentiable ops, so higher-order
    gradients still work); everything else keeps the
    official layout and kernels (BN's channels-last statistics sum in another order)."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str] = PRIMITIVES) -> None:
        super().__init__()
        self._ops = nn.ModuleList()
        for name in primitives:
            op = OPS[name](C, stride, False)
            self._ops.append(nn.Sequential(op, nn.BatchNorm2d(C, affine=False)) if "pool" in name else op)
        self._kinds = ["none" if name == "none" else "pool" if "pool" in name else "op" for name in primitives]

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if all(kind == "none" for kind in self._kinds):
            return sum(w * op(x) for w, op in zip(weights, self._ops, strict=True))
        total = None
        for w, op, kind in zip(weights, self._ops, self._kinds, strict=True):
            if kind == "none":
                continue
            if kind == "pool":
                pool, bn = op
                out = bn(apply_pool(pool, x))
            else:
                out = op(x)
            total = w * out if total is None else total + w * out
        return total


class SearchCell(nn.Module):
    """``steps`` nodes, node ``i`` summing mixed edges from the two cell inputs and the ``i`` earlier nodes; the output
    concatenates the last ``multiplier`` nodes. Every BN is non-affine."""

    def __init__(
        self,
        steps: int,
        multiplier: int,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        primitives: Sequence[str] = PRIMITIVES,
        mixed_op: pc.MixedOpFactory | None = None,
    ) -> None:
        super().__init__()
        mixed_op = MixedOp if mixed_op is None else mixed_op
        self.reduction = reduction
        self.multiplier = multiplier
        self._steps = steps
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
        # Edge order: node 0 reads states 0, 1; node 1 reads 0, 1, 2; ... (the rows of α).
        self._ops = nn.ModuleList(
            mixed_op(C, 2 if reduction and j < 2 else 1, primitives) for i in range(steps) for j in range(2 + i)
        )

    def forward(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``weights``: the operation weights of every edge (rows of softmax(α)); ``edge_weights``: one weight per
        edge scaling its output (PC-DARTS's normalised β), or ``None``."""
        if edge_weights is None and stacked_cell.use_stacked(self, s0, s1, weights, MixedOp):
            return stacked_cell.stacked_cell_forward(self, s0, s1, weights)
        return self.forward_per_edge(s0, s1, weights, edge_weights)

    def forward_per_edge(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The official computation, edge by edge (what :meth:`forward` computes; where it can, it runs the edges
        that read the same states together, with the same numbers: :mod:`~swinlab.nas.stacked_cell`)."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        offset = 0
        for _ in range(self._steps):
            if edge_weights is None:
                node = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            else:
                node = sum(
                    edge_weights[offset + j] * self._ops[offset + j](h, weights[offset + j])
                    for j, h in enumerate(states)
                )
            states.append(node)
            offset += len(states) - 1
        return torch.cat(states[-self.multiplier :], dim=1)


class SearchNetwork(nn.Module):
    """The official search ``Network``: a 3 x 3 stem to ``stem_multiplier * C`` channels, ``layers`` search cells
    (reductions at 1/3 and 2/3), global pool, linear; one α matrix (edges x operations, init ``1e-3 · N(0, 1)``) shared
    by all normal cells and one by all reduction cells.

    ``criterion`` (default cross-entropy) gives :meth:`_loss`; ``primitives`` is the search space (default the
    official eight operations, α columns in that order); ``in_chans`` the image channels (official: 3);
    ``mixed_op`` builds each edge (default :class:`MixedOp`); ``edge_normalization`` adds one β per edge (init
    ``1e-3 · N(0, 1)``, softmax over each node's incoming edges), returned by :meth:`arch_parameters` after α."""

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
        *,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        primitives: Sequence[str] = PRIMITIVES,
        in_chans: int = 3,
        mixed_op: pc.MixedOpFactory | None = None,
        edge_normalization: bool = False,
    ) -> None:
        super().__init__()
        unknown = [name for name in primitives if name not in OPS]
        if unknown:
            raise ValueError(f"unknown operations in the search space: {unknown}; known: {', '.join(OPS)}")
        self._steps, self._multiplier = steps, multiplier
        self.primitives = list(primitives)
        self._criterion = nn.CrossEntropyLoss() if criterion is None else criterion
        C_stem = stem_multiplier * C
        self.stem = nn.Sequential(nn.Conv2d(in_chans, C_stem, 3, padding=1, bias=False), nn.BatchNorm2d(C_stem))
        self.cells, C_prev, _ = stack_cells(
            lambda *shape: SearchCell(steps, multiplier, *shape, primitives=self.primitives, mixed_op=mixed_op),
            C,
            layers,
            C_stem,
            reduction_prev=False,
        )
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_prev, num_classes)
        shape = (num_edges(steps), len(self.primitives))
        for name in ALPHA_NAMES:
            self.register_buffer(name, (1e-3 * torch.randn(shape)).requires_grad_())
        self.arch_names = ALPHA_NAMES + (BETA_NAMES if edge_normalization else ())
        """Names of the architecture buffers, in :meth:`arch_parameters` order."""
        for name in self.arch_names[len(ALPHA_NAMES) :]:
            self.register_buffer(name, (1e-3 * torch.randn(shape[0])).requires_grad_())

    def arch_parameters(self) -> list[torch.Tensor]:
        """``[alphas_normal, alphas_reduce]`` (then ``betas_normal, betas_reduce`` with edge normalisation): what
        the architecture optimizer updates."""
        return [getattr(self, name) for name in self.arch_names]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(input)
        for cell in self.cells:
            # One softmax per cell, as officially: α's gradient then sums in the official order (which the
            # finite-difference Hessian-vector product amplifies by 1 / 2R).
            weights = torch.softmax(self.alphas_reduce if cell.reduction else self.alphas_normal, dim=-1)
            s0, s1 = s1, cell(s0, s1, weights, self.edge_weights(cell.reduction))
        return self.classifier(self.global_pooling(s1).flatten(1))

    def edge_weights(self, reduction: bool) -> torch.Tensor | None:
        """The normalised β of the reduction or the normal cell, or ``None`` without edge normalisation."""
        if len(self.arch_names) == len(ALPHA_NAMES):
            return None
        return pc.edge_weights(self.betas_reduce if reduction else self.betas_normal, self._steps)

    def _loss(
        self, input: torch.Tensor, target: torch.Tensor, state: Mapping[str, torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """The criterion on the logits; ``state`` replaces weights / buffers by name for this call only (how the
        architect evaluates the unrolled and perturbed weights without copying the model). A buffer replaced by
        ``None`` is absent for the call: BN without running statistics normalises by the batch, as in training, and
        updates nothing."""
        if state is None:
            return self._criterion(self(input), target)
        with substituted(self, state):
            return self._criterion(self(input), target)

    def genotype(self) -> Genotype:
        """The official derivation (see :func:`~swinlab.nas.genotypes.derive_genotype`), operation weights scaled
        by the edge weights with edge normalisation (as PC-DARTS derives)."""
        betas = {}
        if len(self.arch_names) > len(ALPHA_NAMES):
            betas = {"betas_normal": self.betas_normal, "betas_reduce": self.betas_reduce}
        return derive_genotype(
            self.alphas_normal, self.alphas_reduce, self.primitives, self._steps, self._multiplier, **betas
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for name in self.arch_names:  # official state dicts have no α: keep ours
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def _apply(self, fn, recurse=True):
        # Buffers are converted outside no_grad, so a dtype / device change would make α a non-leaf.
        super()._apply(fn, recurse)
        for name in self.arch_names:
            alpha = self._buffers[name]
            if alpha.grad_fn is not None:
                self._buffers[name] = alpha.detach().requires_grad_()
        return self


@contextmanager
def substituted(module: nn.Module, state: Mapping[str, torch.Tensor | None]) -> Iterator[None]:
    """``module``'s parameters and buffers replaced by name while the block runs, then put back.

    What ``torch.func.functional_call`` does, without its several walks over every submodule and tensor name on each
    call, and with ``None`` allowed (the unrolled pass's BN, which must not move the model's statistics)."""
    modules = dict(module.named_modules())
    slots = []  # every name resolved before anything is swapped, so a bad name leaves the module as it was
    for name in state:
        owner_name, _, key = name.rpartition(".")
        owner = modules.get(owner_name)
        slot = None if owner is None else owner._parameters if key in owner._parameters else owner._buffers
        if slot is None or key not in slot:
            raise KeyError(f"{type(module).__name__} has no parameter or buffer {name!r}")
        slots.append((slot, key, slot[key]))
    for (slot, key, _), tensor in zip(slots, state.values(), strict=True):
        slot[key] = tensor
    try:
        yield
    finally:
        for slot, key, original in reversed(slots):
            slot[key] = original


class Network(SearchNetwork):
    """The official constructor signature (``criterion`` fourth), for ported scripts."""

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        steps: int = 4,
        multiplier: int = 4,
        stem_multiplier: int = 3,
    ) -> None:
        super().__init__(C, num_classes, layers, steps, multiplier, stem_multiplier, criterion=criterion)


@register_model(meta={"source": "DARTS (Liu et al. 2019) search super-net, CIFAR-10 search settings"})
def darts_search(
    C: int = 16,
    num_classes: int = 10,
    layers: int = 8,
    steps: int = 4,
    multiplier: int = 4,
    stem_multiplier: int = 3,
    in_chans: int = 3,
    img_size: int | None = None,
    primitives: str | Sequence[str] = "darts",
    variant: str = "darts",
    partial_channels: int = 4,
    fast_convolutions: bool = False,
) -> SearchNetwork:
    """The search super-net of ``task: darts_search`` (official search: C 16, 8 cells); ``img_size`` is accepted and
    ignored (the net pools globally).

    ``primitives``: a search space by name (``darts``: the official eight; ``aca``: without ``skip_connect``) or a
    list of operations; ``variant``: ``darts`` (every channel through every mixed edge) or ``pc`` (PC-DARTS: 1 /
    ``partial_channels`` of the channels through each edge, edge normalisation); ``fast_convolutions``: see
    :func:`~swinlab.nas.operations.use_fast_convolutions` (numbers as close to float64 as the official's but not
    equal to them; no faster than the default's stacked cells at search sizes, ``benchmarks/RESULTS.md``)."""
    if isinstance(primitives, str):
        if primitives not in SEARCH_SPACES:
            raise ValueError(f"unknown search space {primitives!r}; known: {', '.join(SEARCH_SPACES)}")
        primitives = SEARCH_SPACES[primitives]
    if variant not in ("darts", "pc"):
        raise ValueError(f"unknown DARTS variant {variant!r}; known: darts, pc")
    partial = variant == "pc"
    model = SearchNetwork(
        C,
        num_classes,
        layers,
        steps,
        multiplier,
        stem_multiplier,
        in_chans=in_chans,
        primitives=primitives,
        mixed_op=pc.partial_channels(partial_channels, MixedOp) if partial else None,
        edge_normalization=partial,
    )
    return use_fast_convolutions(model) if fast_convolutions else model
