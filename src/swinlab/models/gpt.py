"""GPT: a decoder-only transformer language model in the GPT-2 layout, the workload of FP8-LM.

Radford et al., *Language Models are Unsupervised Multitask Learners* (GPT-2, 2019) and Brown et al., *Language
Models are Few-Shot Learners* (GPT-3, 2020) give the architecture: pre-norm blocks (LayerNorm before attention and
before the MLP, one more after the last block), causal multi-head self-attention, a 4x GELU MLP, learned absolute
positions, and an output projection tied to the token embedding. Peng et al., *FP8-LM* (2023) train this model at
7B/13B/175B; those shapes are registered for memory and FLOP accounting (``swinlab info gpt_175b`` builds it on
the meta device). Module names follow GPT-2's (``transformer.h.0.attn.c_attn`` ...), so its checkpoints map 1:1
(GPT-2's Conv1D weights are stored transposed).

The whole model is this file, in reading order: attention, MLP, block, config, model, registered variants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from swinlab.layers.linear import Linear
from swinlab.models.registry import register_model

__all__ = ["GPT", "GPTConfig"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t sees positions <= t (SDPA's ``is_causal``: no mask tensor)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.c_attn = Linear(n_embd, 3 * n_embd, bias=bias)  # q, k, v in one GEMM
        self.c_proj = Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise 4x expansion with GELU (GPT-2 uses the tanh approximation)."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True, kw_only=True)
class GPTConfig:
    vocab_size: int = 256
    """Token ids are ``0 .. vocab_size - 1``; 256 for swinlab's byte-level text, 50257 for GPT-2's BPE."""
    block_size: int = 256
    """Longest sequence (the size of the learned position table)."""
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    """Width; ``n_embd / n_head`` is the head size. Multiples of 16 let every block linear run in FP8."""
    dropout: float = 0.0
    """On attention weights, residual branches and embeddings; 0 for pre-training as in FP8-LM's runs."""
    bias: bool = True
    """Biases in linears and LayerNorms, as GPT-2."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


class GPT(nn.Module):
    """Decoder-only transformer: ``forward(idx)`` maps token ids ``(B, T)`` to next-token logits ``(B, T, V)``.

    Initialised as GPT-2: every weight N(0, 0.02), biases 0, and the two projections that write into the
    residual stream (``attn.c_proj``, ``mlp.c_proj``) N(0, 0.02 / sqrt(2 * n_layer)), so the residual stream's
    variance does not grow with depth (2 such writes per block).
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(c.vocab_size, c.n_embd),
                "wpe": nn.Embedding(c.block_size, c.n_embd),
                "drop": nn.Dropout(c.dropout),
                "h": nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout, c.bias) for _ in range(c.n_layer)),
                "ln_f": nn.LayerNorm(c.n_embd, bias=c.bias),
            }
        )
        self.lm_head = Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one matrix reads and writes tokens
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * c.n_layer)
        for block in self.transformer.h:
            nn.init.normal_(block.attn.c_proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=residual_std)

    def fp8_high_precision(self) -> list[str]:
        """Modules ``swinlab.fp8.initialize`` keeps out of FP8 by default: the first block.

        Its input is the embedding sum itself, and its keys are mostly the learned positions, with large
        attention logits: E4M3's ~2.6 % rounding of that input moves attention mass, where every later GEMM
        is insensitive. On gpt_nano this one block makes 0.8 of the 1 % that FP8 GEMMs cost an FP32-trained
        model, and keeping it in FP32 brings O1/O2 training to FP32's loss (benchmarks/RESULTS.md, "FP8
        accuracy"). Megatron-LM's ``first_last_layers_bf16`` recipe does the same; it costs 1/n_layer of the
        FP8 GEMMs.
        """
        return ["transformer.h.0"]

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def _check_input(self, idx: torch.Tensor) -> None:
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"GPT expects integer token ids of shape (batch, time), got {idx.dtype} {tuple(idx.shape)}")
        if idx.shape[1] > self.block_size:
            raise ValueError(f"sequence of length {idx.shape[1]} is longer than block_size={self.block_size}")
        if idx.device.type != "meta" and idx.numel():  # meta tensors (shape-only accounting) carry no values
            low, high = (int(v) for v in torch.aminmax(idx))  # one pass, one host sync
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}), got values in [{low}, {high}]")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        self._check_input(idx)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue each row of ``idx`` ``(B, T)`` by ``max_new_tokens`` sampled tokens; returns ``(B, T + new)``.

        The context is cropped to the last ``block_size`` tokens. ``temperature`` divides the logits (0 picks
        the most likely token: greedy decoding); ``top_k`` keeps only the k most likely tokens. Call
        ``model.eval()`` first if the model has dropout.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.vocab_size}], got {top_k}")
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.block_size :])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt.to(idx.dtype)], dim=1)
        return idx


# -- registered variants ---------------------------------------------------------------------------------------
_SWINLAB = "swinlab: small CPU variant for byte-level text (not a paper model)"
_GPT2 = "Radford et al. 2019, GPT-2 small (124M with the 50257-token BPE vocabulary)"
_FP8LM = "Peng et al. 2023 (FP8-LM) / Brown et al. 2020 (GPT-3) shape; memory and FLOP accounting only"


def _meta(params: str, source: str) -> dict:
    return {"params": params, "source": source}


def _create(arch: dict, kwargs: dict) -> GPT:
    return GPT(GPTConfig(**{**arch, **kwargs}))


@register_model(meta=_meta("~0.1M", _SWINLAB))
def gpt_nano(**kwargs) -> GPT:
    """2 layers, width 64: the FP8 accuracy fixture (a few hundred steps in about a minute on one core)."""
    return _create(dict(n_layer=2, n_head=4, n_embd=64, block_size=128), kwargs)


@register_model(meta=_meta("~0.8M", _SWINLAB))
def gpt_micro(**kwargs) -> GPT:
    """4 layers, width 128."""
    return _create(dict(n_layer=4, n_head=4, n_embd=128, block_size=256), kwargs)


@register_model(meta=_meta("~2.7M", _SWINLAB))
def gpt_mini(**kwargs) -> GPT:
    """6 layers, width 192."""
    return _create(dict(n_layer=6, n_head=6, n_embd=192, block_size=256), kwargs)


@register_model(meta=_meta("124M", _GPT2))
def gpt2_small(**kwargs) -> GPT:
    """GPT-2 small: 12 layers, width 768, 12 heads, context 1024."""
    return _create(dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257), kwargs)


@register_model(meta=_meta("6.7B", _FP8LM))
def gpt_7b(**kwargs) -> GPT:
    """FP8-LM's GPT-7B (GPT-3 6.7B): 32 layers, width 4096, 32 heads, context 2048."""
    return _create(dict(n_layer=32, n_head=32, n_embd=4096, block_size=2048, vocab_size=50257), kwargs)


@register_model(meta=_meta("13B", _FP8LM))
def gpt_13b(**kwargs) -> GPT:
    """FP8-LM's GPT-13B: 40 layers, width 5120, 40 heads, context 2048."""
    return _create(dict(n_layer=40, n_head=40, n_embd=5120, block_size=2048, vocab_size=50257), kwargs)


@register_model(meta=_meta("175B", _FP8LM))
def gpt_175b(**kwargs) -> GPT:
    """FP8-LM's GPT-175B (GPT-3): 96 layers, width 12288, 96 heads, context 2048."""
    return _create(dict(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257), kwargs)
