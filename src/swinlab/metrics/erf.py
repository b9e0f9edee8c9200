"""Effective receptive fields (Luo et al. 2016) and learned GMConv sigmas, as arrays and as pictures.

The ERF of a layer is how strongly each input pixel moves the layer's centre unit: the mean over a batch of
``|d (sum over channels of the centre output) / d input|``. It is what GMConv claims to reshape, so these
functions let a user see what a trained GMConv changed. Plots import matplotlib lazily.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from swinlab.layers.gmconv import GMConv2d


class _Stop(Exception):
    """Raised by the capture hook: nothing after the probed layer needs to run."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def _capture(model: nn.Module, inputs: torch.Tensor, layer: str | None) -> torch.Tensor:
    if layer is None:
        return model(inputs)
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        raise ValueError(f"model has no layer {layer!r}; conv layers: {', '.join(convs) or 'none'}") from None

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
        raise _Stop(output)

    handle = module.register_forward_hook(hook)
    try:
        model(inputs)
    except _Stop as stop:
        return stop.output
    finally:
        handle.remove()
    raise RuntimeError(f"layer {layer!r} did not run in the forward pass")


def effective_receptive_field(model: nn.Module, inputs: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """ERF map ``(H, W)`` of ``layer``'s centre unit (``layer=None``: the model's own output, which must then be
    a ``(B, C, h, w)`` map), averaged over the batch ``inputs`` ``(B, C, H, W)`` and over input channels.

    The model runs in eval mode (BatchNorm must not mix samples) and its mode is restored afterwards; the
    forward stops at ``layer``. The map is not normalised (divide by ``.max()`` to compare shapes).
    """
    if inputs.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(inputs.shape)}")
    was_training = model.training
    model.eval()
    try:
        x = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = _capture(model, x, layer)
            if not isinstance(out, torch.Tensor) or out.ndim != 4:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"ERF needs a (B, C, h, w) output at {layer or 'the model output'!r}, got {shape}")
            centre = out[:, :, out.shape[2] // 2, out.shape[3] // 2]
            (grad,) = torch.autograd.grad(centre.sum(), x)
    finally:
        model.train(was_training)
    return grad.abs().mean(dim=(0, 1))


def erf_spread(erf: torch.Tensor) -> float:
    """RMS distance (pixels) of the ERF mass from its centroid: one number saying how wide the field is."""
    weights = erf / erf.sum()
    rows = torch.arange(erf.shape[0], dtype=erf.dtype, device=erf.device)[:, None]
    cols = torch.arange(erf.shape[1], dtype=erf.dtype, device=erf.device)[None, :]
    r0, c0 = (weights * rows).sum(), (weights * cols).sum()
    return float((weights * ((rows - r0) ** 2 + (cols - c0) ** 2)).sum().sqrt())


def learned_sigmas(model: nn.Module) -> dict[str, torch.Tensor]:
    """The static sigma of every masked GMConv2d, by qualified name (flattened, detached, on the CPU)."""
    return {
        name: m.sigma.detach().flatten().cpu()
        for name, m in model.named_modules()
        if isinstance(m, GMConv2d) and m.log_sigma is not None
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_erf_heatmap(erf: torch.Tensor, path: str | Path, title: str | None = None) -> Path:
    """Write the ERF map as a PNG heatmap (normalised to its maximum) and return the path."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    image = ax.imshow((erf / erf.max()).cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, label="|d centre / d input| (normalised)")
    ax.set_title(title or f"ERF (spread {erf_spread(erf):.1f} px)")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def save_sigma_plot(sigmas: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write one box per GMConv layer (its sigmas, in kernel-index units) in network order as a PNG."""
    if not sigmas:
        raise ValueError("no GMConv sigmas to plot (the model has no masked GMConv2d layer)")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(sigmas)), 4))
    ax.boxplot([s.numpy() for s in sigmas.values()])
    ax.set_xticks(range(1, len(sigmas) + 1), list(sigmas), rotation=90, fontsize=7)
    ax.set_ylabel("sigma (kernel-index units)")
    ax.set_title("learned GMConv sigma per layer")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
