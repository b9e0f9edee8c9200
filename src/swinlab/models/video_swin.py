"""Video Swin Transformer (Liu, Ning et al. 2021): the official mmaction ``SwinTransformer3D`` backbone and an
I3D-style classifier, built from the same rank-generic blocks and stage builder as the 2D models.

A 3D window is the 2D machinery with one more axis: :func:`swinlab.models.swin.swin_stages` given
:class:`swinlab.models.swin.SwinBlockV1` (pre-norm, learned bias table, per-axis window clamping) and the V1
:class:`swinlab.layers.PatchMerging`, which halves only H and W, after a :class:`swinlab.layers.PatchEmbed` with a
``Conv3d``. Key names equal the official ones
(``patch_embed``, ``layers.i.blocks.j``, ``layers.i.downsample``, ``norm``; the classifier adds ``backbone.`` /
``cls_head.fc_cls.`` like the official recognizer checkpoints).

**Windows that do not fit the token grid** follow the official code by default. A grid that is not a multiple of
the window is zero-padded at the end after ``norm1``, the shift mask is computed on the padded grid, and real
tokens attend to the padded tokens as ordinary keys (every official checkpoint was trained that way). An axis not
larger than its window uses window = size and no shift, and the bias table is then read through
``relative_position_index[:N, :N]`` of the configured window (wrong offsets once H or W shrank, right ones when
only time did). ``pad_mask=True`` instead masks padded tokens out of attention (:func:`swinlab.layers.window_mask`)
and reads a shrunk window's bias at its true offsets (:class:`swinlab.layers.WindowAttentionV1`), so results do
not depend on padding.

Deliberate differences from the official code (none is hit by standard settings or by the golden fixture):

* ``relative_position_index`` is derived, not a state-dict buffer (the loaders drop it);
* weights are initialised in ``__init__`` (officially the recognizer calls ``init_weights``), and ``train()``
  returns ``self`` (officially ``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from swinlab.layers import Linear, PatchEmbed, PatchMerging, PatchMergingV2
from swinlab.models.registry import register_model
from swinlab.models.swin import SwinBlockV1, SwinBlockV2, init_swin, swin_stages

Size = tuple[int, ...]


class SwinBlockV2PerAxis(SwinBlockV2):
    """The Swin V2 block (res-post-norm, scaled cosine attention, log-spaced CPB) with Video Swin's window rule:
    each axis clamped separately, so a short clip shrinks only the temporal window."""

    per_axis_window = True


def _block_and_merging(
    swin_version: int, qk_scale: float | None, pretrained_window_size: Sequence[int] | None, pad_mask: bool
) -> tuple[Callable[..., nn.Module], type[nn.Module]]:
    """The block and patch merging for ``swin_version``, handed to :func:`swinlab.models.swin.swin_stages`: the
    int switch stays at the constructor (``swin_version`` is public API) and the stages only ever see parts.

    ``1``: Video Swin's V1 blocks (pre-norm, dot-product attention scaled by ``qk_scale`` or ``head_dim**-0.5``,
    learned bias table) and pre-norm merging. ``2``: Swin V2 blocks with the per-axis window rule (res-post-norm,
    scaled cosine attention, log-spaced continuous position bias normalised by ``pretrained_window_size``,
    default the effective window) and post-norm merging. An option the chosen version cannot use is refused
    rather than ignored. ``pad_mask`` goes to the blocks of either version.
    """
    if swin_version == 1:
        if pretrained_window_size is not None:
            raise ValueError("pretrained_window_size applies to the continuous position bias of version 2 only")
        return partial(SwinBlockV1, qk_scale=qk_scale, pad_mask=pad_mask), PatchMerging
    if swin_version == 2:
        if qk_scale is not None:
            raise ValueError("qk_scale applies to dot-product attention (version 1); version 2 learns its logit scale")
        pretrained = tuple(pretrained_window_size or (0, 0, 0))
        if len(pretrained) != 3:
            raise ValueError(f"pretrained_window_size {pretrained} needs one entry per window axis (T, H, W)")
        return partial(SwinBlockV2PerAxis, pretrained_window_size=pretrained, pad_mask=pad_mask), PatchMergingV2
    raise ValueError(f"swin_version must be 1 (Video Swin) or 2 (Swin V2 techniques), got {swin_version}")


def _triple(value: int | Sequence[int], what: str) -> Size:
    value = tuple(value) if isinstance(value, Sequence) else (value,) * 3
    if len(value) != 3 or any(not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{what} must be a positive int or three positive ints (T, H, W), got {value}")
    return value


class SwinTransformer3D(nn.Module):
    """Video Swin backbone: clip ``(N, C, T, H, W)`` -> feature map ``(N, 8C, T/Pt, H/32, W/32)`` (final
    LayerNorm applied), for patch ``(Pt, 4, 4)``.

    Keyword names and defaults are the official class's (which differ from the released configs: those use
    ``patch_size=(2, 4, 4)``, ``window_size=(8, 7, 7)``, ``patch_norm=True``, see the registered variants).
    ``pretrained`` is a checkpoint path loaded at construction: ImageNet 2D weights inflated with
    :func:`swinlab.models.video_checkpoints.inflate_from_2d` when ``pretrained2d`` is true, else official 3D
    weights via :func:`swinlab.models.video_checkpoints.load_official_video`. ``frozen_stages`` = k >= 0 freezes
    the patch embedding and the first k stages (their parameters stop requiring grad and they stay in eval
    mode); ``use_checkpoint`` enables gradient checkpointing. ``swin_version=2`` builds the stages from Swin V2
    blocks and merging instead (see :func:`_block_and_merging`).

    ``pad_mask`` chooses how a window that does not fit the token grid behaves (a grid side not a multiple of the
    window is padded inside each block; a side not larger than the window shrinks it):

    * ``False`` (default, official): padded tokens are zero vectors (in version 1 blocks, after ``norm1``) that
      real tokens attend to like any other key, and a window shrunk in H or W reads the bias table through the
      official sliced index. This is what the official model computes and what its checkpoints were trained
      with, so only this setting reproduces them on clips whose token grids need padding or are small. Version 2
      blocks pad the same way (their continuous position bias has no table to slice).
    * ``True``: padded tokens are masked out of attention and a shrunk window uses its true offsets, so results
      do not depend on padding: the real tokens of a partly padded window attend to each other exactly as if the
      grid ended at their edge (and a static clip reproduces its inflated 2D model). Worth it when training from
      scratch or from inflated 2D weights on clip sizes that need padding; nothing changes when the grids are
      window multiples at least as large as the window.
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        pretrained2d: bool = True,
        patch_size: int | Sequence[int] = (4, 4, 4),
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = (2, 7, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        patch_norm: bool = False,
        frozen_stages: int = -1,
        use_checkpoint: bool = False,
        *,
        swin_version: int = 1,
        pretrained_window_size: Sequence[int] | None = None,
        pad_mask: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = _triple(patch_size, "patch_size")
        self.window_size = _triple(window_size, "window_size")
        if not -1 <= frozen_stages <= len(depths):
            raise ValueError(f"frozen_stages must be in [-1, {len(depths)}], got {frozen_stages}")
        self.in_chans, self.embed_dim, self.num_layers = in_chans, embed_dim, len(depths)
        self.frozen_stages = frozen_stages
        self.num_features = embed_dim * 2 ** (len(depths) - 1)

        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim, norm_layer if patch_norm else None)
        self.pos_drop = nn.Dropout(drop_rate)
        self.swin_version, self.pad_mask = swin_version, pad_mask
        self.layers = swin_stages(
            *_block_and_merging(swin_version, qk_scale, pretrained_window_size, pad_mask),
            embed_dim,
            depths,
            num_heads,
            self.window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_layer=norm_layer,
        )
        self.norm = norm_layer(self.num_features)

        init_swin(self)
        self.set_grad_checkpointing(use_checkpoint)
        if pretrained is not None:
            from swinlab.models.video_checkpoints import inflate_from_2d, load_official_video

            (inflate_from_2d if pretrained2d else load_official_video)(self, pretrained)
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        frozen = [self.patch_embed] if self.frozen_stages >= 0 else []
        if self.frozen_stages >= 1:  # official: the embedding dropout is switched off with the first stage
            frozen += [self.pos_drop, *self.layers[: self.frozen_stages]]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> SwinTransformer3D:
        """Switch mode but keep the frozen stages in eval mode (official behaviour, except that ``self`` is
        returned)."""
        super().train(mode)
        self._freeze_stages()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations (training only)."""
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        return set()

    def no_weight_decay_keywords(self) -> set[str]:
        """Position-bias parameters are not decayed (official): the V1 table, or V2's CPB MLP and logit scale."""
        return {"relative_position_bias_table"} if self.swin_version == 1 else {"cpb_mlp", "logit_scale"}

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor clip batch, got {type(x).__name__}")
        if x.ndim != 5:
            raise ValueError(f"expected a 5D (N, C, T, H, W) clip batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"model expects {self.in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if any(s < p for s, p in zip(x.shape[2:], self.patch_size, strict=True)):
            raise ValueError(
                f"clip (T, H, W) = {tuple(x.shape[2:])} is smaller than one patch {self.patch_size}: a clip needs "
                f"at least {self.patch_size[0]} frames (or build the model with patch_size=(1, ...))"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Clip ``(N, C, T, H, W)`` -> token grid ``(N, T', H', W', embed_dim)`` (end-padded to patch multiples,
        patch embedding, optional norm, dropout)."""
        self._check_input(x)
        return self.pos_drop(self.patch_embed(x))

    def forward_features(self, x: torch.Tensor, return_stages: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """The normalised map ``(N, 8C, T', H', W')``; with ``return_stages=True`` instead one ``(N, C_i, T',
        H_i, W_i)`` map per stage, taken after its blocks and *before* its downsample, without the final norm
        (the maps a detection / localisation neck consumes)."""
        x = self.embed(x)
        stages = []
        for layer in self.layers:
            x = layer.run_blocks(x)
            if return_stages:
                stages.append(x.movedim(-1, 1))
            if layer.downsample is not None:
                x = layer.downsample(x)
        if return_stages:
            return stages
        return self.norm(x).movedim(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


class I3DHead(nn.Module):
    """mmaction's ``I3DHead`` as the Video Swin configs use it: average over T, H, W, dropout, ``fc_cls``
    (normal init, std ``init_std``, zero bias)."""

    def __init__(self, num_classes: int, in_channels: int, dropout_ratio: float = 0.5, init_std: float = 0.01) -> None:
        super().__init__()
        self.in_channels, self.init_std = in_channels, init_std
        self.dropout = nn.Dropout(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int, device: torch.device | None = None) -> None:
        """A fresh ``fc_cls`` for ``num_classes`` (``nn.Identity`` for 0), initialised as the official head."""
        self.num_classes = num_classes
        self.fc_cls = Linear(self.in_channels, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        if isinstance(self.fc_cls, nn.Linear):
            nn.init.normal_(self.fc_cls.weight, std=self.init_std)
            nn.init.zeros_(self.fc_cls.bias)

    @staticmethod
    def pool(feature_map: torch.Tensor) -> torch.Tensor:
        """``(N, C, T, H, W)`` -> ``(N, C)`` (the official ``AdaptiveAvgPool3d(1)`` then flatten)."""
        return feature_map.mean(dim=(2, 3, 4))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled ``(N, C)`` features -> logits."""
        return self.fc_cls(self.dropout(features))


class VideoSwinClassifier(nn.Module):
    """Video Swin recognizer: :class:`SwinTransformer3D` backbone + :class:`I3DHead` (keys ``backbone.*`` /
    ``cls_head.fc_cls.*`` as in the official checkpoints). ``num_classes=0`` gives pooled features as output.

    Backbone keywords pass through (``patch_size``, ``window_size``, ``drop_path_rate``, ...); ``dropout_ratio``
    and ``init_std`` configure the head. ``clip_size`` is the ``(T, H, W)`` view the model is specified for (the
    input ``swinlab info`` measures); any clip size runs.
    """

    def __init__(
        self,
        num_classes: int = 400,
        *,
        dropout_ratio: float = 0.5,
        init_std: float = 0.01,
        clip_size: tuple[int, int, int] = (32, 224, 224),
        **backbone_kwargs,
    ) -> None:
        super().__init__()
        self.clip_size = _triple(clip_size, "clip_size")
        self.backbone = SwinTransformer3D(**backbone_kwargs)
        self.num_features, self.in_chans = self.backbone.num_features, self.backbone.in_chans
        self.num_classes = num_classes
        self.cls_head = I3DHead(num_classes, self.num_features, dropout_ratio, init_std)

    def forward_features(self, x: torch.Tensor, return_stages: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Pooled features ``(N, 8C)`` (what the head's fc sees); ``return_stages`` as in the backbone."""
        if return_stages:
            return self.backbone.forward_features(x, return_stages=True)
        return I3DHead.pool(self.backbone(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.cls_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_pretrained(self, path_or_state_dict):
        """What ``create_model(..., pretrained=...)`` calls: official Video Swin checkpoints (``backbone.*`` /
        ``cls_head.*``)."""
        from swinlab.models.video_checkpoints import load_official_video

        return load_official_video(self, path_or_state_dict)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.cls_head.reset(num_classes, self.backbone.norm.weight.device)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        return self.backbone.no_weight_decay_keywords()


# -- registered variants (released K400 configs: patch (2, 4, 4), window (8, 7, 7), patch norm, 400 classes) --

_SOURCE = "SwinTransformer/Video-Swin-Transformer (README, configs/recognition/swin)"


def _create(embed_dim: int, depths: Size, num_heads: Size, drop_path_rate: float, kwargs: dict) -> nn.Module:
    arch = dict(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        patch_size=(2, 4, 4),
        window_size=(8, 7, 7),
        patch_norm=True,
        drop_path_rate=drop_path_rate,
    )
    return VideoSwinClassifier(**{**arch, **kwargs})


def _meta(
    params: str, flops: str | None, top1: float | None, source: str = _SOURCE, clip: Size = (32, 224, 224)
) -> dict:
    """Registry metadata; ``clip_size`` is the (T, H, W) view the FLOPs refer to (the model's ``clip_size``)."""
    return {"params": params, "flops": flops, "k400_top1": top1, "source": source, "clip_size": clip}


@register_model(meta=_meta("28M", "87.9G", 78.8, _SOURCE + "; ImageNet-1K init, FLOPs per 32x224x224 view"))
def video_swin_tiny(**kwargs) -> VideoSwinClassifier:
    return _create(96, (2, 2, 6, 2), (3, 6, 12, 24), 0.1, kwargs)


@register_model(meta=_meta("50M", "165.9G", 80.6, _SOURCE + "; ImageNet-1K init, FLOPs per 32x224x224 view"))
def video_swin_small(**kwargs) -> VideoSwinClassifier:
    return _create(96, (2, 2, 18, 2), (3, 6, 12, 24), 0.1, kwargs)


@register_model(meta=_meta("88M", "281.6G", 80.6, _SOURCE + "; ImageNet-1K init (drop path 0.3; 0.2 for 22K)"))
def video_swin_base(**kwargs) -> VideoSwinClassifier:
    return _create(128, (2, 2, 18, 2), (4, 8, 16, 32), 0.3, kwargs)


@register_model(meta=_meta("197M", None, 83.1, "Video Swin paper; ImageNet-22K init, drop path 0.2 unverified"))
def video_swin_large(**kwargs) -> VideoSwinClassifier:
    return _create(192, (2, 2, 18, 2), (6, 12, 24, 48), 0.2, kwargs)


@register_model(
    meta=_meta("0.14M", None, None, "swinlab's own CPU demo size (not in the paper): C=32, two stages", (8, 32, 32))
)
def video_swin_nano(**kwargs) -> VideoSwinClassifier:
    """A two-stage Video Swin for small clips (e.g. 8x32x32, ``configs/video_swin_demo.yaml``): patch 2x4x4,
    window 4x4x4, no stochastic depth by default."""
    arch = dict(
        embed_dim=32, depths=(2, 2), num_heads=(2, 4), patch_size=(2, 4, 4), window_size=(4, 4, 4), patch_norm=True,
        drop_path_rate=0.0, clip_size=(8, 32, 32),
    )  # fmt: skip
    return VideoSwinClassifier(**{**arch, **kwargs})
