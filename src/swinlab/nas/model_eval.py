"""DARTS evaluation networks: cells built from a genotype, stacked for CIFAR or ImageNet, with the official
auxiliary heads, drop path and state-dict key names (official checkpoints load with ``strict=True``).

Both networks also build an :class:`~swinlab.nas.genotypes.AcaGenotype`: an edge that keeps a fraction of its
channels becomes an :class:`AcaEdge`, one that keeps them all is the plain operation, so a plain genotype and its
all-kept ACA form give the same modules, keys and outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from swinlab.models.registry import register_model
from swinlab.nas.genotypes import (
    DARTS_V2,
    PUBLISHED,
    AcaGenotype,
    Genotype,
    read_genotype,
    validate_aca_genotype,
    validate_genotype,
)
from swinlab.nas.operations import OPS, FactorizedReduce, ReLUConvBN, stack_cells


def drop_path(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero a random ``p`` fraction of the samples of an edge output, in place, as ``(x / keep) * mask``.

    Not :func:`swinlab.layers.drop.drop_path` (``x * (mask / keep)``): this rounding order and the same draw from the
    global generator make the training logits bit-identical to the official code's."""
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
    return x.div_(keep).mul_(mask)


def kept_channels(keep: float, C: int, reducing: bool) -> int:
    """The channels an ACA edge of ``C`` channels runs its operation on: ``keep * C`` rounded to the nearest count
    in ``1..C`` (halves up), on a reducing edge among those leaving an even remainder, which the identity's
    FactorizedReduce needs. A choice of this toolkit (ACA's rule is not published)."""
    allowed = [k for k in range(1, C + 1) if not reducing or (C - k) % 2 == 0]
    return min(allowed, key=lambda k: (abs(k - keep * C), -k))


class AcaEdge(nn.Module):
    """An ACA edge: the operation on the first ``k`` channels, the other ``C - k`` passed as identity (on a reducing
    edge a FactorizedReduce, the strided skip), concatenated back in place.

    Drop path acts on the operation's part only (never on an identity, as the official rule has it); the
    refilled part is the edge's implicit skip."""

    def __init__(self, name: str, C: int, stride: int, k: int) -> None:
        super().__init__()
        if not 0 < k < C:
            raise ValueError(f"an ACA edge keeps 1..{C - 1} of its {C} channels for its operation, got {k}")
        self.k = k
        self.op = OPS[name](k, stride, True)
        self.rest = nn.Identity() if stride == 1 else FactorizedReduce(C - k, C - k)

    def forward(self, x: torch.Tensor, drop_prob: float = 0.0) -> torch.Tensor:
        h = self.op(x[:, : self.k])
        if drop_prob > 0 and not isinstance(self.op, nn.Identity):
            h = drop_path(h, drop_prob)
        return torch.cat([h, self.rest(x[:, self.k :])], dim=1)


def _edge_module(name: str, C: int, stride: int, keep: float) -> nn.Module:
    k = kept_channels(keep, C, stride > 1)
    return OPS[name](C, stride, True) if k == C else AcaEdge(name, C, stride, k)


