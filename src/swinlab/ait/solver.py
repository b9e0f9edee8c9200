"""AiT's task-solver: a Swin V2 backbone's last stage, a transformer encoder-decoder and one shared vocabulary with
a tied classifier, predicting a task's token sequence (autoregressively with a key/value cache, or all at once from
``[MASK]`` inputs as AiT-P), with soft tokens on the input side at inference."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.ait.vocabulary import Vocabulary
from swinlab.layers.drop import DropPath
from swinlab.layers.mlp import Mlp
from swinlab.models.registry import create_model, register_model
from swinlab.models.swin import SwinTransformerV2

__all__ = ["TaskSolver", "ait_task_solver", "nucleus_sample", "official_head_state_dict", "sine_position_2d"]

IGNORE_INDEX = -100
Picker = Callable[[int | torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""A decoding step's choice: ``(position(s), vocabulary logits) -> (logits kept, ids chosen, next input embedding)``."""


def sine_position_2d(rows: int, cols: int, dim: int) -> torch.Tensor:
    """``(rows * cols, dim)`` fixed 2-D sine embedding: the first half encodes the row, the second the column,
    each as interleaved sin/cos pairs of frequencies ``10000^(-2i / (dim/2))`` (DETR style, unnormalised)."""
    half = dim // 2
    freq = 10000.0 ** (2 * (torch.arange(half) // 2) / half)

    def axis(n: int) -> torch.Tensor:
        angle = torch.arange(n, dtype=torch.float32)[:, None] / freq
        return torch.stack((angle[:, 0::2].sin(), angle[:, 1::2].cos()), dim=-1).flatten(1)

    row = axis(rows)[:, None, :].expand(rows, cols, half)
    col = axis(cols)[None, :, :].expand(rows, cols, half)
    return torch.cat((row, col), dim=-1).flatten(0, 1)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections; ``cache`` (a dict, filled in place) keeps the keys
    and values of the positions seen so far, so a decoding step projects only its new token."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor, causal: bool = False, cache: dict | None = None
    ) -> torch.Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(kv)), self._split(self.v(kv))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if causal and q.shape[2] > 1:
            future = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(
                k.shape[2] - q.shape[2] + 1
            )
            attn = attn.masked_fill(future, float("-inf"))
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).flatten(2))


def _ffn(dim: int, hidden: int, dropout: float) -> Mlp:
    mlp = Mlp(dim, hidden, drop=dropout)
    mlp.drop2 = nn.Identity()  # the official head drops only after the activation
    return mlp


