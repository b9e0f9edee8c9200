"""Self-supervised pre-training of the toolkit's models (SimMIM for Swin V2)."""

from swinlab.pretrain.simmim import MaskGenerator, SimMIM, normalize_targets, simmim_loss

__all__ = ["MaskGenerator", "SimMIM", "normalize_targets", "simmim_loss"]
