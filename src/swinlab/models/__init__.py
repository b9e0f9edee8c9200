"""Model families; importing this package registers every variant with :mod:`swinlab.models.registry`."""

from swinlab.models import swin
from swinlab.models.registry import create_model, list_models, model_meta, register_model
from swinlab.models.swin import SwinTransformerV2

__all__ = ["SwinTransformerV2", "create_model", "list_models", "model_meta", "register_model", "swin"]
from swinlab.models import alexnet, gpt, resnet, video_swin  # noqa: F401  (registers the CNN, GPT and Video Swin variants)
