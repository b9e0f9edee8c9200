"""SimMIM (Xie et al., CVPR 2022): masked-image modelling for Swin V2, faithful to the official
``models/simmim.py`` and ``data/data_simmim_pt.py`` (microsoft/Swin-Transformer).

Random 32x32-pixel cells of the image (ratio 0.6) are masked; the encoder — the toolkit's own
:class:`~swinlab.models.swin.SwinTransformerV2`, with its optional mask token — sees the mask token in place of
their patch embeddings; a one-layer decoder (1x1 conv to ``stride² · C`` channels, then ``PixelShuffle``)
predicts the pixels, and the loss is the mean L1 error over the masked pixels, optionally against locally
normalised targets.

Beyond the official code: non-square images, the mask generator seeded through a ``torch.Generator`` (the
official draws from numpy's global RNG), one call for a whole batch, a training loss that runs the last block's MLP
half, the final norm and the decoder only for the cells it reads (the official decodes the whole image and
multiplies the unmasked part by zero), and errors that name the sizes before any compute instead of asserts or
reshape failures.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.layers.linear import linear
from swinlab.models.swin import SwinTransformerV2


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of them, got {size!r}")
    return pair


def upsample_mask(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """Repeat each cell of a ``(..., h, w)`` mask ``scale`` times along both axes: mask cells -> model patches
    (generator), model patches -> pixels (loss)."""
    return mask.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


class MaskGenerator:
    """The official SimMIM mask: ``ceil(mask_ratio · cells)`` of the ``(H/m) x (W/m)`` mask cells drawn uniformly
    without replacement, each cell covering ``(m/p)²`` model patches. Returns a ``LongTensor`` at model-patch
    resolution, 1 = masked.

    ``input_size`` is an int (square, as official) or ``(H, W)``. Randomness comes from the ``generator``
    argument (or torch's global RNG), so data-loader workers seeded by torch are reproducible.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        self.input_size = _pair(input_size, "input_size")
        for name, value in (("mask_patch_size", mask_patch_size), ("model_patch_size", model_patch_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if mask_patch_size % model_patch_size:
            raise ValueError(
                f"mask_patch_size={mask_patch_size} is not a multiple of the model patch size {model_patch_size}"
            )
        if any(s % mask_patch_size for s in self.input_size):
            raise ValueError(
                f"input size {self.input_size} (H, W) is not a multiple of mask_patch_size={mask_patch_size}"
            )
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
        self.mask_patch_size, self.model_patch_size, self.mask_ratio = mask_patch_size, model_patch_size, mask_ratio
        self.cells = (self.input_size[0] // mask_patch_size, self.input_size[1] // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.mask_count = math.ceil(self.cells[0] * self.cells[1] * mask_ratio)  # the official float ceil

    @property
    def token_grid(self) -> tuple[int, int]:
        """The mask's shape per image: ``(H / model_patch_size, W / model_patch_size)``."""
        return (self.cells[0] * self.scale, self.cells[1] * self.scale)

    def __call__(self, batch_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(batch_size, *token_grid)`` masks, or one ``token_grid`` mask if ``batch_size`` is None (as the
        official per-sample transform)."""
        n = 1 if batch_size is None else batch_size
        cells = self.cells[0] * self.cells[1]
        # a uniformly random subset of mask_count cells per image: the top-k of i.i.d. uniform scores
        scores = torch.rand(n, cells, generator=generator)
        chosen = scores.topk(self.mask_count, dim=1, sorted=False).indices
        mask = torch.zeros(n, cells, dtype=torch.long).scatter_(1, chosen, 1)
        mask = upsample_mask(mask.view(n, *self.cells), self.scale)
        return mask[0] if batch_size is None else mask

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )


def _window_counts(length: int, window: int, like: torch.Tensor) -> torch.Tensor:
    """Pixels of a centred ``window`` that fall inside an axis of ``length``, per position (exact integers)."""
    i = torch.arange(length, device=like.device)
    half = window // 2
    return (torch.clamp(i + half, max=length - 1) - torch.clamp(i - half, min=0) + 1).to(like.dtype)


def normalize_targets(x: torch.Tensor, window: int = 47) -> torch.Tensor:
    """The official ``norm_targets``: each pixel normalised by the mean and unbiased variance of the in-image
    pixels of its ``window x window`` neighbourhood (per channel), ``(x - mean) / sqrt(var + 1e-6)`` with the
    variance clamped at 0.

    Local means by separable box filters (a column pass, then a row pass, padding not counted), the same means
    as the official 2D ``avg_pool2d`` in 2k instead of k² operations per pixel (k = 47).
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"the target-normalisation window must be odd and at least 3, got {window}")
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
    half = window // 2
    moments = torch.cat([x, x * x], dim=1)
    moments = F.avg_pool2d(moments, (window, 1), stride=1, padding=(half, 0), count_include_pad=False)
    moments = F.avg_pool2d(moments, (1, window), stride=1, padding=(0, half), count_include_pad=False)
    mean, mean_sq = moments.chunk(2, dim=1)
    n = torch.outer(_window_counts(x.shape[-2], window, x), _window_counts(x.shape[-1], window, x))
    var = ((mean_sq - mean * mean) * (n / (n - 1))).clamp_min(0.0)
    return (x - mean) / torch.sqrt(var + 1e-6)


def simmim_loss(
    target: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor, patch_size: int
) -> torch.Tensor:
    """Mean L1 error over masked pixel values (the official loss): ``|target - reconstruction|`` summed over the
    pixels of masked patches and all channels, divided by (masked pixels + 1e-5) and by the channel count."""
    return _masked_l1(target, reconstruction, upsample_mask(mask, patch_size).unsqueeze(1), target.shape[1])


def _masked_l1(target: torch.Tensor, prediction: torch.Tensor, weight: torch.Tensor, channels: int) -> torch.Tensor:
    """``sum |target - prediction| * weight / (sum weight + 1e-5) / channels``, with ``weight`` the pixel mask
    broadcast over the channels (in whatever layout the caller holds the pixels)."""
    return ((target - prediction).abs() * weight).sum() / (weight.sum() + 1e-5) / channels


# Keyword arguments of the official SwinTransformerV2 / SwinTransformerV2ForSimMIM constructor.
_OFFICIAL_ENCODER_KEYS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "mlp_ratio",
    "qkv_bias",
    "drop_rate",
    "attn_drop_rate",
    "drop_path_rate",
    "norm_layer",
    "ape",
    "patch_norm",
    "use_checkpoint",
    "pretrained_window_sizes",
)
_OFFICIAL_SIMMIM_KEYS = ("encoder_stride", "in_chans", "patch_size", "norm_target_enable", "norm_target_patch_size")


def _check_keys(given: Mapping[str, Any], allowed: Sequence[str], what: str) -> None:
    for key in given:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown {what} key {key!r}{extra}; known keys: {', '.join(allowed)}")


class PointwiseConv2d(nn.Conv2d):
    """The decoder's 1 x 1 convolution, computed as a linear map over the channels of the channels-last token map.

    Same parameters and keys as ``nn.Conv2d(c_in, c_out, 1)``, same numbers up to summation order. On the CPU torch
    sends this shape (a few pixels, many channels: 6 x 6 x 768 -> 3072 for SwinV2 at 192 px) to its slow reference
    convolution, which took 1.3-1.4x the GEMM's time, forward + backward (1 thread); the GEMM is
    :func:`swinlab.layers.linear.linear` (oneDNN where that is faster)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The map over the last axis of ``x`` (tokens in rows, channels last)."""
        return linear(x, self.weight.flatten(1), self.bias)


class SimMIM(nn.Module):
    """SimMIM around a :class:`SwinTransformerV2` encoder (official keys ``encoder.*``, ``encoder.mask_token``,
    ``decoder.0.weight/bias``).

    ``model(x, mask)`` is the scalar loss; :meth:`reconstruct` the decoder output ``(B, C, H, W)``; ``mask`` is
    ``(B, H/p, W/p)`` at model-patch resolution, 1 = masked (see :class:`MaskGenerator`). ``encoder_stride`` must
    be the encoder's output stride (``patch · 2^(stages-1)``); image sides must be multiples of it.
    ``norm_target``: compare with :func:`normalize_targets` of window ``norm_target_window`` (official
    ``NORM_TARGET.ENABLE`` / ``PATCH_SIZE``; on in the Swin V2 recipe) instead of the raw pixels.
    """

    def __init__(
        self,
        encoder: SwinTransformerV2,
        encoder_stride: int,
        in_chans: int = 3,
        patch_size: int = 4,
        *,
        norm_target: bool = False,
        norm_target_window: int = 47,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, SwinTransformerV2):
            raise TypeError(f"SimMIM needs a SwinTransformerV2 encoder, got {type(encoder).__name__}")
        if encoder.features_only:
            raise ValueError("the SimMIM encoder must not be features_only: SimMIM reads the final-norm token map")
        if encoder.num_classes != 0:
            raise ValueError(f"the SimMIM encoder must have num_classes=0, got {encoder.num_classes}")
        if in_chans != encoder.in_chans:
            raise ValueError(f"in_chans={in_chans} differs from the encoder's in_chans={encoder.in_chans}")
        if encoder.patch_size != (patch_size, patch_size):
            raise ValueError(f"patch_size={patch_size} differs from the encoder's patch size {encoder.patch_size}")
        stride = patch_size * 2 ** (encoder.num_layers - 1)
        if encoder_stride != stride:
            raise ValueError(
                f"encoder_stride={encoder_stride} but the encoder's output stride is {stride} (patch {patch_size} "
                f"x 2^({encoder.num_layers} stages - 1)); the decoder would not restore the image size"
            )
        if norm_target and (norm_target_window < 3 or norm_target_window % 2 == 0):
            raise ValueError(f"norm_target_window must be odd and at least 3, got {norm_target_window}")
        self.encoder = encoder
        encoder.enable_mask_token()
        self.encoder_stride, self.in_chans, self.patch_size = encoder_stride, in_chans, patch_size
        self.norm_target, self.norm_target_window = norm_target, norm_target_window
        self.decoder = nn.Sequential(
            PointwiseConv2d(encoder.num_features, encoder_stride**2 * in_chans),
            nn.PixelShuffle(encoder_stride),
        )

    @classmethod
    def from_official(cls, config: Mapping[str, Any], simmim_config: Mapping[str, Any]) -> SimMIM:
        """Build from the official constructor arguments: ``config`` = kwargs of ``SwinTransformerV2ForSimMIM``
        (``num_classes`` must be 0 if given), ``simmim_config`` = ``encoder_stride`` (required), ``in_chans``,
        ``patch_size`` (default: the encoder's), ``norm_target_enable`` (False), ``norm_target_patch_size`` (47).
        Unknown keys are errors."""
        config, simmim_config = dict(config), dict(simmim_config)
        _check_keys(config, _OFFICIAL_ENCODER_KEYS, "SwinTransformerV2ForSimMIM config")
        _check_keys(simmim_config, _OFFICIAL_SIMMIM_KEYS, "SimMIM config")
        if config.setdefault("num_classes", 0) != 0:
            raise ValueError(f"the SimMIM encoder must have num_classes=0, got {config['num_classes']}")
        if "encoder_stride" not in simmim_config:
            raise ValueError("simmim_config needs encoder_stride (32 for four stages of patch 4)")
        encoder = SwinTransformerV2(**config)
        patch = encoder.patch_size[0] if encoder.patch_size[0] == encoder.patch_size[1] else encoder.patch_size
        return cls(
            encoder,
            simmim_config["encoder_stride"],
            in_chans=simmim_config.get("in_chans", encoder.in_chans),
            patch_size=simmim_config.get("patch_size", patch),
            norm_target=bool(simmim_config.get("norm_target_enable", False)),
            norm_target_window=simmim_config.get("norm_target_patch_size", 47),
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Image sides must be multiples of the encoder stride, or the reconstruction would not match the image."""
        self.encoder._check_input(x)
        h, w = x.shape[-2:]
        if h % self.encoder_stride or w % self.encoder_stride:
            raise ValueError(
                f"image size {(h, w)} (H, W) is not a multiple of the encoder stride {self.encoder_stride}"
            )

    def reconstruct(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, C, H, W)`` for images ``x`` with the patches of ``mask`` hidden."""
        self.check_input(x)
        features = self.encoder.forward_features(x, mask=mask, return_map=True)
        return self.decoder(features)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder is asked to predict: the pixels, or their local normalisation."""
        return normalize_targets(x, self.norm_target_window) if self.norm_target else x

    def loss_and_reconstruction(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and the reconstruction it was computed from (one forward, e.g. for reconstruction pictures)."""
        reconstruction = self.reconstruct(x, mask)
        return simmim_loss(self.target(x), reconstruction, mask, self.patch_size), reconstruction

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss, computing only what it reads.

        Each decoder output token is one ``stride x stride`` cell of the image, and the last stage's token of that
        cell feeds it alone, through the last block's MLP half (token-wise), the final norm and the 1x1 decoder.
        The loss reads masked pixels only, so those layers run on the cells with a masked pixel only (every image
        gets as many as the one with the most; cells without one count zero): with the official mask 60 % of the
        decoder's and of that MLP's work, forward and backward. The same terms as :func:`simmim_loss` on the full
        reconstruction."""
        self.check_input(x)
        b, channels, r = x.shape[0], self.in_chans, self.encoder_stride
        h, w = x.shape[2] // r, x.shape[3] // r
        self.encoder.check_mask(mask, (h * r // self.patch_size, w * r // self.patch_size), b)
        pixels = upsample_mask(mask, self.patch_size).view(b, h, r, w, r).transpose(2, 3).reshape(b, h * w, r * r)
        masked = pixels.any(-1)
        k = max(1, int(masked.sum(1).max()))
        cells = masked.int().sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, k): masked cells first
        prediction = self.decoder[0].tokens(self.encoder.forward_tokens(x, cells, mask=mask))
        target = self.target(x).view(b, channels, h, r, w, r).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, -1, r * r)
        target = target.gather(1, cells[..., None, None].expand(-1, -1, channels, r * r))
        weight = pixels.gather(1, cells.unsqueeze(-1).expand(-1, -1, r * r)).unsqueeze(2)  # every masked pixel
        return _masked_l1(target, prediction.view(b, k, channels, r * r), weight, channels)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def no_weight_decay_keywords(self) -> set[str]:
        # Matched as substrings, so left unprefixed (the official prefixes "encoder." and then matches nothing).
        return set(self.encoder.no_weight_decay_keywords())
