"""AiT's per-task tokenizer: a convolutional VQ-VAE that turns a dense label (a depth map in metres, or a binary
instance mask cropped to its box) into a short grid of code ids, and turns ids — or soft tokens, the
softmax-weighted mixtures of codes — back into a map.

Faithful to the official trainable ``VQVAE`` (SwinTransformer/AiT ``vae/models/VQVAE.py``, same state-dict keys,
so an official checkpoint loads strictly) and to the soft decode of its task-head copy (``ait/code/model/vqvae.py``:
``softmax(τ · logits)`` — τ *multiplies* the logits, so τ < 1 flattens the mixture and the hard decode is the
τ → ∞ limit). Beyond the official code: input checks that name the problem (dtype, shape, invalid maps, sizes the
downsampling cannot divide), a clear error when a checkpoint of another geometry is loaded (a depth tokenizer into
a mask tokenizer), float64 support (no hard ``.float()`` cast), and codebook health options (see
:mod:`swinlab.ait.codebook`).
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.ait.codebook import EMACodebook, LearnedCodebook
from swinlab.models.registry import register_model

KINDS = ("depth", "mask")
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    # depth: metres, invalid = 0, not rescaled (the official config); τ = 0.8 as the official depth heads.
    "depth": {"use_norm": False, "max_value": 10.0, "loss": "mse_ignore_zero", "tau": 0.8},
    # instance masks: {0, 1} rescaled to ±1, plain MSE; the official mask heads keep τ = 1.
    "mask": {"use_norm": True, "max_value": 1.0, "loss": "mse", "tau": 1.0},
}


# The valid-pixel losses average by masked sums rather than boolean indexing: no data-dependent shapes, so they
# trace (torch.compile) and run on the meta device (``swinlab info``); they equal the official means to rounding.
def _mse_ignore_zero(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, target - out, 0.0).pow(2).sum() / valid.sum()


def _si_log(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, lambd: float = 0.5) -> torch.Tensor:
    # invalid pixels get log(1) - log(1) = 0 (and no gradient), whatever the prediction there
    diff = torch.log(torch.where(valid, target, 1.0)) - torch.log(torch.where(valid, out, 1.0))
    n = valid.sum()
    return torch.sqrt(diff.pow(2).sum() / n - lambd * (diff.sum() / n).pow(2))


LOSSES = {
    "mse": lambda out, target, valid: F.mse_loss(out, target),
    "l1": lambda out, target, valid: F.l1_loss(out, target),
    "smooth_l1": lambda out, target, valid: F.smooth_l1_loss(out, target),
    "mse_ignore_zero": _mse_ignore_zero,
    "si_log": _si_log,
}
IGNORE_ZERO_LOSSES = ("mse_ignore_zero", "si_log")
"""Losses that take only pixels whose target is > 0 (0 marks an invalid depth pixel)."""

OFFICIAL_KEYS = {
    "image_size": 256,
    "num_resnet_blocks": 2,
    "downsample_ratio": 16,
    "num_tokens": 512,
    "codebook_dim": 512,
    "hidden_dim": 16,
    "channels": 1,
    "use_norm": True,
    "train_objective": "regression",
    "max_value": 1.0,
    "residul_type": "v1",
    "loss_type": "mse",
    "ema_decay": 0.99,
    "commitment_cost": 0.25,
}
"""Keyword arguments of the official ``VQVAE`` (spelling kept, ``residul_type`` included) and their defaults."""

OFFICIAL_HEAD_KEYS = {
    "token_length": 16,
    "mask_size": 64,
    "embedding_dim": 512,
    "num_embeddings": 1024,
    "pretrained": None,
    "freeze": True,
    "num_resnet_blocks": 2,
    "hidden_dim": 256,
    "use_norm": True,
    "use_sigmoid": False,
    "tau": 1.0,
}
"""Keyword arguments of the task-head copy (``vae_cfg`` in AiT's configs); ``pretrained`` defaults to no file here."""


class ResidualBlock(nn.Module):
    """``x + [conv3x3, ReLU, conv3x3, ReLU, conv1x1](x)``, every conv with a bias (official ``v1``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualBlockBN(nn.Module):
    """``ReLU(x + [conv3x3, BN, ReLU, conv3x3, BN](x))`` with bias-free convs (official ``v2``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim),
        )  # fmt: skip
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.net(x))


