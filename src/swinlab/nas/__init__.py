"""Differentiable architecture search: DARTS as the official code computes it (quark0/darts).

Operations (:mod:`~swinlab.nas.operations`), genotypes (:mod:`~swinlab.nas.genotypes`), the search super-net and
its architect (:mod:`~swinlab.nas.model_search`, :mod:`~swinlab.nas.architect`), the evaluation networks
(:mod:`~swinlab.nas.model_eval`). Importing the package registers ``darts_v2_cifar`` and ``darts_v2_imagenet``.
"""

from swinlab.nas import genotypes
from swinlab.nas.architect import Architect
from swinlab.nas.genotypes import PRIMITIVES, Genotype, derive_genotype, load_genotype, save_genotype
from swinlab.nas.model_eval import NetworkCIFAR, NetworkImageNet
from swinlab.nas.model_search import MixedOp, Network, SearchNetwork
from swinlab.nas.operations import OPS

__all__ = [
    "OPS",
    "PRIMITIVES",
    "Architect",
    "Genotype",
    "MixedOp",
    "Network",
    "NetworkCIFAR",
    "NetworkImageNet",
    "SearchNetwork",
    "derive_genotype",
    "genotypes",
    "load_genotype",
    "save_genotype",
]
