"""swinlab: Swin Transformer V2 and its neighbours as one tested PyTorch toolkit."""

from swinlab import nas  # noqa: F401  (registers the DARTS evaluation networks with the model registry)
from swinlab.models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
__version__ = "0.2.0"
