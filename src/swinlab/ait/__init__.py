"""AiT (All in Tokens, Ning et al. 2023): per-task VQ-VAE tokenizers with soft tokens and the
task-solver that predicts their tokens (depth maps, or objects as box, class and mask tokens); importing this package
registers the official tokenizer sizes with the model registry."""

from swinlab.ait.aux_loss import aux_loss, freeze_tokenizer
from swinlab.ait.codebook import EMACodebook, LearnedCodebook, Quantized
from swinlab.ait.masking import mask_patches
from swinlab.ait.objects import ObjectCoder, ObjectSequences, crop_masks, paste_masks
from swinlab.ait.solver import TaskSolver
from swinlab.ait.tokenizer import SoftVQVAE, official_geometry
from swinlab.ait.vocabulary import Vocabulary

__all__ = [
    "EMACodebook",
    "LearnedCodebook",
    "ObjectCoder",
    "ObjectSequences",
    "Quantized",
    "SoftVQVAE",
    "TaskSolver",
    "Vocabulary",
    "aux_loss",
    "crop_masks",
    "freeze_tokenizer",
    "mask_patches",
    "official_geometry",
    "paste_masks",
]
