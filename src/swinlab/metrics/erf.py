"""Effective receptive fields (Luo et al. 2016) and learned GMConv sigmas, as arrays, tables and pictures.

The ERF of a layer is how strongly each input pixel moves the layer's centre unit: the mean over a batch of
``|d (sum over channels of the centre output) / d input|``. It is what GMConv claims to reshape, so these
functions (and ``swinlab erf``, which loads runs and calls :func:`erf_report`) let a user see what a trained GMConv
changed: two models side by side on the same images, the radial profile of each ERF, and every layer's learned
sigma against its initial value. Plots import matplotlib lazily; nothing here loads runs or data.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from swinlab.layers.gmconv import GMConv2d


class _Stop(Exception):
    """Raised by the capture hook: nothing after the probed layer needs to run."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


def _conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _capture(model: nn.Module, inputs: torch.Tensor, layer: str | None) -> torch.Tensor:
    if layer is None:
        return model(inputs)
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        convs = ", ".join(_conv_names(model)) or "none"
        raise ValueError(f"model has no layer {layer!r}; conv layers: {convs}") from None

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


def _centroid_distance(erf: torch.Tensor) -> torch.Tensor:
    """Distance (pixels) of every map position from the ERF's centre of mass."""
    weights = erf / erf.sum()
    rows = torch.arange(erf.shape[0], dtype=erf.dtype, device=erf.device)[:, None]
    cols = torch.arange(erf.shape[1], dtype=erf.dtype, device=erf.device)[None, :]
    r0, c0 = (weights * rows).sum(), (weights * cols).sum()
    return ((rows - r0) ** 2 + (cols - c0) ** 2).sqrt()


def erf_spread(erf: torch.Tensor) -> float:
    """RMS distance (pixels) of the ERF mass from its centroid: one number saying how wide the field is."""
    return float(((erf / erf.sum()) * _centroid_distance(erf) ** 2).sum().sqrt())


def radial_profile(erf: torch.Tensor) -> torch.Tensor:
    """Mean of the max-normalised ERF in 1-pixel rings around its centroid: index ``r`` holds the distances
    that round to ``r``. A concentrated field falls off fast; a square kernel's stays flat, then drops."""
    rings = _centroid_distance(erf).round().long().flatten()
    values = (erf / erf.max()).flatten()
    sums = torch.zeros(int(rings.max()) + 1, dtype=erf.dtype).index_add_(0, rings, values)
    counts = torch.zeros_like(sums).index_add_(0, rings, torch.ones_like(values))
    return sums / counts.clamp_min(1)


# -- learned sigmas --


@dataclass(frozen=True)
class SigmaRow:
    """One masked GMConv2d: its kernel, initial sigma(s) and current static sigmas (flattened, on the CPU)."""

    layer: str
    kernel: tuple[int, int]
    init: tuple[float, ...]
    values: torch.Tensor

    def format(self) -> str:
        v = self.values
        init = "/".join(f"{s:.2f}" for s in self.init)
        return (
            f"{self.layer:<24} {self.kernel[0]}x{self.kernel[1]:<4} {init:>9} {float(v.median()):>7.3f} "
            f"{float(v.min()):>7.3f} {float(v.max()):>7.3f} {v.numel():>5}"
        )


SIGMA_HEADER = f"{'layer':<24} {'kernel':<6} {'init':>9} {'median':>7} {'min':>7} {'max':>7} {'n':>5}"


def sigma_table(model: nn.Module) -> list[SigmaRow]:
    """Every masked GMConv2d of ``model`` in network order (an anisotropic layer lists both axes' sigmas)."""
    return [
        SigmaRow(name, tuple(m.kernel_size), m.sigma_init, m.sigma.detach().flatten().cpu())
        for name, m in model.named_modules()
        if isinstance(m, GMConv2d) and m.log_sigma is not None
    ]


