"""Differentiable architecture search: DARTS as the official code computes it (quark0/darts), PC-DARTS's partial
channels, and ACA's channel allocation.

Operations (:mod:`~swinlab.nas.operations`), genotypes (:mod:`~swinlab.nas.genotypes`), the search super-net and
its architect (:mod:`~swinlab.nas.model_search`, :mod:`~swinlab.nas.architect`; on the CPU the cells run the edges
reading the same states together, with the same numbers: :mod:`~swinlab.nas.stacked_cell`), the evaluation networks
(:mod:`~swinlab.nas.model_eval`), PC-DARTS (:mod:`~swinlab.nas.pc`) and ACA (:mod:`~swinlab.nas.aca`). Importing
the package registers ``darts_v2_cifar``, ``darts_v2_imagenet``, ``darts_cifar`` and ``darts_search``.
"""

from swinlab.nas import genotypes
from swinlab.nas.aca import (
    AlphaAllocation,
    ChannelAllocation,
    ChannelImportance,
    MagnitudeImportance,
    MassAllocation,
    TaylorImportance,
    aca_genotype,
    derive_aca_genotype,
    measure_importance,
)
from swinlab.nas.architect import Architect
from swinlab.nas.genotypes import (
    ACA_PRIMITIVES,
    PRIMITIVES,
    AcaGenotype,
    Genotype,
    aca_from_plain,
    derive_genotype,
    load_aca_genotype,
    load_genotype,
    read_genotype,
    save_genotype,
)
from swinlab.nas.model_eval import AcaEdge, NetworkCIFAR, NetworkImageNet, kept_channels
from swinlab.nas.model_search import MixedOp, Network, SearchNetwork
from swinlab.nas.operations import OPS, use_fast_convolutions
from swinlab.nas.pc import PartialMixedOp, channel_shuffle, edge_weights, partial_channels

__all__ = [
    "ACA_PRIMITIVES",
    "OPS",
    "PRIMITIVES",
    "AcaEdge",
    "AcaGenotype",
    "AlphaAllocation",
    "Architect",
    "ChannelAllocation",
    "ChannelImportance",
    "Genotype",
    "MagnitudeImportance",
    "MassAllocation",
    "MixedOp",
    "Network",
    "NetworkCIFAR",
    "NetworkImageNet",
    "PartialMixedOp",
    "SearchNetwork",
    "TaylorImportance",
    "aca_from_plain",
    "aca_genotype",
    "channel_shuffle",
    "derive_aca_genotype",
    "derive_genotype",
    "edge_weights",
    "genotypes",
    "kept_channels",
    "load_aca_genotype",
    "load_genotype",
    "measure_importance",
    "partial_channels",
    "read_genotype",
    "save_genotype",
    "use_fast_convolutions",
]
