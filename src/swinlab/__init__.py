"""swinlab: Swin Transformer V2 and its neighbours as one tested PyTorch toolkit."""

from swinlab import ait, nas  # noqa: F401  (register AiT's tokenizers and the DARTS evaluation networks as models)
from swinlab.models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
__version__ = "0.2.0"
