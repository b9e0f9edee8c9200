"""AiT (All in Tokens, Ning et al. 2023): per-task VQ-VAE tokenizers with soft tokens; importing this package
registers the official tokenizer sizes with the model registry."""

from swinlab.ait.codebook import EMACodebook, LearnedCodebook, Quantized
from swinlab.ait.masking import mask_patches
from swinlab.ait.tokenizer import SoftVQVAE, official_geometry

__all__ = ["EMACodebook", "LearnedCodebook", "Quantized", "SoftVQVAE", "mask_patches", "official_geometry"]
