"""Swin Transformer V2 (Liu et al. 2021), faithful to the official ``models/swin_transformer_v2.py`` wherever
the official code runs, and extended to any input size.

Layout (official key names): ``patch_embed`` -> ``layers.i`` (``blocks.j`` then ``downsample``) -> ``norm`` ->
mean over tokens -> ``head``. Tokens travel as channels-last grids ``(B, H, W, C)``, so no block needs to know
the input resolution in advance: window geometry (effective window, padding, shift mask) is derived per
forward from the grid and cached in :mod:`swinlab.layers.windows`.

Beyond the official code:

* any input size: images are padded to a patch multiple, token grids to a window multiple (bottom/right,
  padded tokens masked out of attention and cropped afterwards), odd grids padded before patch merging;
* a 1x1 stage works (official: NaN from 0/0 in the CPB coordinate normalisation, see
  :func:`swinlab.layers.position.log_spaced_coords`);
* multi-scale outputs (``forward_features(x, return_stages=True)`` or ``features_only=True``);
* SimMIM's masked encoder in the same class: an optional ``mask_token`` (:meth:`SwinTransformerV2.enable_mask_token`)
  and ``forward_features(x, mask=..., return_map=True)``, on any grid (the official ``SwinTransformerV2ForSimMIM``
  assumes a square one);
* ``extra_norm_period`` / ``extra_norm_stage``: the extra main-branch LayerNorms the paper describes for
  SwinV2-H/G (paper only; the official repository has no such code, so these are unverified).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from swinlab.layers import (
    DropPath,
    Linear,
    Mlp,
    PatchEmbed,
    PatchMergingV2,
    WindowAttentionV1,
    WindowAttentionV2,
    WindowGeometry,
    from_windows,
    to_windows,
    window_geometry,
    window_token_index,
)
from swinlab.models.registry import register_model

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _tuple(value: int | Sequence[int], rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * rank


def init_swin_weights(module: nn.Module) -> None:
    """Official Swin init (V1, V2, Video): truncated-normal (std 0.02) Linear weights, zero biases, unit
    LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_swin(model: nn.Module) -> None:
    """Initialise a whole Swin model as the official code does: :func:`init_swin_weights` on every module, then
    the V2 blocks' post-norms zeroed. Keyed on the block class rather than on a version flag, so a model that
    received its blocks by injection needs to know nothing about which kind it got."""
    model.apply(init_swin_weights)
    for module in model.modules():
        if isinstance(module, SwinBlockV2):
            module.init_post_norms()


