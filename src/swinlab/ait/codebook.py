"""Vector quantisers of AiT's tokenizers: nearest-code search, straight-through latents, commitment loss, and the
codebook's learning rule (an EMA of assigned encoder outputs, or a learned embedding when the decay is 0).

Faithful to the official ``VectorQuantizerEMA`` / ``VectorQuantizer`` (SwinTransformer/AiT ``vae/models/VQVAE.py``):
the same buffer names (``_embedding``, ``_ema_cluster_size``, ``_ema_w``; ``_embedding.weight`` for the learned
codebook), the same distance expansion (so near ties resolve to the same id), ids and losses from the codebook as
it was *before* the step's EMA update, Laplace-smoothed cluster sizes.

Beyond the official code, for codebook health: per-batch usage, a data-driven initialisation (the official
independent N(0,1) draws of codebook and EMA sums make every code unused in the first step jump to ~1e5 and stay
unreachable), and reseeding of codes whose EMA cluster size fell below a threshold from the batch's encoder
outputs.

Under ``torch.distributed`` (DDP) the EMA learns from the whole global batch: each step's per-code counts and sums
are all-reduced over the ranks before the update, and the codes a rank samples (data initialisation, reseeding)
are rank 0's, so every rank holds the same codebook without a buffer broadcast. (The official script turns DDP's
buffer broadcast off and lets each GPU's codebook drift on its own shard.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

CODEBOOK_INITS = ("official", "data")


def _full_precision(z: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``z``'s device (the meta device, where ``swinlab info`` measures, has no autocast)."""
    return contextlib.nullcontext() if z.device.type == "meta" else torch.autocast(z.device.type, enabled=False)


