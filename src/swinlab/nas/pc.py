"""PC-DARTS (Xu et al. 2020): partial channel connections and edge normalisation, as parts the DARTS super-net takes.

* :class:`PartialMixedOp` sends ``1/K`` of an edge's channels (the leading ones) through a mixed operation built for
  ``C // K`` channels and lets the rest bypass it (max-pooled 2 x 2 on a reducing edge), then shuffles the channels
  in ``K`` groups so the next edge samples other ones. With ``K = 1`` it is the mixed operation itself.
* :func:`edge_weights` is the edge normalisation: one weight ``β`` per edge, softmax over the edges entering the
  same node; a node sums ``β_e · edge_e(x)``, and the derivation ranks edges by ``softmax(α_e) · β_e``.

How the official code (yuhuixu1993/PC-DARTS) computes it; the super-net gets these through
``SearchNetwork(mixed_op=partial_channels(K, MixedOp), edge_normalization=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave ``groups`` equal channel blocks: channel ``g * n + i`` moves to ``i * groups + g``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class PartialMixedOp(nn.Module):
    """A mixed operation on the first ``C // K`` channels of its input; the other channels bypass it.

    ``mixed`` is any module ``mixed(x, weights)`` built for ``C // K`` channels at ``stride`` (normally a
    :class:`~swinlab.nas.model_search.MixedOp`): it is wrapped, not re-implemented, so a faster MixedOp serves
    both variants."""

    def __init__(self, mixed: nn.Module, k: int, stride: int) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"partial channels: K must be a positive integer, got {k}")
        self.mixed = mixed
        self.k = k
        self.stride = stride
        self.register_load_state_dict_pre_hook(_official_keys)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        C = x.shape[1]
        if C % self.k:
            raise ValueError(f"partial channels: {C} channels do not split into K={self.k} equal groups")
        part = self.mixed(x[:, : C // self.k], weights)
        if self.k == 1:
            return part
        rest = x[:, C // self.k :]
        if self.stride > 1:
            rest = F.max_pool2d(rest, 2, 2)
        return channel_shuffle(torch.cat([part, rest], dim=1), self.k)


def _official_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Official PC-DARTS state dicts name an edge's operations ``<edge>._ops.<i>...`` (its MixedOp holds them
    itself); here they sit in the wrapped mixed operation, ``<edge>.mixed._ops.<i>...``: rename, so that official
    search checkpoints load as they are."""
    for key in [k for k in state_dict if k.startswith(prefix + "_ops.")]:
        state_dict[prefix + "mixed." + key[len(prefix) :]] = state_dict.pop(key)


MixedOpFactory = Callable[[int, int, Sequence[str]], nn.Module]
"""``factory(C, stride, primitives)``: the module of one search edge, called as ``edge(x, weights)``."""


def partial_channels(k: int, inner: MixedOpFactory) -> MixedOpFactory:
    """The factory of PC-DARTS edges: ``inner`` built for ``C // k`` channels inside a :class:`PartialMixedOp`."""

    def build(C: int, stride: int, primitives: Sequence[str]) -> PartialMixedOp:
        if C % k:
            raise ValueError(f"partial channels: a cell of {C} channels does not split into K={k} equal groups")
        return PartialMixedOp(inner(C // k, stride, primitives), k, stride)

    return build


def edge_weights(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-node softmax of ``betas`` (one entry per edge, node ``i`` owning the next ``i + 2``), concatenated in edge
    order."""
    sizes = [2 + i for i in range(steps)]
    if betas.dim() != 1 or betas.shape[0] != sum(sizes):
        raise ValueError(
            f"β has shape {tuple(betas.shape)}, the cell needs ({sum(sizes)},): one weight per edge of {steps} nodes"
        )
    return torch.cat([torch.softmax(b, dim=-1) for b in betas.split(sizes)])


__all__ = ["MixedOpFactory", "PartialMixedOp", "channel_shuffle", "edge_weights", "partial_channels"]