class EvalCell(nn.Module):
    """A discrete cell: node ``k`` sums two operations of earlier states; the output concatenates ``*_concat``.
    ``genotype`` is plain or ACA (edges that keep a fraction of their channels)."""

    def __init__(
        self,
        genotype: Genotype | AcaGenotype,
        C_prev_prev: int,
        C_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> None:
        super().__init__()
        self.preprocess0 = FactorizedReduce(C_prev_prev, C) if reduction_prev else ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        pairs, concat = (
            (genotype.reduce, genotype.reduce_concat) if reduction else (genotype.normal, genotype.normal_concat)
        )
        edges = [(entry[0], entry[1], entry[2] if len(entry) == 3 else 1.0) for entry in pairs]
        # Reduction cells stride the edges that read the cell inputs (states 0 and 1).
        self._ops = nn.ModuleList(
            _edge_module(name, C, 2 if reduction and index < 2 else 1, keep) for name, index, keep in edges
        )
        self._indices = [index for _, index, _ in edges]
        self._concat = list(concat)
        self.multiplier = len(concat)

    def _edge(self, e: int, states: list[torch.Tensor], drop_prob: float) -> torch.Tensor:
        op = self._ops[e]
        x = states[self._indices[e]]
        drop = drop_prob if self.training else 0.0
        if isinstance(op, AcaEdge):
            return op(x, drop)
        h = op(x)
        # Drop path acts on every edge but identities, in training only (the official rule).
        if drop > 0 and not isinstance(op, nn.Identity):
            h = drop_path(h, drop)
        return h

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for node in range(len(self._ops) // 2):
            states.append(self._edge(2 * node, states, drop_prob) + self._edge(2 * node + 1, states, drop_prob))
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHead(nn.Module):
    """The auxiliary classifier at 2/3 depth: pool 5 x 5, 1 x 1 conv to 128, 2 x 2 conv to 768, linear.

    CIFAR (8 x 8 input) pools with stride 3 and has a BN after the 768-channel conv; ImageNet (14 x 14) pools with
    stride 2 and has none (the official code left it out to match the paper's runs). The first ReLU is in place as
    officially: it rectifies the cell output it reads, which only changes the logits when that cell is the last."""

    def __init__(self, C: int, num_classes: int, pool_stride: int, final_bn: bool) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=pool_stride, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            *([nn.BatchNorm2d(768)] if final_bn else []),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class _EvalNetwork(nn.Module):
    """Cells after a stem, global pool, classifier; the auxiliary head reads cell ``2 * layers // 3`` in training.

    Subclasses build their stem first and then call :meth:`_build`, so modules are created (and initialised from
    the random stream) in the official order."""

    def _build(
        self,
        genotype: Genotype | AcaGenotype,
        C: int,
        num_classes: int,
        layers: int,
        auxiliary: bool,
        C_stem: int,
        stem_reduces: bool,
        global_pooling: nn.Module,
        auxiliary_head: Callable[[int], nn.Module],
    ) -> None:
        """Cells, then (official order) the auxiliary head built from its input channels, pooling, classifier."""
        genotype = validate_aca_genotype(genotype) if isinstance(genotype, AcaGenotype) else validate_genotype(genotype)
        self._layers, self._auxiliary = layers, auxiliary
        self.drop_path_prob = 0.0
        self.cells, C_prev, C_aux = stack_cells(
            lambda *shape: EvalCell(genotype, *shape), C, layers, C_stem, reduction_prev=stem_reduces
        )
        if auxiliary:
            self.auxiliary_head = auxiliary_head(C_aux)
        self.global_pooling = global_pooling
        self.classifier = nn.Linear(C_prev, num_classes)

    def _forward_cells(self, s0: torch.Tensor, s1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits_aux = None
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3 and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux


class NetworkCIFAR(_EvalNetwork):
    """DARTS evaluation network for 32 x 32 inputs: a 3 x 3 stem to ``3 C`` channels, ``layers`` cells.

    ``forward`` returns ``(logits, logits_aux)``; ``logits_aux`` is ``None`` unless training with ``auxiliary``.
    ``genotype``: plain or ACA; ``in_chans``: image channels (official: 3)."""

    def __init__(
        self,
        C: int,
        num_classes: int,
        layers: int,
        auxiliary: bool,
        genotype: Genotype | AcaGenotype,
        *,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
        aux = lambda C_aux: AuxiliaryHead(C_aux, num_classes, pool_stride=3, final_bn=True)
        self._build(genotype, C, num_classes, layers, auxiliary, 3 * C, False, nn.AdaptiveAvgPool2d(1), aux)

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.stem(input)
        return self._forward_cells(s, s)


class NetworkImageNet(_EvalNetwork):
    """DARTS evaluation network for 224 x 224 inputs: two strided stems (1/4 and 1/8 resolution), ``layers`` cells,
    the official fixed 7 x 7 average pool (so other input sizes are not supported). Returns ``(logits, logits_aux)``."""

    def __init__(
        self, C: int, num_classes: int, layers: int, auxiliary: bool, genotype: Genotype | AcaGenotype
    ) -> None:
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C),
        )
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C)
        )
        aux = lambda C_aux: AuxiliaryHead(C_aux, num_classes, pool_stride=2, final_bn=False)
        self._build(genotype, C, num_classes, layers, auxiliary, C, True, nn.AvgPool2d(7), aux)

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0 = self.stem0(input)
        return self._forward_cells(s0, self.stem1(s0))


@register_model(meta={"params": "3.3M", "source": "DARTS (Liu et al. 2019), genotype DARTS_V2, 600 epochs"})
def darts_v2_cifar(**kwargs) -> NetworkCIFAR:
    """The released DARTS CIFAR-10 network (C 36, 20 cells, auxiliary head)."""
    return NetworkCIFAR(**{"C": 36, "num_classes": 10, "layers": 20, "auxiliary": True, "genotype": DARTS_V2, **kwargs})


@register_model(meta={"params": "4.7M", "source": "DARTS (Liu et al. 2019), genotype DARTS_V2, ImageNet mobile"})
def darts_v2_imagenet(**kwargs) -> NetworkImageNet:
    """The DARTS ImageNet mobile-setting network (C 48, 14 cells, auxiliary head)."""
    return NetworkImageNet(
        **{"C": 48, "num_classes": 1000, "layers": 14, "auxiliary": True, "genotype": DARTS_V2, **kwargs}
    )


def resolve_genotype(genotype: Genotype | AcaGenotype | str) -> Genotype | AcaGenotype:
    """A genotype given as itself, a published name (``DARTS_V2``, ...), a genotype JSON file of either kind (an ACA
    search writes ``genotype_aca.json``), or a search run's folder (its latest plain ``genotype.json``)."""
    if isinstance(genotype, AcaGenotype):
        return validate_aca_genotype(genotype)
    if not isinstance(genotype, str):
        return validate_genotype(genotype)
    if genotype in PUBLISHED:
        return PUBLISHED[genotype]
    path = Path(genotype)
    if path.is_dir():
        path = path / "genotype.json"
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"genotype file {path} does not exist")
        return read_genotype(path)
    raise ValueError(
        f"genotype {genotype!r}: neither a published genotype ({', '.join(PUBLISHED)}) nor a JSON file or run folder"
    )


@register_model(meta={"source": "DARTS (Liu et al. 2019) CIFAR evaluation network from any genotype"})
def darts_cifar(
    genotype: Genotype | AcaGenotype | str = "DARTS_V2",
    C: int = 36,
    num_classes: int = 10,
    layers: int = 20,
    auxiliary: bool = True,
    in_chans: int = 3,
    img_size: int | None = None,
) -> NetworkCIFAR:
    """``NetworkCIFAR`` of ``task: darts_eval``: ``genotype`` by name, JSON file or search run folder (see
    :func:`resolve_genotype`); ``img_size`` is accepted and ignored (the auxiliary head needs 32 x 32 inputs)."""
    return NetworkCIFAR(C, num_classes, layers, auxiliary, resolve_genotype(genotype), in_chans=in_chans)