def _world() -> int:
    """Ranks the codebook statistics are shared over (1 outside an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _summed_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (``t`` itself on one process)."""
    if _world() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _rank0s(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (``t`` itself on one process)."""
    if _world() > 1:
        dist.broadcast(t, src=0)
    return t


@dataclass
class Quantized:
    """What one quantiser call gives: ``latents`` (B, D, h, w) straight-through (value = codes, gradient = identity
    to the encoder output), ``ids`` (B, h, w) int64, the quantiser's ``loss``, ``perplexity`` and ``usage``
    (fraction of codes used in the batch), and ``reseeded`` (codes replaced in this step)."""

    latents: torch.Tensor
    ids: torch.Tensor
    loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor
    reseeded: int = 0


class _Quantizer(nn.Module):
    """Shared search and statistics; subclasses own the codebook tensor and its learning rule."""

    def __init__(self, num_codes: int, dim: int, commitment: float) -> None:
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"a codebook needs at least one code of at least one dimension, got {num_codes} x {dim}")
        if commitment < 0:
            raise ValueError(f"commitment cost must be >= 0, got {commitment}")
        self.num_codes, self.dim, self.commitment = num_codes, dim, commitment

    @property
    def codebook(self) -> torch.Tensor:
        """The ``(K, D)`` code vectors."""
        raise NotImplementedError

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes to the rows of ``flat`` (N, D), by the official expansion
        ``|z|² + |e|² − 2 z·eᵀ`` (ties go to the lowest id)."""
        codes = self.codebook
        distances = (flat**2).sum(1, keepdim=True) + (codes**2).sum(1) - 2 * flat @ codes.t()
        return distances.argmin(1)

    def ids(self, z: torch.Tensor) -> torch.Tensor:
        """Ids ``(B, h, w)`` of encoder outputs ``z`` (B, D, h, w); no state changes. Searched in the codebook's
        dtype with autocast off, as in :meth:`forward`."""
        b, _, h, w = z.shape
        with _full_precision(z):
            flat = z.to(self.codebook.dtype).permute(0, 2, 3, 1).reshape(-1, self.dim)
            return self.nearest(flat).view(b, h, w)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``ids`` (B, h, w) as a latent map ``(B, D, h, w)``."""
        return self.codebook[ids].permute(0, 3, 1, 2).contiguous()

    def embed_soft(self, probs: torch.Tensor) -> torch.Tensor:
        """Probability-weighted code mixtures: ``probs`` (B, K, h, w) over the codes -> latent map
        ``(B, D, h, w)`` (in the channels-last memory the contraction leaves, as in the official head)."""
        return torch.einsum("bkhw,kd->bdhw", probs, self.codebook)

    def _losses(self, codes: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _learn(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> int:
        """The codebook's training-mode update after the search; returns the number of reseeded codes."""
        return 0

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantise ``z`` (B, D, h, w). Under autocast (bf16 runs) the search, the losses and the codebook's
        statistics still run in the codebook's dtype: low-precision distances would tie codes and low-precision EMA
        sums would drift (and a bf16 ``index_add_`` into the fp32 buffers is refused)."""
        with _full_precision(z):
            return self._quantize(z.to(self.codebook.dtype))

    def _quantize(self, z: torch.Tensor) -> Quantized:
        b, d, h, w = z.shape
        if d != self.dim:
            raise ValueError(f"encoder output has {d} channels but the codebook vectors have {self.dim}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        learn = self.training and flat.device.type != "meta"  # the meta device (shapes only) has no data to learn
        if learn:
            self._before_search(flat.detach())
        ids = self.nearest(flat)
        codes = F.embedding(ids, self.codebook)
        loss = self._losses(codes, flat)
        ones = torch.ones_like(ids, dtype=flat.dtype)
        counts = torch.zeros(self.num_codes, dtype=flat.dtype, device=flat.device).index_add_(0, ids, ones)
        reseeded = self._learn(flat.detach(), ids, counts) if learn else 0
        straight = flat + (codes - flat).detach()
        probs = counts / ids.numel()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (counts > 0).sum().to(flat.dtype) / self.num_codes
        latents = straight.view(b, h, w, d).permute(0, 3, 1, 2).contiguous()
        return Quantized(latents, ids.view(b, h, w), loss, perplexity, usage, reseeded)

    def _before_search(self, flat: torch.Tensor) -> None:
        """Training-mode hook before the search (a lazy data-driven initialisation)."""


class EMACodebook(_Quantizer):
    """Codebook learnt as an exponential moving average of the encoder outputs assigned to each code (the official
    ``VectorQuantizerEMA``). Its loss is the commitment term ``β·|z − sg(e)|²`` only.

    ``init='official'`` draws codebook and EMA sums independently from N(0, 1) with zero cluster sizes;
    ``init='data'`` leaves them zero and, at the first training call of a never-updated codebook (all cluster
    sizes 0), sets every code to a random encoder output of the batch with cluster size 1. ``dead_threshold > 0``
    reseeds, after each update, the codes whose EMA cluster size is below it from the batch's encoder outputs.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        commitment: float = 0.25,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        init: str = "official",
        dead_threshold: float = 0.0,
    ) -> None:
        super().__init__(num_codes, dim, commitment)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if init not in CODEBOOK_INITS:
            raise ValueError(f"codebook init must be one of {CODEBOOK_INITS}, got {init!r}")
        if dead_threshold < 0:
            raise ValueError(f"dead-code threshold must be >= 0, got {dead_threshold}")
        self.decay, self.epsilon, self.init, self.dead_threshold = decay, epsilon, init, dead_threshold
        draw = torch.randn if init == "official" else torch.zeros
        self.register_buffer("_embedding", draw(num_codes, dim))
        self.register_buffer("_ema_cluster_size", torch.zeros(num_codes))
        self.register_buffer("_ema_w", draw(num_codes, dim))

    @property
    def codebook(self) -> torch.Tensor:
        return self._embedding

    def _losses(self, codes: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return self.commitment * F.mse_loss(codes.detach(), flat)

    def _sample(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` rows of ``flat``, distinct when there are enough (global torch RNG); rank 0's under DDP."""
        rows = torch.randperm(len(flat), device=flat.device)[:n] if n <= len(flat) else None
        if rows is None:
            rows = torch.randint(len(flat), (n,), device=flat.device)
        return _rank0s(flat[rows].contiguous())

    @torch.no_grad()
    def _before_search(self, flat: torch.Tensor) -> None:
        if self.init == "data" and not self._ema_cluster_size.any():
            self._embedding.copy_(self._sample(flat, self.num_codes))
            self._ema_w.copy_(self._embedding)
            self._ema_cluster_size.fill_(1.0)

    @torch.no_grad()
    def _learn(self, flat: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> int:
        g, eps, k = self.decay, self.epsilon, self.num_codes
        counts = _summed_over_ranks(counts)
        size = self._ema_cluster_size * g + (1 - g) * counts
        n = size.sum()
        size = (size + eps) / (n + k * eps) * n  # Laplace smoothing: no code's size reaches 0
        sums = _summed_over_ranks(torch.zeros_like(self._ema_w).index_add_(0, ids, flat))
        ema_w = self._ema_w * g + (1 - g) * sums
        self._ema_cluster_size.copy_(size)
        self._ema_w.copy_(ema_w)
        self._embedding.copy_(ema_w / size.unsqueeze(1))
        if self.dead_threshold <= 0:
            return 0
        dead = (size < self.dead_threshold).nonzero().squeeze(1)
        if len(dead):
            fresh = self._sample(flat, len(dead))
            self._embedding[dead] = fresh
            self._ema_cluster_size[dead] = self.dead_threshold
            self._ema_w[dead] = fresh * self.dead_threshold
        return len(dead)

    def live_codes(self, threshold: float = 1.0) -> int:
        """Codes whose EMA cluster size is at least ``threshold`` (a running view of usage)."""
        return int((self._ema_cluster_size >= threshold).sum())


class LearnedCodebook(_Quantizer):
    """Codebook as an ``nn.Embedding`` trained by the codebook loss ``|sg(z) − e|²`` plus the commitment term (the
    official ``VectorQuantizer``, selected by ``ema_decay=0``; uniform ±1/K init)."""

    def __init__(self, num_codes: int, dim: int, commitment: float = 0.25) -> None:
        super().__init__(num_codes, dim, commitment)
        self._embedding = nn.Embedding(num_codes, dim)
        nn.init.uniform_(self._embedding.weight, -1 / num_codes, 1 / num_codes)

    @property
    def codebook(self) -> torch.Tensor:
        return self._embedding.weight

    def _losses(self, codes: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(codes, flat.detach()) + self.commitment * F.mse_loss(codes.detach(), flat)