# -- pictures --


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_erf_figure(erfs: Mapping[str, torch.Tensor], path: str | Path, title: str | None = None) -> Path:
    """One heatmap per labelled ERF (each normalised to its maximum, spread in the title) and their radial
    profiles overlaid in a last panel, so two models read side by side; returns the PNG's path."""
    if not erfs:
        raise ValueError("no ERF maps to plot")
    plt = _pyplot()
    n = len(erfs)
    rows = 1 if n < 4 else 2  # more than three maps wrap onto a second row
    cols = math.ceil((n + 1) / rows)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 0.8, 3.4 * rows), squeeze=False, layout="constrained")
    axes = axes.flatten()
    for ax, (label, erf) in zip(axes, erfs.items(), strict=False):
        image = ax.imshow((erf / erf.max()).cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{label}\n{erf.shape[0]}x{erf.shape[1]} input, spread {erf_spread(erf):.2f} px", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=list(axes[:n]), shrink=0.8 / rows, label="|d centre / d input| / max")
    for ax in axes[n + 1 :]:
        ax.set_visible(False)
    profile_ax = axes[n]
    for label, erf in erfs.items():
        profile_ax.plot(radial_profile(erf.cpu()).numpy(), marker=".", label=label)
    profile_ax.set_xlabel("distance from centre (px)")
    profile_ax.set_ylabel("mean normalised ERF")
    profile_ax.set_title("radial profile", fontsize=9)
    profile_ax.legend(fontsize=7)
    profile_ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_sigma_plot(tables: Mapping[str, Sequence[SigmaRow]], path: str | Path) -> Path:
    """Boxes of each GMConv layer's learned sigma relative to its initial value (1 = unchanged; below 1 a more
    concentrated kernel), in network order, one colour per labelled model, as a PNG. Relative, because a 7x7
    and a 3x3 layer start at different sigmas; :meth:`SigmaRow.format` prints the absolute values. Models
    without GMConv layers are left out."""
    tables = {label: rows for label, rows in tables.items() if rows}
    if not tables:
        raise ValueError("no GMConv sigmas to plot (no model has a masked GMConv2d layer)")
    plt = _pyplot()
    layers = list(dict.fromkeys(row.layer for rows in tables.values() for row in rows))
    width = 0.8 / len(tables)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(layers)) + 2.5, 4), layout="constrained")  # + legend
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="initial sigma")
    for i, (label, rows) in enumerate(tables.items()):
        by_layer = {row.layer: row for row in rows}
        pos = [j + (i - (len(tables) - 1) / 2) * width for j, name in enumerate(layers) if name in by_layer]
        ratios = [(by_layer[name].values / max(by_layer[name].init)).numpy() for name in layers if name in by_layer]
        colour = colours[i % len(colours)]
        ax.boxplot(ratios, positions=pos, widths=width * 0.85, patch_artist=True, showfliers=False,
                   boxprops={"facecolor": colour, "alpha": 0.5}, medianprops={"color": colour})  # fmt: skip
        ax.plot([], [], color=colour, lw=6, alpha=0.5, label=label)
    all_ratios = torch.cat([row.values / max(row.init) for rows in tables.values() for row in rows])
    log_scale = float(all_ratios.max() / all_ratios.min()) > 10  # wide ranges: halving and doubling look alike
    if log_scale:
        ticker = plt.matplotlib.ticker
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=7)
    ax.set_ylabel("learned sigma / initial sigma" + (" (log scale)" if log_scale else ""))
    ax.set_title("GMConv sigma per layer (box: channels' quartiles, whiskers: 1.5 IQR)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@dataclass
class ERFReport:
    """What :func:`erf_report` measured and wrote."""

    layer: str
    inputs: str
    erfs: dict[str, torch.Tensor]
    sigmas: dict[str, list[SigmaRow]]
    figure: Path
    sigma_figure: Path | None

    def format(self) -> str:
        lines = [f"ERF of {self.layer}'s centre unit ({self.inputs} inputs); spread = RMS radius of the field"]
        lines += [f"  {label:<40} spread {erf_spread(erf):6.2f} px" for label, erf in self.erfs.items()]
        for label, rows in self.sigmas.items():
            lines += ["", f"GMConv sigma per layer (kernel-index units): {label}"]
            lines += [SIGMA_HEADER, *(row.format() for row in rows)] if rows else ["  (no GMConv layers)"]
        lines += ["", f"heatmaps         {self.figure}"]
        if self.sigma_figure is not None:
            lines.append(f"sigma plot       {self.sigma_figure}")
        return "\n".join(lines)


def _file_stem(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", layer)


def erf_report(
    probes: Mapping[str, tuple[nn.Module, torch.Tensor]],
    layer: str | None,
    out_dir: str | Path,
    *,
    inputs: str = "data",
) -> ERFReport:
    """Measure ``layer``'s ERF (default: the first model's last conv) for each ``label -> (model, inputs)``
    (the first is the one being studied, the others are compared with it) and write ``erf_<layer>.png`` and
    ``sigma.png`` (when any model has GMConv layers) into ``out_dir``; ``inputs`` names what the images are.
    """
    if not probes:
        raise ValueError("give at least one model to probe")
    first_label, (first, _) = next(iter(probes.items()))
    if layer is None:
        convs = _conv_names(first)
        if not convs:
            raise ValueError(f"{first_label!r} has no conv layer; pass --layer NAME")
        layer = convs[-1]
    erfs = {label: effective_receptive_field(model, images, layer) for label, (model, images) in probes.items()}
    sigmas = {label: sigma_table(model) for label, (model, _) in probes.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figure = save_erf_figure(erfs, out / f"erf_{_file_stem(layer)}.png", title=f"ERF at {layer} ({inputs} inputs)")
    sigma_figure = save_sigma_plot(sigmas, out / "sigma.png") if any(sigmas.values()) else None
    return ERFReport(layer, inputs, erfs, sigmas, figure, sigma_figure)
