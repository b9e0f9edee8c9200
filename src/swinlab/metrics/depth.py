"""Monocular depth metrics as AiT's official code computes them (``ait/code/model/depth/metrics.py``, the same
functions validate its depth tokenizer): per image, then averaged over images (not pooled over pixels).

Per image: infinite predictions (either sign) become ``max_depth`` and NaN ones ``min_depth`` (the prediction is
otherwise taken as it is: a caller that wants the official test-time clip ``pred >= 1e-3`` applies it first); the
valid pixels are those with ``min_depth < gt < max_depth`` inside the evaluation crop; on them, with ``d`` the
prediction and ``d*`` the ground truth:

- ``d1``, ``d2``, ``d3``: share of pixels with ``max(d / d*, d* / d) < 1.25 ** k``
- ``abs_rel`` = mean(|d − d*| / d*), ``sq_rel`` = mean((d − d*)² / d*)
- ``rmse`` = sqrt(mean((d − d*)²)), ``rmse_log`` = sqrt(mean((ln d − ln d*)²))
- ``log10`` = mean(|log10 d − log10 d*|)
- ``silog`` = sqrt(mean(g²) − 0.5 · mean(g)²), g = ln d − ln d* (λ = 0.5 and no ×100, as the official code; KITTI
  papers often quote λ = 0.85 and ×100)

The Eigen crop is the official box rows 45..470, columns 41..600 of a 480 x 640 map; for another map size the same
box is scaled to it (the official code applies the pixel box to whatever it gets, which on a smaller map would
silently cut a different region).
"""

from __future__ import annotations

import torch

DEPTH_METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
"""Metric names in the official order (higher is better for ``d1``-``d3``, lower for the rest)."""
EIGEN_CROP = (45, 471, 41, 601)
"""``(top, bottom, left, right)`` slice bounds of the Eigen crop on a 480 x 640 NYUv2 map."""
EIGEN_SIZE = (480, 640)


def eigen_crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """The Eigen crop's slice bounds for a ``height x width`` map: exact on 480 x 640, scaled otherwise."""
    if (height, width) == EIGEN_SIZE:
        return EIGEN_CROP
    top, bottom, left, right = EIGEN_CROP
    h0, w0 = EIGEN_SIZE
    return (round(top * height / h0), round(bottom * height / h0), round(left * width / w0), round(right * width / w0))


def _as_maps(x: torch.Tensor, what: str) -> torch.Tensor:
    """``(B, H, W)`` from ``(B, 1, H, W)``, ``(B, H, W)`` or ``(H, W)``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"depth {what} must be a floating-point tensor in metres, got {kind}")
    if x.ndim == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.ndim == 2:
        return x.unsqueeze(0)
    if x.ndim != 3:
        raise ValueError(f"depth {what} must be (B, 1, H, W), (B, H, W) or (H, W), got shape {tuple(x.shape)}")
    return x


def valid_mask(
    gt: torch.Tensor, min_depth: float = 1e-3, max_depth: float = 10.0, crop: str | None = None
) -> torch.Tensor:
    """Pixels that count, ``(B, H, W)`` bool: ``min_depth < gt < max_depth`` and, with ``crop='eigen'``, inside
    the Eigen crop."""
    gt = _as_maps(gt, "ground truth")
    valid = (gt > min_depth) & (gt < max_depth)
    if crop is None:
        return valid
    if crop != "eigen":
        raise ValueError(f"depth evaluation crop must be None or 'eigen', got {crop!r}")
    top, bottom, left, right = eigen_crop_box(*gt.shape[-2:])
    box = torch.zeros_like(valid)
    box[:, top:bottom, left:right] = True
    return valid & box


def depth_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    *,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    crop: str | None = None,
) -> dict[str, torch.Tensor]:
    """Every metric of :data:`DEPTH_METRICS` for each image of the batch: ``{name: (B,)}`` in ``pred``'s dtype.

    ``pred`` and ``gt`` are depth maps in metres, ``(B, 1, H, W)``, ``(B, H, W)`` or one ``(H, W)`` map. An image
    with no valid pixel is an error (its metrics would be NaN and poison the mean over images).
    """
    if min_depth >= max_depth:
        raise ValueError(f"min_depth {min_depth} must be below max_depth {max_depth}")
    pred, gt = _as_maps(pred, "prediction"), _as_maps(gt, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground-truth shape {tuple(gt.shape)}")
    pred = torch.nan_to_num(pred, nan=min_depth, posinf=max_depth, neginf=max_depth)  # ±inf -> max, as officially
    valid = valid_mask(gt, min_depth, max_depth, crop)
    rows: list[torch.Tensor] = []
    for i in range(gt.shape[0]):
        if not valid[i].any():
            raise ValueError(
                f"depth image {i} of the batch has no valid pixel ({min_depth:g} < gt < {max_depth:g}"
                + (", inside the Eigen crop)" if crop else ")")
            )
        rows.append(_image_metrics(pred[i][valid[i]], gt[i][valid[i]]))
    return {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(DEPTH_METRICS)}


def _image_metrics(d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The nine metrics of one image's valid pixels ``d`` (prediction) and ``t`` (ground truth)."""
    ratio = torch.maximum(t / d, d / t)
    deltas = [(ratio < 1.25**k).sum().to(d.dtype) / ratio.numel() for k in (1, 2, 3)]
    diff = d - t
    g = torch.log(d) - torch.log(t)
    mean_sq_log = g.pow(2).mean()
    return torch.stack(
        [
            *deltas,
            (diff.abs() / t).mean(),
            (diff.pow(2) / t).mean(),
            diff.pow(2).mean().sqrt(),
            mean_sq_log.sqrt(),
            (torch.log10(d) - torch.log10(t)).abs().mean(),
            (mean_sq_log - 0.5 * g.mean().pow(2)).sqrt(),
        ]
    )


def mean_depth_metrics(
    pred: torch.Tensor,
    gt: torch.Tensor,
    *,
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    crop: str | None = None,
) -> dict[str, float]:
    """The official figures of a set: :func:`depth_metrics` averaged over its images."""
    per_image = depth_metrics(pred, gt, min_depth=min_depth, max_depth=max_depth, crop=crop)
    return {name: float(values.double().mean()) for name, values in per_image.items()}
