"""Datasets in their real on-disk formats, tensor transforms, Mixup/CutMix and ``build(cfg.data)``.

Readers return uint8 CHW tensors; ``build`` adds the transform, samplers and loaders.
``fashion_mnist_embedded`` (the default) ships inside the package: a class-balanced 12,000 + 2,000 subset of
Fashion-MNIST (see embedded/).
"""

from swinlab.data.build import DATASETS, EMBEDDED_DIR, DataBundle, build
from swinlab.data.cifar import CIFAR
from swinlab.data.idx import FASHION_MNIST_CLASSES, FashionMNIST, read_idx, write_idx
from swinlab.data.imagefolder import ImageFolder
from swinlab.data.images import read_image, read_image_array
from swinlab.data.instances import CocoInstances, ProceduralInstances, collate_instances
from swinlab.data.loading import TransformedDataset, collate_skip_none
from swinlab.data.mixup import Mixup
from swinlab.data.samplers import SeededDistributedSampler, ShardSampler
from swinlab.data.transforms import ImageTransform

__all__ = [
    "CIFAR",
    "DATASETS",
    "EMBEDDED_DIR",
    "FASHION_MNIST_CLASSES",
    "CocoInstances",
    "DataBundle",
    "FashionMNIST",
    "ImageFolder",
    "ImageTransform",
    "Mixup",
    "ProceduralInstances",
    "SeededDistributedSampler",
    "ShardSampler",
    "TransformedDataset",
    "build",
    "collate_instances",
    "collate_skip_none",
    "read_idx",
    "read_image",
    "read_image_array",
    "write_idx",
]