class _SwinBlock(nn.Module):
    """Shifted-window transformer block on ``(B, *grid, C)``; subclasses choose the attention and the norm
    placement.

    ``per_axis_window`` selects the rule for grids not larger than the window (see
    :func:`swinlab.layers.windows.clamp_window`): Swin V2 shrinks the whole window to the smallest side, Video
    Swin clamps each axis separately. ``pad_mask``: tokens padded to a window multiple are masked out of
    attention (default, so results do not depend on padding) or, if false, attended to as ordinary zero-valued
    keys (the official Video Swin).
    """

    per_axis_window = False

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        window_size: tuple[int, ...],
        shift_size: tuple[int, ...],
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        *,
        pad_mask: bool = True,
    ) -> None:
        super().__init__()
        self.window_size, self.shift_size = tuple(window_size), tuple(shift_size)
        self.pad_mask = pad_mask
        self.norm1 = norm_layer(dim)
        self.attn = attn
        # in place: it only ever sees a fresh branch output (a norm, the attention or the MLP)
        self.drop_path = DropPath(drop_path, inplace=True) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def geometry(self, grid: Sequence[int]) -> WindowGeometry:
        return window_geometry(
            grid, self.window_size, self.shift_size, per_axis=self.per_axis_window, pad_mask=self.pad_mask
        )

    def window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Shift, partition, attend, merge and un-shift ``(B, *grid, C)`` (padding handled inside)."""
        geom = self.geometry(x.shape[1:-1])
        return from_windows(self.attn(to_windows(x, geom), geom), geom)

    def build_window_tables(self, grid: Sequence[int], device: torch.device) -> None:
        """Fill the geometry caches (token indices, mask, position-bias tables) this block uses on ``grid``."""
        geom = self.geometry(grid)
        window_token_index(geom, device)
        with torch.no_grad():
            self.attn.attention_bias(geom, device, torch.float32)


class SwinBlockV2(_SwinBlock):
    """Res-post-norm block: ``x + DropPath(norm1(attn(x)))``, then ``x + DropPath(norm2(mlp(x)))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, ...],
        shift_size: tuple[int, ...],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        pretrained_window_size: tuple[int, ...] = (0, 0),
        *,
        pad_mask: bool = True,
    ) -> None:
        attn = WindowAttentionV2(dim, num_heads, qkv_bias, attn_drop, drop, pretrained_window_size)
        super().__init__(dim, attn, window_size, shift_size, mlp_ratio, drop, drop_path, norm_layer, pad_mask=pad_mask)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, *grid, C)`` -> same shape; with ``keep`` ``(B, k)`` (indices into the flattened grid) the block
        goes on after its attention with those tokens only and returns ``(B, k, C)``: its second half is token-wise,
        so a caller that reads k tokens needs no more (SimMIM's loss, :meth:`SwinTransformerV2.forward_tokens`)."""
        # Residuals added in place into the fresh branch output (a LayerNorm's backward does not need it).
        x = self.drop_path(self.norm1(self.window_attention(x))).add_(x)
        if keep is not None:
            x = x.flatten(1, -2).gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.drop_path(self.norm2(self.mlp(x))).add_(x)

    def init_post_norms(self) -> None:
        """Zero the post-norms so the block starts as the identity (official ``_init_respostnorm``)."""
        for norm in (self.norm1, self.norm2):
            nn.init.zeros_(norm.weight)
            nn.init.zeros_(norm.bias)


class SwinBlockV1(_SwinBlock):
    """Pre-norm block with dot-product attention and a learned bias table (Swin V1 math, Video Swin's window
    rule: each axis clamped separately).

    ``pad_mask=False`` gives the official Video Swin semantics for every window that does not fit the grid: padded
    tokens are ordinary keys, and a window clamped to a shorter axis reads the bias table through the official
    sliced index (``sliced_index`` of :class:`swinlab.layers.WindowAttentionV1`). ``pad_mask=True`` (default)
    makes both kinds of window behave as the windows of the real tokens they hold (masked padding, true
    offsets)."""

    per_axis_window = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: tuple[int, ...],
        shift_size: tuple[int, ...],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        *,
        pad_mask: bool = True,
    ) -> None:
        attn = WindowAttentionV1(
            dim, num_heads, window_size, qkv_bias, qk_scale, attn_drop, drop, sliced_index=not pad_mask
        )
        super().__init__(dim, attn, window_size, shift_size, mlp_ratio, drop, drop_path, norm_layer, pad_mask=pad_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Residuals added in place into the fresh branch outputs, as in the V2 block.
        x = self.drop_path(self.window_attention(self.norm1(x))).add_(x)
        return self.drop_path(self.mlp(self.norm2(x))).add_(x)


class SwinStage(nn.Module):
    """``depth`` blocks alternating shift 0 / window // 2, optional extra norms, then an optional
    downsample."""

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        downsample: nn.Module | None = None,
        extra_norms: dict[int, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        if extra_norms:
            self.extra_norms = nn.ModuleDict({str(i): m for i, m in extra_norms.items()})
        self.downsample = downsample
        self.grad_checkpointing = False

    def run_blocks(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The stage's blocks (and extra norms) without the downsample: ``(B, *grid, C)`` -> same shape, or with
        ``keep`` the last block's ``(B, k, C)`` (see :meth:`SwinBlockV2.forward`)."""
        extra = getattr(self, "extra_norms", {})
        for i, block in enumerate(self.blocks):
            args = (x,) if keep is None or i < len(self.blocks) - 1 else (x, keep)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
            if str(i) in extra:
                x = extra[str(i)](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_blocks(x)
        return self.downsample(x) if self.downsample is not None else x


def swin_stages(
    block: Callable[..., nn.Module],
    downsample: Callable[..., nn.Module],
    embed_dim: int,
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_size: tuple[int, ...],
    *,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    norm_layer: type[nn.Module] = nn.LayerNorm,
    stage_kwargs: Mapping[str, Sequence[Any]] | None = None,
    extra_norm_period: int = 0,
    extra_norm_stage: bool = False,
) -> nn.ModuleList:
    """The stages of every Swin in swinlab, of any rank (``len(window_size)``): widths C, 2C, 4C, ..., blocks
    alternating shift 0 / window // 2, ``downsample`` after every stage but the last, stochastic depth rising
    linearly from 0 to ``drop_path_rate`` over all blocks (the official schedule).

    Why one builder: Swin V2 (2D) and Video Swin (3D, V1 or V2 blocks) differ only in the block and the patch
    merging, so those are passed in, as torchvision's ``SwinTransformer(block=..., downsample_layer=...)``, and
    the schedule, the shifts and the checks exist once. It lives here, beside the blocks and :class:`SwinStage`
    it assembles, because Video Swin already builds on them from this file.

    ``block`` is called as ``block(dim, num_heads, window_size, shift_size, mlp_ratio=, qkv_bias=, drop=,
    attn_drop=, drop_path=, norm_layer=, **kwargs)`` (bind block-specific options with
    :func:`functools.partial`); ``stage_kwargs`` maps further block keywords to one value per stage (Swin V2's
    per-stage ``pretrained_window_size``). ``downsample`` is called as ``downsample(dim, norm_layer=)``.
    ``extra_norm_period`` / ``extra_norm_stage``: a ``norm_layer`` after every k-th block / after the last block
    of each stage (the paper's SwinV2-H/G).
    """
    depths, num_heads, window_size = tuple(depths), tuple(num_heads), tuple(window_size)
    per_stage = {name: tuple(values) for name, values in (stage_kwargs or {}).items()}
    if any(len(values) != len(depths) for values in (num_heads, *per_stage.values())):
        listed = ", ".join(f"{k} {v}" for k, v in {"depths": depths, "num_heads": num_heads, **per_stage}.items())
        raise ValueError(f"{listed} must have one entry per stage")
    widths = [embed_dim * 2**i for i in range(len(depths))]
    for i, (width, heads) in enumerate(zip(widths, num_heads, strict=True)):
        if width % heads:
            raise ValueError(f"num_heads[{i}]={heads} does not divide the width {width} of stage {i}")
    total = sum(depths)
    rates = iter([drop_path_rate * i / max(total - 1, 1) for i in range(total)])
    shifts = ((0,) * len(window_size), tuple(w // 2 for w in window_size))
    stages = nn.ModuleList()
    for i, (depth, width, heads) in enumerate(zip(depths, widths, num_heads, strict=True)):
        kwargs = {name: values[i] for name, values in per_stage.items()}
        blocks = [
            block(
                width,
                heads,
                window_size,
                shifts[j % 2],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=next(rates),
                norm_layer=norm_layer,
                **kwargs,
            )
            for j in range(depth)
        ]
        extra = [j for j in range(depth) if extra_norm_period and (j + 1) % extra_norm_period == 0]
        if extra_norm_stage and depth - 1 not in extra:
            extra.append(depth - 1)
        merge = downsample(width, norm_layer=norm_layer) if i < len(depths) - 1 else None
        stages.append(SwinStage(blocks, merge, {j: norm_layer(width) for j in extra}))
    return stages


class SwinTransformerV2(nn.Module):
    """Swin V2 classifier / backbone. Keyword names and defaults follow the official constructor, so official
    configs map one to one (``use_checkpoint`` is gradient checkpointing; ``img_size`` only sizes
    ``absolute_pos_embed``).

    Extra keyword-only options: ``features_only`` (``forward`` returns the per-stage maps, no norm/head),
    ``extra_norm_period`` (LayerNorm after every k-th block of each stage) and ``extra_norm_stage`` (LayerNorm
    at the end of every stage) for the paper's H/G models.

    ``mask_token`` is ``None`` (no state-dict key) until :meth:`enable_mask_token` creates it for masked-image
    modelling; :class:`swinlab.pretrain.simmim.SimMIM` does so.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        pretrained_window_sizes: Sequence[int] | None = None,
        *,
        features_only: bool = False,
        extra_norm_period: int = 0,
        extra_norm_stage: bool = False,
    ) -> None:
        super().__init__()
        pretrained_window_sizes = tuple(pretrained_window_sizes or (0,) * len(depths))
        self.in_chans, self.embed_dim, self.num_layers = in_chans, embed_dim, len(depths)
        self.img_size, self.patch_size = _tuple(img_size, 2), _tuple(patch_size, 2)
        self.window_size = window_size
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.features_only = features_only

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.patch_grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size, strict=True))
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid[0] * self.patch_grid[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        self.register_parameter("mask_token", None)

        self.layers = swin_stages(
            SwinBlockV2,
            PatchMergingV2,
            embed_dim,
            depths,
            num_heads,
            (window_size, window_size),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
            stage_kwargs={"pretrained_window_size": [(p, p) for p in pretrained_window_sizes]},
            extra_norm_period=extra_norm_period,
            extra_norm_stage=extra_norm_stage,
        )

        if features_only:
            num_classes = 0
            self.norm = nn.Identity()
        else:
            self.norm = norm_layer(self.num_features)
        self.num_classes = num_classes
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        init_swin(self)
        self.set_grad_checkpointing(use_checkpoint)

    # -- public toolkit interface --

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (training only)."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        names = {"absolute_pos_embed"} if self.absolute_pos_embed is not None else set()
        return names | ({"mask_token"} if self.mask_token is not None else set())

    def enable_mask_token(self) -> nn.Parameter:
        """Create (once) the learnable token that replaces masked patch embeddings in masked-image modelling:
        ``(1, 1, embed_dim)``, truncated normal with std 0.02 as the official ``SwinTransformerV2ForSimMIM``.
        Optional so that a plain classifier's state dict has no such key."""
        if self.mask_token is None:
            weight = self.patch_embed.proj.weight
            self.mask_token = nn.Parameter(torch.empty(1, 1, self.embed_dim, device=weight.device, dtype=weight.dtype))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        return self.mask_token

    def no_weight_decay_keywords(self) -> set[str]:
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(init_swin_weights)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"expected a 4D (B, C, H, W) input, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"model expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2] < self.patch_size[0] or x.shape[3] < self.patch_size[1]:
            raise ValueError(f"input {tuple(x.shape[2:])} is smaller than one patch {self.patch_size}")

    def _position_embedding(self, grid: tuple[int, ...]) -> torch.Tensor:
        """``absolute_pos_embed`` as a ``(1, *grid, C)`` map, bicubically resized if the grid is not the one
        of ``img_size``."""
        pos = self.absolute_pos_embed.view(1, *self.patch_grid, -1).movedim(-1, 1)
        if tuple(grid) != self.patch_grid:
            pos = F.interpolate(pos, size=tuple(grid), mode="bicubic", align_corners=False)
        return pos.movedim(1, -1)

    def check_mask(self, mask: torch.Tensor, grid: Sequence[int], batch: int) -> None:
        """A token mask must be ``(B, *grid)`` (1 = masked), bool / integer / float, and the model must have a
        mask token: checked before any compute, with the shapes in the message."""
        if self.mask_token is None:
            raise ValueError("this model has no mask token: call enable_mask_token() first (SimMIM does)")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if not (mask.dtype in _MASK_DTYPES or mask.dtype.is_floating_point):
            raise TypeError(f"mask must be a bool, integer or float tensor (1 = masked), got {mask.dtype}")
        want = (batch, *grid)
        if tuple(mask.shape) != want:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit the input: expected (B, H/patch, W/patch) = {want}"
            )

    def apply_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace masked tokens of ``(B, H, W, C)`` by the mask token: ``x * (1 - w) + mask_token * w`` (the
        official blend, so a fractional mask behaves as there too)."""
        w = mask.unsqueeze(-1).to(x.dtype)
        return x * (1.0 - w) + self.mask_token.to(x.dtype) * w

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Image ``(B, C, H, W)`` -> token grid ``(B, H/p, W/p, embed_dim)``: patch embedding (incl. its norm),
        then masked tokens replaced (if ``mask``, see :meth:`apply_mask`), ape, dropout."""
        self._check_input(x)
        if mask is not None:
            grid = tuple(-(-s // p) for s, p in zip(x.shape[2:], self.patch_size, strict=True))
            self.check_mask(mask, grid, x.shape[0])
        x = self.patch_embed(x)
        if mask is not None:
            x = self.apply_mask(x, mask)
        if self.absolute_pos_embed is not None:
            x = x + self._position_embedding(x.shape[1:3])
        return self.pos_drop(x)

    def forward_features(
        self,
        x: torch.Tensor,
        return_stages: bool = False,
        *,
        mask: torch.Tensor | None = None,
        return_map: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Pooled features ``(B, num_features)`` (final norm, mean over tokens), as the official
        ``forward_features``.

        With ``return_stages=True``: a list with one ``(B, C_i, H_i, W_i)`` map per stage, the output of that
        stage's blocks *before* its downsample (strides 4, 8, 16, 32 for patch 4), without the final norm —
        the maps a detection / segmentation neck consumes.

        ``mask`` ``(B, H/p, W/p)``, 1 = masked: masked patch embeddings become the mask token (SimMIM).
        ``return_map=True``: the final-norm token map ``(B, num_features, H_last, W_last)`` instead of its mean
        (what SimMIM's decoder reads; a channels-last view, no copy).
        """
        stages = [] if return_stages else None
        x = self._encode(x, mask, stages=stages)
        if stages is not None:
            return stages
        x = self.norm(x)
        return x.permute(0, 3, 1, 2) if return_map else x.flatten(1, 2).mean(1)

    def forward_tokens(
        self, x: torch.Tensor, tokens: torch.Tensor, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final-norm features ``(B, k, num_features)`` of the last stage's tokens ``tokens`` ``(B, k)``
        (indices into its flattened ``H_last x W_last`` grid): those entries of ``forward_features(x, mask=mask,
        return_map=True)``. Every token is computed up to the last block's attention, where they all mix; the
        rest (that block's MLP half and the final norm) only for these."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != x.shape[0]:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a (B, k) index tensor with B = {x.shape[0]}, got {shape}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an int64 or int32 index tensor, got {tokens.dtype}")
        return self.norm(self._encode(x, mask, keep=tokens.long()))

    def _encode(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        keep: torch.Tensor | None = None,
        stages: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embedding and every stage (``keep``: see :meth:`forward_tokens`), before the final norm; appends each
        stage's map before its downsample to ``stages`` if given."""
        if torch.compiler.is_compiling():
            self._build_window_tables(x)
        x = self.embed(x, mask)
        for i, layer in enumerate(self.layers):
            x = layer.run_blocks(x, keep if i == len(self.layers) - 1 else None)
            if stages is not None:
                stages.append(x.permute(0, 3, 1, 2))
            if layer.downsample is not None:
                x = layer.downsample(x)
        return x

    @torch.compiler.disable
    def _build_window_tables(self, x: torch.Tensor) -> None:
        """Build every block's cached geometry tables for this input size, eagerly, before tracing the rest.

        Under ``torch.compile`` a cache miss inside the graph runs the builder eagerly and grows the cache,
        which invalidates the frames compiled so far; building all tables here first (one graph break at the
        top) lets dynamo trace the network as a single graph from the first call.
        """
        grid = tuple(-(-s // p) for s, p in zip(x.shape[2:], self.patch_size, strict=True))
        for layer in self.layers:
            for block in layer.blocks:
                block.build_window_tables(grid, x.device)
            if layer.downsample is not None:
                grid = tuple(-(-g // 2) for g in grid)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            return self.forward_features(x, return_stages=True)
        return self.forward_head(self.forward_features(x))


# -- registered variants --

_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_LARGE = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_HUGE = dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6)
_GIANT = dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_period=6)
_FROM_192 = dict(pretrained_window_sizes=(12, 12, 12, 6))

_OFFICIAL = "microsoft/Swin-Transformer (README model zoo, configs/swinv2)"
_PAPER = "Swin V2 paper; configuration unverified (no official code or weights), extra norm every 6 blocks"


def _meta(params: str, flops: str | None = None, top1: float | None = None, source: str = _OFFICIAL) -> dict:
    return {"params": params, "flops": flops, "imagenet_top1": top1, "source": source}


def _create(arch: dict, img_size: int, window_size: int, kwargs: dict) -> SwinTransformerV2:
    return SwinTransformerV2(**{"img_size": img_size, "window_size": window_size, **arch, **kwargs})


@register_model(meta=_meta("28M", "5.9G", 81.8))
def swinv2_tiny_window8_256(**kwargs) -> SwinTransformerV2:
    return _create(_TINY, 256, 8, kwargs)


@register_model(meta=_meta("28M", "6.6G", 82.8))
def swinv2_tiny_window16_256(**kwargs) -> SwinTransformerV2:
    return _create(_TINY, 256, 16, kwargs)


@register_model(meta=_meta("50M", "11.5G", 83.7))
def swinv2_small_window8_256(**kwargs) -> SwinTransformerV2:
    return _create(_SMALL, 256, 8, kwargs)


@register_model(meta=_meta("50M", "12.6G", 84.1))
def swinv2_small_window16_256(**kwargs) -> SwinTransformerV2:
    return _create(_SMALL, 256, 16, kwargs)


@register_model(meta=_meta("88M", "20.3G", 84.2))
def swinv2_base_window8_256(**kwargs) -> SwinTransformerV2:
    return _create(_BASE, 256, 8, kwargs)


@register_model(meta=_meta("88M", "21.8G", 84.6))
def swinv2_base_window16_256(**kwargs) -> SwinTransformerV2:
    return _create(_BASE, 256, 16, kwargs)


@register_model(meta=_meta("88M", source=_OFFICIAL + "; ImageNet-22K pre-training, 21841 classes"))
def swinv2_base_window12_192(**kwargs) -> SwinTransformerV2:
    return _create(_BASE, 192, 12, {"num_classes": 21841, **kwargs})


@register_model(meta=_meta("197M", source=_OFFICIAL + "; ImageNet-22K pre-training, 21841 classes"))
def swinv2_large_window12_192(**kwargs) -> SwinTransformerV2:
    return _create(_LARGE, 192, 12, {"num_classes": 21841, **kwargs})


@register_model(meta=_meta("88M", "21.8G", 86.2))
def swinv2_base_window12to16_192to256(**kwargs) -> SwinTransformerV2:
    return _create({**_BASE, **_FROM_192}, 256, 16, kwargs)


@register_model(meta=_meta("88M", "54.7G", 87.1))
def swinv2_base_window12to24_192to384(**kwargs) -> SwinTransformerV2:
    return _create({**_BASE, **_FROM_192}, 384, 24, kwargs)


@register_model(meta=_meta("197M", "47.5G", 86.9))
def swinv2_large_window12to16_192to256(**kwargs) -> SwinTransformerV2:
    return _create({**_LARGE, **_FROM_192}, 256, 16, kwargs)


@register_model(meta=_meta("197M", "115.4G", 87.6))
def swinv2_large_window12to24_192to384(**kwargs) -> SwinTransformerV2:
    return _create({**_LARGE, **_FROM_192}, 384, 24, kwargs)


@register_model(meta=_meta("~658M", source=_PAPER))
def swinv2_huge_window12_192(**kwargs) -> SwinTransformerV2:
    return _create(_HUGE, 192, 12, kwargs)


@register_model(meta=_meta("~3.0B", top1=90.17, source=_PAPER + "; top-1 at 640 px"))
def swinv2_giant_window12_192(**kwargs) -> SwinTransformerV2:
    return _create(_GIANT, 192, 12, kwargs)


@register_model(meta=_meta("~2.3M", source="swinlab: small CPU variant for 32 px images (not a paper model)"))
def swinv2_nano_window4_32(**kwargs) -> SwinTransformerV2:
    """Three stages on an 8x8 token grid (patch 4): the main job's model, an epoch of 12k images in ~20 s on 2 cores."""
    arch = dict(patch_size=4, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8))
    return _create(arch, 32, 4, kwargs)
