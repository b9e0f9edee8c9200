"""AiT's auxiliary loss through the frozen tokenizer's decoder: the solver's code logits are soft-decoded
(differentiably) and compared with the label, so gradient reaches the solver from the label space itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swinlab.ait.tokenizer import SoftVQVAE, _si_log

__all__ = ["aux_loss", "dice_loss", "freeze_tokenizer"]


def freeze_tokenizer(tokenizer: SoftVQVAE) -> SoftVQVAE:
    """Eval mode and no gradients for its parameters: the tokenizer is a fixed helper of the solver's task (its
    decoder still passes gradient to the logits fed into it)."""
    tokenizer.eval()
    tokenizer.requires_grad_(False)
    return tokenizer


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over masks of ``1 − (2 Σ p·t + s) / (Σ p + Σ t + s)`` (one mask per leading index), the prediction
    clipped to [0, 1] first as officially (a decoded soft mask may overshoot)."""
    p, t = pred.clamp(0, 1).flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def aux_loss(
    tokenizer: SoftVQVAE, code_logits: torch.Tensor, target: torch.Tensor, tau: float | None = None
) -> torch.Tensor:
    """The decoder loss of AiT on ``decode_soft(code_logits, tau)`` (``code_logits`` ``(B, N, K)``):
    depth tokenizers — SILog (λ = 0.5) on pixels whose target is > 0, prediction clipped at 1e-3 (official);
    mask tokenizers — dice + MSE against the ``(B, H, W)`` / ``(B, 1, H, W)`` masks."""
    if tokenizer.training or any(p.requires_grad for p in tokenizer.parameters()):
        raise RuntimeError("the tokenizer of the auxiliary loss must be frozen: call freeze_tokenizer(tokenizer)")
    pred = tokenizer.decode_soft(code_logits, tau)[:, 0].float()
    target = (target[:, 0] if target.ndim == 4 else target).float()
    if target.shape != pred.shape:
        raise ValueError(f"auxiliary-loss target {tuple(target.shape)} does not match the decoded {tuple(pred.shape)}")
    if tokenizer.kind == "depth":
        valid = target > 0
        if not valid.any():
            raise ValueError("auxiliary depth loss: the target has no valid (> 0) pixel")
        return _si_log(pred.clamp_min(1e-3), target, valid)
    return dice_loss(pred, target) + F.mse_loss(pred, target)