class EncoderBlock(nn.Module):
    """Pre-norm self-attention + feed-forward block."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), _ffn(dim, hidden, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention, cross-attention to the memory (queries and memory share ``norm2``, as in
    the official head) and feed-forward."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.cross = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm3, self.mlp = nn.LayerNorm(dim), _ffn(dim, hidden, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.drop_path(self.attn(h, h, causal=True, cache=cache))
        x = x + self.drop_path(self.cross(self.norm2(x), self.norm2(memory)))
        return x + self.drop_path(self.mlp(self.norm3(x)))


class TaskSolver(nn.Module):
    """Image -> token sequence of one task in a shared :class:`~swinlab.ait.vocabulary.Vocabulary`.

    ``backbone``: a registered Swin V2 name (built with ``backbone_kwargs``, classifier removed) or a
    :class:`~swinlab.models.swin.SwinTransformerV2`; only its last stage (after the final norm) feeds the head.
    ``prompts`` names the tasks that get a learned start embedding and a learned position table of
    ``max_length`` rows. ``parallel=True`` makes it AiT-P: every decoder input is one learned ``[MASK]``
    embedding (plus its position), in training and at inference.
    The output layer is tied: ``logits = h @ E.T + b`` with ``E`` the input embedding table.
    """

    def __init__(
        self,
        backbone: str | SwinTransformerV2,
        vocabulary: Vocabulary,
        prompts: Sequence[str] = ("depth",),
        max_length: int = 225,
        dim: int = 256,
        heads: int = 8,
        hidden: int = 1024,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        dropout: float = 0.1,
        drop_path: float = 0.1,
        parallel: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = create_model(backbone, num_classes=0, **(backbone_kwargs or {}))
        elif backbone_kwargs:
            raise ValueError("backbone_kwargs apply to a backbone given by name, not to a built one")
        if not isinstance(backbone, SwinTransformerV2) or backbone.features_only:
            raise TypeError(
                f"the backbone must be a SwinTransformerV2 with its final norm, got {type(backbone).__name__}"
            )
        self.backbone, self.vocabulary, self.prompts = backbone, vocabulary, tuple(prompts)
        self.max_length, self.dim, self.parallel = max_length, dim, parallel

        self.input_drop = nn.Dropout(dropout)
        self.input_proj = nn.Linear(backbone.num_features, dim)
        self.stem_norm = nn.LayerNorm(dim)
        self.encoder = nn.ModuleList(
            EncoderBlock(dim, heads, hidden, dropout, drop_path) for _ in range(encoder_layers)
        )
        self.encoder_norm = nn.LayerNorm(dim)
        self.memory_proj, self.memory_proj_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
        self.memory_mlp_norm, self.memory_mlp = nn.LayerNorm(dim), _ffn(dim, hidden, dropout)
        self.memory_drop_path = DropPath(drop_path)
        self.decoder = nn.ModuleList(
            DecoderBlock(dim, heads, hidden, dropout, drop_path) for _ in range(decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim)

        self.token_embed = nn.Parameter(torch.empty(vocabulary.size, dim))
        self.output_bias = nn.Parameter(torch.empty(vocabulary.size))
        self.prompt_embed = nn.Parameter(torch.empty(len(self.prompts), dim))
        self.position_embed = nn.Parameter(torch.empty(len(self.prompts), max_length, dim))
        self.mask_embed = nn.Parameter(torch.empty(dim)) if parallel else None
        self._init_head()

    def _init_head(self) -> None:
        for p in (self.token_embed, self.output_bias, self.prompt_embed, self.position_embed, self.mask_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for name, module in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {"token_embed", "output_bias", "prompt_embed", "position_embed", "mask_embed"} | {
            f"backbone.{n}" for n in self.backbone.no_weight_decay()
        }

    def no_weight_decay_keywords(self) -> set[str]:
        return self.backbone.no_weight_decay_keywords()

    def load_official_head(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the state dict of an official ``ARTransformer`` (AiT's head, its own keys) into the head; the
        backbone is left as it is. Every head key must be present and of the right shape."""
        converted = official_head_state_dict(state_dict, self.dim)
        result = self.load_state_dict(converted, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("backbone.")]
        if missing or result.unexpected_keys:
            raise KeyError(f"official head state dict: missing {missing}, unexpected {result.unexpected_keys}")

    # ------------------------------------------------------------------------------------------- pieces
    def _task_index(self, task: str) -> int:
        if task not in self.prompts:
            raise KeyError(f"the solver has no prompt for task {task!r}; prompts: {list(self.prompts)}")
        return self.prompts.index(task)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Memory ``(B, h·w, dim)`` of the backbone's last stage: projection, sine positions, encoder blocks,
        then the official post-encoder projection and MLP (positions added again)."""
        features = self.backbone.forward_features(images, return_map=True)
        rows, cols = features.shape[-2:]
        x = self.stem_norm(self.input_proj(self.input_drop(features.flatten(2).transpose(1, 2))))
        pos = sine_position_2d(rows, cols, self.dim).to(x)
        x = x + pos
        for block in self.encoder:
            x = block(x)
        x = self.memory_proj_norm(self.memory_proj(self.encoder_norm(x))) + pos
        return x + self.memory_drop_path(self.memory_mlp(self.memory_mlp_norm(x)))

    def classify(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of decoder states, through the tied embedding table."""
        return self.decoder_norm(h) @ self.token_embed.t() + self.output_bias

    def _decode(self, x: torch.Tensor, memory: torch.Tensor, caches: list[dict] | None = None) -> torch.Tensor:
        for i, block in enumerate(self.decoder):
            x = block(x, memory, None if caches is None else caches[i])
        return self.classify(x)

    def _inputs(self, task: str, tokens: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
        """Decoder inputs of ``length`` positions: the task's prompt, then the embeddings of ``tokens`` (teacher
        forcing) or ``[MASK]`` (parallel), plus the task's positions."""
        t = self._task_index(task)
        if length > self.max_length:
            raise ValueError(f"sequence of {length} tokens exceeds the solver's max_length {self.max_length}")
        if self.parallel:
            body = self.mask_embed.expand(batch, length - 1, -1)
        else:
            body = self.token_embed[tokens[:, : length - 1]]
        start = self.prompt_embed[t].expand(batch, 1, -1)
        return torch.cat((start, body), dim=1) + self.position_embed[t, :length]

    # ------------------------------------------------------------------------------------------- training
    def forward(
        self, images: torch.Tensor, task: str, targets: torch.Tensor, inputs: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher-forced vocabulary logits ``(B, N, V)`` for target ids ``(B, N)``; the decoder reads the prompt
        and ``inputs[:, :-1]`` (default ``targets``: the ids may differ where the input is corrupted)."""
        inputs = targets if inputs is None else inputs
        if inputs.shape != targets.shape:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ in shape")
        memory = self.encode(images)
        x = self._inputs(task, inputs.clamp_min(0), targets.shape[0], targets.shape[1])
        return self._decode(x, memory)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, task: str, over: str = "vocabulary") -> torch.Tensor:
        """Mean cross-entropy over the non-ignored (−100) targets, which must be ids in ``task``'s code range;
        ``over='vocabulary'`` (official) normalises over every id, ``over='task'`` over the task's codes only."""
        self.vocabulary.check_ids(task, targets, IGNORE_INDEX)
        if over == "vocabulary":
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        if over == "task":
            start, stop = self.vocabulary.task_span(task)
            codes = torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, targets - start)
            return F.cross_entropy(logits[..., start:stop].flatten(0, 1), codes.flatten(), ignore_index=IGNORE_INDEX)
        raise ValueError(f"loss over must be 'vocabulary' or 'task', got {over!r}")

    def code_logits(self, logits: torch.Tensor, task: str) -> torch.Tensor:
        """The task's slice ``(…, K)`` of vocabulary logits (what the tokenizer's soft decode reads)."""
        start, stop = self.vocabulary.task_span(task)
        return logits[..., start:stop]

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        task: str,
        length: int,
        *,
        use_cache: bool = True,
        soft_input: bool = False,
        top_p: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``length`` tokens restricted to ``task``'s codes.

        Returns the task's code logits ``(B, length, K)`` (for the soft decode) and the chosen codes ``(B, length)``
        (tokenizer code ids, not vocabulary ids). Each code is drawn from the nucleus of its step's softmax
        (:func:`nucleus_sample`, ``top_p``; ``0``, the official depth setting, is greedy). Parallel solvers
        decode in one pass; otherwise step by step, with a key/value cache (``use_cache``) or re-running the whole
        prefix each step. With ``soft_input`` the next input is the softmax-weighted mix of the task's code
        embeddings (of the unfiltered logits, as officially) instead of the chosen code's embedding.
        """
        start, stop = self.vocabulary.task_span(task)
        codes = self.token_embed[start:stop]

        def pick(position: int | torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            kept = logits[..., start:stop]
            chosen = nucleus_sample(kept, top_p, generator)
            return kept, chosen, kept.softmax(-1) @ codes if soft_input else codes[chosen]

        return self._run_decoder(images, task, length, pick, use_cache)

    @torch.no_grad()
    def generate_tokens(
        self,
        images: torch.Tensor,
        task: str,
        length: int,
        allowed: torch.Tensor,
        *,
        soft: torch.Tensor | None = None,
        use_cache: bool = True,
        top_p: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode ``length`` vocabulary ids of a structured sequence (e.g. AiT's objects: box bins, a class, mask
        codes): position ``i`` may only produce the ids where ``allowed[i % P]`` is true (``allowed`` ``(P, V)``
        bool, one row per position of the repeating unit), so every decoded sequence is well formed.

        Returns vocabulary logits ``(B, length, V)`` with the disallowed ids at ``-inf`` and the ids ``(B, length)``.
        Sampling and caching as in :meth:`generate`; where ``soft[i % P]`` (``(P,)`` bool, default none) the next
        input is the softmax mix of the allowed ids' embeddings (AiT's soft input on a task's code positions).
        """
        self._task_index(task)
        if allowed.ndim != 2 or allowed.shape[1] != self.vocabulary.size or allowed.dtype != torch.bool:
            raise ValueError(
                f"allowed must be a (P, {self.vocabulary.size}) bool tensor, got {allowed.dtype} {tuple(allowed.shape)}"
            )
        if not allowed.any(1).all():
            raise ValueError(f"allowed row {int((~allowed.any(1)).nonzero()[0])} permits no id")
        period = allowed.shape[0]
        allowed = allowed.to(self.token_embed.device)
        soft = torch.zeros(period, dtype=torch.bool) if soft is None else soft.bool()
        if soft.shape != (period,):
            raise ValueError(f"soft must be ({period},) like allowed's rows, got {tuple(soft.shape)}")
        soft = soft.to(allowed.device)

        def pick(position: int | torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            row = position % period
            kept = logits.masked_fill(~allowed[row], float("-inf"))
            chosen = nucleus_sample(kept, top_p, generator)
            embed = self.token_embed[chosen]
            if bool(soft[row].any()):
                embed = torch.where(soft[row, ..., None], kept.softmax(-1) @ self.token_embed, embed)
            return kept, chosen, embed

        return self._run_decoder(images, task, length, pick, use_cache)

    def _run_decoder(
        self, images: torch.Tensor, task: str, length: int, pick: Picker, use_cache: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoding loop of :meth:`generate` and :meth:`generate_tokens`. ``pick(position, logits)`` turns
        vocabulary logits (of one step, or of every position at once for a parallel solver) into the logits to
        return, the chosen ids and the next input embedding."""
        t = self._task_index(task)
        if not 1 <= length <= self.max_length:
            raise ValueError(f"decode length must be in [1, {self.max_length}], got {length}")
        memory = self.encode(images)
        batch = memory.shape[0]
        if self.parallel:
            logits = self._decode(self._inputs(task, None, batch, length), memory)
            kept, chosen, _ = pick(torch.arange(length, device=logits.device), logits)
            return kept, chosen
        positions = self.position_embed[t]
        caches = [{} for _ in self.decoder] if use_cache else None
        step_input = self.prompt_embed[t].expand(batch, 1, -1)
        seen = torch.empty(batch, 0, self.dim, dtype=memory.dtype, device=memory.device)
        out_logits, out_ids = [], []
        for i in range(length):
            x = step_input + positions[i]
            if use_cache:
                step_logits = self._decode(x, memory, caches)[:, -1]
            else:
                seen = torch.cat((seen, x), dim=1)
                step_logits = self._decode(seen, memory)[:, -1]
            kept, chosen, embed = pick(i, step_logits)
            out_logits.append(kept)
            out_ids.append(chosen)
            step_input = embed[:, None]
        return torch.stack(out_logits, dim=1), torch.stack(out_ids, dim=1)


_OFFICIAL_MODULES = {
    "input_proj": "input_proj",
    "stem_ln": "stem_norm",
    "encout_ln": "encoder_norm",
    "proj": "memory_proj",
    "proj_ln": "memory_proj_norm",
    "proj_mlp": "memory_mlp",
    "proj_mlp_ln": "memory_mlp_norm",
    "norm": "decoder_norm",
}
_OFFICIAL_ATTENTION = {"wq": "q", "wk": "k", "wv": "v", "crossattn": "cross"}


def official_head_state_dict(state_dict: Mapping[str, torch.Tensor], dim: int) -> dict[str, torch.Tensor]:
    """The official ``ARTransformer`` keys renamed to :class:`TaskSolver`'s head keys (prompts ``det_embed``
    ``(T, 1, d)`` become ``(T, d)``, the ``[MASK]`` embedding ``(1, 1, d)`` becomes ``(d,)``). The fixed
    ``enc_embed`` buffer is checked against :func:`sine_position_2d` and dropped: the solver computes it for any
    feature size; a learned or normalised one is refused."""
    out = {}
    for key, value in state_dict.items():
        first, *rest = key.split(".")
        if first in ("encoder", "decoder") and len(rest) >= 3 and rest[0] == "blocks":
            out[".".join([first, rest[1], *(_OFFICIAL_ATTENTION.get(r, r) for r in rest[2:])])] = value
        elif first in _OFFICIAL_MODULES:
            out[".".join([_OFFICIAL_MODULES[first], *rest])] = value
        elif key in ("voc_embed", "outp_bias", "dec_embed"):
            out[{"voc_embed": "token_embed", "outp_bias": "output_bias", "dec_embed": "position_embed"}[key]] = value
        elif key == "det_embed":
            out["prompt_embed"] = value[:, 0]
        elif key == "mask_embed":
            out["mask_embed"] = value.reshape(-1)
        elif key == "enc_embed":
            rows, cols = value.shape[1:3]
            if not torch.allclose(value.reshape(rows * cols, -1).float(), sine_position_2d(rows, cols, dim), atol=1e-6):
                raise ValueError("official head: enc_embed is not the fixed 2-D sine table (pos_enc 'sine')")
        else:
            raise KeyError(f"official head state dict: unknown key {key!r}")
    return out


def nucleus_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices drawn from the most likely entries (last axis) while the probability ranked above them is at most
    ``top_p`` (the most likely entry always stays); ``top_p <= 0`` is the arg-max, with no randomness drawn."""
    if top_p <= 0:
        return logits.argmax(-1)
    probs = logits.float().softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability of the entries ranked above each one
    kept = torch.where(before <= top_p, sorted_probs, 0.0)  # the official rule: drop once the mass above exceeds p
    kept[..., 0] = sorted_probs[..., 0]
    draw = torch.multinomial(kept.flatten(0, -2), 1, generator=generator).view(*kept.shape[:-1], 1)
    return order.gather(-1, draw).squeeze(-1)


@register_model(meta={"source": "AiT ait/configs (depth): SwinV2 last stage, 6 + 6 pre-norm blocks of width 256"})
def ait_task_solver(
    backbone: str = "swinv2_base_window12_192",
    image_size: int | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    num_bins: int = 2000,
    num_classes: int = 80,
    codes: dict[str, int] | None = None,
    **head: Any,
) -> TaskSolver:
    """A solver by recipe: a registered Swin V2 (``image_size``, which the data sets, becomes its ``img_size``),
    the official vocabulary layout with ``codes`` per task (default 128 mask + 128 depth codes) and the head
    options of :class:`TaskSolver` (official defaults)."""
    kwargs = dict(backbone_kwargs or {})
    if image_size is not None:
        kwargs.setdefault("img_size", image_size)
    vocabulary = Vocabulary.official(num_bins, num_classes, codes)
    return TaskSolver(backbone, vocabulary, backbone_kwargs=kwargs, **head)