RESIDUALS = {"v1": ResidualBlock, "v2": ResidualBlockBN}


def build_encoder(in_chans: int, width: int, halvings: int, blocks: int, code_dim: int, residual: str) -> nn.Sequential:
    """Stride-2 4x4 convs (``halvings`` of them, widths doubling from ``width``), residual blocks, and a 1x1
    projection to the code dimension; ReLUs sit at the odd indices as in the official ``nn.Sequential``."""
    layers: list[nn.Module] = []
    dim, prev = width, in_chans
    for i in range(halvings):
        dim = width * 2**i
        layers += [nn.Conv2d(prev, dim, 4, stride=2, padding=1), nn.ReLU()]
        prev = dim
    layers += [RESIDUALS[residual](dim) for _ in range(blocks)]
    layers.append(nn.Conv2d(dim, code_dim, 1))
    return nn.Sequential(*layers)


def build_decoder(
    out_chans: int, width: int, halvings: int, blocks: int, code_dim: int, residual: str
) -> nn.Sequential:
    """The mirror: 1x1 conv from the code dimension to the encoder's top width, residual blocks, one same-width
    stride-2 transposed conv, then transposed convs halving the width back to ``width``, and a 1x1 conv out."""
    dim = width * 2 ** (halvings - 1)
    layers: list[nn.Module] = [nn.Conv2d(code_dim, dim, 1), nn.ReLU()]
    layers += [RESIDUALS[residual](dim) for _ in range(blocks)]
    layers += [nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1), nn.ReLU()]
    for _ in range(halvings - 1):
        layers += [nn.ConvTranspose2d(dim, dim // 2, 4, stride=2, padding=1), nn.ReLU()]
        dim //= 2
    layers.append(nn.Conv2d(dim, out_chans, 1))
    return nn.Sequential(*layers)


def official_geometry(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
    """The architecture an official-layout tokenizer state dict describes (``None`` if it is not one)."""
    first, codes = state_dict.get("encoder.0.weight"), state_dict.get("_vq_vae._embedding")
    if codes is None:
        codes = state_dict.get("_vq_vae._embedding.weight")
    if first is None or codes is None or first.ndim != 4:
        return None
    convs, blocks, residual = 0, set(), "v1"
    for key, value in state_dict.items():
        match = re.fullmatch(r"encoder\.(\d+)\.(net\.(\d+)\.)?weight", key)
        if not match:
            continue
        if match.group(2) is None and value.ndim == 4 and value.shape[-1] == 4:
            convs += 1
        elif match.group(2) is not None:
            blocks.add(match.group(1))
            residual = "v2" if value.ndim == 1 else residual  # a BatchNorm weight inside the block
    return {
        "downsample": 2**convs,
        "width": first.shape[0],
        "channels": first.shape[1],
        "residual_blocks": len(blocks),
        "residual": residual,
        "codebook": tuple(codes.shape),
    }


def _describe(geometry: Mapping[str, Any]) -> str:
    k, d = geometry["codebook"]
    return (
        f"(downsample {geometry['downsample']}, width {geometry['width']}, {geometry['channels']} channel(s), "
        f"{geometry['residual_blocks']} {geometry['residual']} residual blocks, {k} x {d} codebook)"
    )


def _check_keys(config: Mapping[str, Any], known: Mapping[str, Any] | tuple[str, ...], what: str) -> None:
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {what} key {key!r}{hint}; known keys: {', '.join(known)}")


class SoftVQVAE(nn.Module):
    """A VQ-VAE tokenizer of one label kind (``'depth'``: metres, 0 = invalid; ``'mask'``: values in
    [0, ``max_value``]) with an EMA codebook (or a learned one when ``ema_decay=0``).

    ``image_size`` is the training crop (tokens per side = ``image_size / downsample``); any input whose sides are
    multiples of ``downsample`` (a power of two) works. ``width`` is the first conv's width (the official
    ``hidden_dim``); widths double at each of the ``log2(downsample) − 1`` extra stride-2 stages. ``use_norm``
    maps values ``v`` to ``2(v / max_value − 0.5)`` before the encoder and back after the decoder. ``loss`` is the
    reconstruction loss (:data:`LOSSES`), ``tau`` the default soft-decode multiplier. ``codebook_init`` and
    ``dead_code_threshold`` select the official N(0, 1) codebook or the data-driven one with dead-code reseeding
    (:class:`~swinlab.ait.codebook.EMACodebook`). Kind-dependent arguments left ``None`` take the kind's official
    values.

    ``encode`` gives ids ``(B, h, w)``; ``decode_ids`` / ``decode_soft`` give maps ``(B, C, H, W)`` in label
    units; ``model(x, label)`` is a training step's forward (see :meth:`forward`).
    """

    def __init__(
        self,
        kind: str = "depth",
        image_size: int = 480,
        downsample: int = 32,
        num_codes: int = 128,
        code_dim: int = 512,
        width: int = 16,
        num_res_blocks: int = 2,
        in_chans: int = 1,
        use_norm: bool | None = None,
        max_value: float | None = None,
        loss: str | None = None,
        residual: str = "v1",
        ema_decay: float = 0.99,
        commitment: float = 0.25,
        tau: float | None = None,
        codebook_init: str = "data",
        dead_code_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")
        defaults = _KIND_DEFAULTS[kind]
        use_norm = defaults["use_norm"] if use_norm is None else use_norm
        max_value = defaults["max_value"] if max_value is None else max_value
        loss = defaults["loss"] if loss is None else loss
        tau = defaults["tau"] if tau is None else tau
        if tau < 0:
            raise ValueError(f"soft-decode tau (the logits' multiplier) must be >= 0, got {tau}")
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
        if image_size < downsample or image_size % downsample:
            raise ValueError(f"image size {image_size} is not a multiple of the tokenizer's downsampling {downsample}")
        if loss not in LOSSES:
            close = difflib.get_close_matches(loss, list(LOSSES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown reconstruction loss {loss!r}{hint}; known: {', '.join(LOSSES)}")
        if residual not in RESIDUALS:
            raise ValueError(f"residual block type must be one of {tuple(RESIDUALS)}, got {residual!r}")
        if use_norm and loss in IGNORE_ZERO_LOSSES:
            raise ValueError(f"loss {loss!r} treats 0 as invalid, but use_norm maps 0 to -1: use use_norm=False")
        if max_value <= 0:
            raise ValueError(f"max_value must be > 0, got {max_value}")
        self.kind, self.image_size, self.downsample = kind, image_size, downsample
        self.num_codes, self.code_dim, self.in_chans = num_codes, code_dim, in_chans
        self.use_norm, self.max_value, self.loss_type, self.tau = use_norm, float(max_value), loss, tau
        halvings = int(math.log2(downsample))
        self.encoder = build_encoder(in_chans, width, halvings, num_res_blocks, code_dim, residual)
        self.decoder = build_decoder(in_chans, width, halvings, num_res_blocks, code_dim, residual)
        if ema_decay > 0:
            self._vq_vae = EMACodebook(
                num_codes, code_dim, commitment, ema_decay, 1e-5, codebook_init, dead_code_threshold
            )
        else:
            self._vq_vae = LearnedCodebook(num_codes, code_dim, commitment)

    @classmethod
    def from_official(cls, config: Mapping[str, Any], **options: Any) -> SoftVQVAE:
        """Build from the keyword arguments of the official ``VQVAE`` (:data:`OFFICIAL_KEYS`, official defaults
        for missing ones); unknown keys are errors. The kind is ``'depth'`` for a loss that ignores zeros, else
        ``'mask'``. The codebook starts as the official one (N(0, 1), no reseeding); ``options`` override that
        and any other :class:`SoftVQVAE` argument (``kind``, ``tau``, ``codebook_init``, ...)."""
        _check_keys(config, OFFICIAL_KEYS, "official VQVAE config")
        cfg = {**OFFICIAL_KEYS, **config}
        if cfg["train_objective"] != "regression":
            raise ValueError(f"only train_objective='regression' is supported, got {cfg['train_objective']!r}")
        args = {
            "kind": "depth" if cfg["loss_type"] in IGNORE_ZERO_LOSSES else "mask",
            "image_size": cfg["image_size"],
            "downsample": cfg["downsample_ratio"],
            "num_codes": cfg["num_tokens"],
            "code_dim": cfg["codebook_dim"],
            "width": cfg["hidden_dim"],
            "num_res_blocks": cfg["num_resnet_blocks"],
            "in_chans": cfg["channels"],
            "use_norm": cfg["use_norm"],
            "max_value": cfg["max_value"],
            "loss": cfg["loss_type"],
            "residual": cfg["residul_type"],
            "ema_decay": cfg["ema_decay"],
            "commitment": cfg["commitment_cost"],
            "codebook_init": "official",
            "dead_code_threshold": 0.0,
        }
        _check_keys(options, (*args, "tau"), "SoftVQVAE option")
        return cls(**{**args, **options})

    @classmethod
    def from_official_head(cls, config: Mapping[str, Any], **options: Any) -> SoftVQVAE:
        """Build the frozen tokenizer an AiT task head describes (``vae_cfg`` of ``ait/configs``,
        :data:`OFFICIAL_HEAD_KEYS`): the grid side is ``sqrt(token_length)``, the downsampling ``mask_size`` / side,
        and ``hidden_dim`` is the decoder's top width (first width x downsample / 2); one channel, ``max_value`` 1,
        EMA 0.99, β 0.25, ``v1`` blocks, as the head hard-wires. ``use_norm=False`` makes a depth tokenizer.
        ``pretrained`` (a path) is loaded strictly; ``freeze`` leaves the model in eval mode without gradients."""
        _check_keys(config, OFFICIAL_HEAD_KEYS, "official task-head VQVAE config")
        cfg = {**OFFICIAL_HEAD_KEYS, **config}
        if cfg["use_sigmoid"]:
            raise ValueError(
                "use_sigmoid=True (a sigmoid on decoded maps) is not supported; no released config uses it"
            )
        side = math.isqrt(cfg["token_length"])
        if side * side != cfg["token_length"] or cfg["mask_size"] % side:
            raise ValueError(
                f"token_length {cfg['token_length']} is not a square grid dividing mask_size {cfg['mask_size']}"
            )
        downsample = cfg["mask_size"] // side
        official = {
            "image_size": cfg["mask_size"],
            "num_resnet_blocks": cfg["num_resnet_blocks"],
            "downsample_ratio": downsample,
            "num_tokens": cfg["num_embeddings"],
            "codebook_dim": cfg["embedding_dim"],
            "hidden_dim": cfg["hidden_dim"] // max(downsample // 2, 1),
            "use_norm": cfg["use_norm"],
            "loss_type": "mse" if cfg["use_norm"] else "mse_ignore_zero",
        }
        vae = cls.from_official(official, **{"tau": cfg["tau"], **options})
        if cfg["pretrained"] is not None:
            from swinlab.models.checkpoints import load_official  # safetensors is imported only when needed

            load_official(vae, cfg["pretrained"], strict=True)
        return vae.eval().requires_grad_(False) if cfg["freeze"] else vae

    # ----------------------------------------------------------------------------------------------- inputs
    @property
    def grid(self) -> tuple[int, int]:
        """Token grid ``(h, w)`` of an ``image_size`` input."""
        side = self.image_size // self.downsample
        return side, side

    @property
    def img_size(self) -> int:
        """``image_size`` under the name the toolkit's tools read (``swinlab info`` measures this input)."""
        return self.image_size

    def _as_batch(self, x: torch.Tensor, what: str) -> torch.Tensor:
        """``(B, C, H, W)`` (or ``(B, H, W)`` for one channel) checked for the kind, in the model's dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self.kind} {what} must be a tensor, got {type(x).__name__}")
        if x.ndim == 3 and self.in_chans == 1:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{self.kind} {what} must be (B, {self.in_chans}, H, W)"
                + (" or (B, H, W)" if self.in_chans == 1 else "")
                + f", got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % self.downsample or w % self.downsample or not h or not w:
            raise ValueError(
                f"{self.kind} {what} size {(h, w)} (H, W) is not a multiple of the tokenizer's downsampling "
                f"{self.downsample}"
            )
        if x.device.type == "meta":  # shapes only (``swinlab info``): no values to check
            return x.to(self.encoder[0].weight.dtype)
        if self.kind == "depth":
            if not x.is_floating_point():
                raise TypeError(
                    f"depth {what} must be floating-point metres, got {x.dtype} "
                    "(16-bit depth PNGs hold millimetres: divide by 1000)"
                )
            if not torch.isfinite(x).all() or (x < 0).any():
                raise ValueError(f"depth {what} must be finite and >= 0 (0 marks an invalid pixel)")
        else:
            if x.is_complex():
                raise TypeError(f"mask {what} must be real, got {x.dtype}")
            if x.numel() and (x.min() < 0 or x.max() > self.max_value or not torch.isfinite(x.float()).all()):
                raise ValueError(
                    f"mask {what} values must lie in [0, {self.max_value:g}], got [{x.min().item():g}, "
                    f"{x.max().item():g}]"
                )
        return x.to(self.encoder[0].weight.dtype)

    def _require_valid(self, depth: torch.Tensor, what: str) -> None:
        if depth.device.type == "meta":
            return
        has_valid = (depth > 0).flatten(1).any(1)
        if not has_valid.all():
            i = int((~has_valid).nonzero()[0])
            raise ValueError(f"depth {what} {i} of the batch has no valid pixel (every value is 0 = invalid)")

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * (x / self.max_value - 0.5) if self.use_norm else x

    def _denorm(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 0.5 + 0.5) * self.max_value if self.use_norm else x

    @contextlib.contextmanager
    def _eval(self) -> Iterator[None]:
        """Eval mode for the duration (batch-norm blocks must not update statistics while tokenising)."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ----------------------------------------------------------------------------------------------- API
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``(B, h, w)`` int64 (raster order when flattened); never changes the codebook."""
        x = self._as_batch(x, "map")
        if self.kind == "depth":
            self._require_valid(x, "map")
        with self._eval():
            return self._vq_vae.ids(self.encoder(self._norm(x)))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder output ``(B, C, H, W)`` of a latent map ``(B, D, h, w)``, in label units."""
        return self._denorm(self.decoder(latents))

    def decode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, C, H, W)`` of token ids ``(B, h, w)``, or ``(B, N)`` in raster order (see :meth:`token_grid`)."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.ndim not in (2, 3):
            raise TypeError(
                f"token ids must be an integer (B, h, w) or (B, N) tensor, got {ids.dtype} {tuple(ids.shape)}"
            )
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_codes):
            raise ValueError(f"token ids must lie in [0, {self.num_codes}), got [{int(ids.min())}, {int(ids.max())}]")
        if ids.ndim == 2:
            ids = ids.view(ids.shape[0], *self.token_grid(ids.shape[1]))
        return self.decode_latents(self._vq_vae.embed(ids.long()))

    def decode_soft(self, logits: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """Maps ``(B, C, H, W)`` of soft tokens: ``logits`` (B, N, K) over the codes, token n at raster position n;
        each token's latent is ``Σ_k softmax(tau · logits)_k · code_k``: ``tau`` multiplies the logits, as in the
        official heads (depth 0.8, masks 1; default the model's), so it is an inverse temperature: the hard decode of
        the arg-max ids is the limit of temperature ``1 / tau → 0`` and ``tau = inf`` is that decode exactly, while
        ``tau = 0`` mixes every code evenly. Differentiable in ``logits`` for finite ``tau`` (AiT's auxiliary loss
        through the frozen decoder)."""
        if logits.ndim != 3 or logits.shape[-1] != self.num_codes:
            raise ValueError(f"soft-token logits must be (B, N, {self.num_codes}), got shape {tuple(logits.shape)}")
        tau = self.tau if tau is None else tau
        if tau < 0:
            raise ValueError(f"soft-decode tau (the logits' multiplier) must be >= 0, got {tau}")
        if math.isinf(tau):
            return self.decode_ids(logits.argmax(-1))
        b, n, k = logits.shape
        # codes along dim 1 of a (B, K, h, w) map, as the official heads lay the logits out: the same roundings
        scaled = logits.transpose(1, 2).reshape(b, k, *self.token_grid(n)) * tau
        return self.decode_latents(self._vq_vae.embed_soft(torch.softmax(scaled, dim=1)))

    def token_grid(self, n: int) -> tuple[int, int]:
        """Grid ``(h, w)`` of ``n`` raster-ordered tokens: the ``image_size`` grid if it has ``n`` cells, else a
        square one."""
        if n == self.grid[0] * self.grid[1]:
            return self.grid
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} tokens make neither the {self.grid} grid nor a square one")
        return side, side

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> dict[str, Any]:
        """One pass as the official training forward: encode ``x`` (e.g. patch-masked, see
        :func:`~swinlab.ait.masking.mask_patches`), quantise (in training mode the EMA codebook is updated after
        the ids and losses were computed from the old one), decode, and compare with ``label`` (default ``x``).

        Returns ``loss`` = ``recon_loss`` + ``vq_loss``, ``perplexity``, ``usage`` (fraction of codes used),
        ``reseeded`` (dead codes replaced), ``ids`` (B, h, w) and ``output`` (B, C, H, W) in label units.
        """
        x = self._as_batch(x, "input")
        target = x if label is None else self._as_batch(label, "label")
        if target.shape != x.shape:
            raise ValueError(f"label shape {tuple(target.shape)} differs from input shape {tuple(x.shape)}")
        valid = None
        if self.loss_type in IGNORE_ZERO_LOSSES:
            self._require_valid(target, "label")
            valid = target > 0
        q = self._vq_vae(self.encoder(self._norm(x)))
        out = self.decoder(q.latents)
        recon = LOSSES[self.loss_type](out, self._norm(target), valid)
        return {
            "loss": recon + q.loss,
            "recon_loss": recon,
            "vq_loss": q.loss,
            "perplexity": q.perplexity,
            "usage": q.usage,
            "reseeded": q.reseeded,
            "ids": q.ids,
            "output": self._denorm(out),
        }

    # ----------------------------------------------------------------------------------------------- loading
    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise a one-line error when an official-layout tokenizer checkpoint has another geometry (e.g. the
        depth tokenizer loaded into a mask tokenizer); other layouts are left to the usual key checks."""
        theirs = official_geometry(state_dict)
        ours = official_geometry(self.state_dict())
        if theirs is None or theirs == ours:
            return
        name = next((f"{k} tokenizer" for k, g in _OFFICIAL_GEOMETRY.items() if g == theirs), "tokenizer")
        raise ValueError(
            f"checkpoint holds a {name} {_describe(theirs)}, but this model is a {self.kind} tokenizer "
            f"{_describe(ours)}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.check_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_DEPTH = {"kind": "depth", "image_size": 480, "downsample": 32, "num_codes": 128, "code_dim": 512, "width": 16}
_MASK = {"kind": "mask", "image_size": 64, "downsample": 16, "num_codes": 128, "code_dim": 512, "width": 16}
_OFFICIAL_GEOMETRY = {
    name: {
        "downsample": cfg["downsample"],
        "width": cfg["width"],
        "channels": 1,
        "residual_blocks": 2,
        "residual": "v1",
        "codebook": (cfg["num_codes"], cfg["code_dim"]),
    }
    for name, cfg in (("depth", _DEPTH), ("mask", _MASK))
}
"""What the released depth and instance-mask tokenizers look like, to name a foreign checkpoint."""


@register_model(meta={"params": "7.69M", "tokens": "15x15", "source": "AiT vae/configs/depth/ait_depth_vqvae.py"})
def ait_depth_vqvae(**kwargs: Any) -> SoftVQVAE:
    """The official depth tokenizer's size: 480 px → 15x15 tokens, 128 codes of 512 dims."""
    return SoftVQVAE(**{**_DEPTH, **kwargs})


@register_model(meta={"params": "1.98M", "tokens": "4x4", "source": "AiT vae/configs/insseg/ait_insseg_vqvae.py"})
def ait_insseg_vqvae(**kwargs: Any) -> SoftVQVAE:
    """The official instance-mask tokenizer's size: 64 px box crops → 4x4 tokens, 128 codes of 512 dims."""
    return SoftVQVAE(**{**_MASK, **kwargs})
