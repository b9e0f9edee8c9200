"""What a run leaves in its folder: config.yaml, metrics.csv, curves.png and (optionally) TensorBoard events.

Only the main rank creates a :class:`RunLog` that writes; other ranks get a disabled one, so the loop never
branches on the rank. matplotlib and tensorboard are optional and imported only when used.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from swinlab.engine.checkpoint import atomic_write

THROUGHPUT_COLUMNS = (
    "grad_norm",
    "epoch_time",
    "steps_per_s",
    "samples_per_s",
    "samples_seen",
    "samples_expected",
    "skipped_samples",
    "skipped_steps",
    "val_skipped_samples",
)


def csv_columns(metric_names: Sequence[str], history: Sequence[Mapping[str, Any]]) -> list[str]:
    """metrics.csv's columns: epoch, step, learning rates, the task's ``train_*`` logs, its metrics, the rest.

    Taken from the rows themselves, because a task's logs are whatever its steps return (a column may first
    appear in a later epoch, e.g. metrics on ``eval_every`` epochs only).
    """
    seen = list(dict.fromkeys(key for row in history for key in row))
    head = ["epoch", "step", "lr", *(k for k in seen if k.startswith(("lr_", "train_")))]
    tail = ["grad_norm", *(k for k in seen if k.startswith("grad_norm_")), *THROUGHPUT_COLUMNS[1:]]
    middle = [k for k in dict.fromkeys([*metric_names, *seen]) if k not in head and k not in tail]
    return [*head, *middle, *tail]


def plot_curves(history: Sequence[Mapping[str, Any]], metric_names: Sequence[str], path: Path) -> None:
    """Losses, task metrics, other training logs and learning rates per epoch, as one PNG (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    columns = csv_columns(metric_names, history)
    losses = [k for k in columns if k.endswith("loss")]
    panels = [
        ("loss", losses),
        ("metric", [m for m in metric_names if m not in losses]),
        ("training logs", [k for k in columns if k.startswith("train_") and k not in losses]),
        ("learning rate", [k for k in columns if k == "lr" or k.startswith("lr_")]),
    ]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history if _is_number(row.get(key))]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


class RunLog:
    """Writer of the run folder's logs; every method is a no-op when ``enabled`` is False."""

    def __init__(
        self,
        run_dir: str | Path,
        metric_names: Sequence[str],
        *,
        enabled: bool = True,
        tensorboard: bool = False,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.metric_names = tuple(metric_names)
        self.enabled = enabled
        self._tb = None
        self._plot_warned = False
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                self._tb = _summary_writer(self.run_dir / "tb")

    @property
    def csv_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def write_config(self, config: Mapping[str, Any]) -> None:
        if self.enabled:
            text = yaml.safe_dump(dict(config), sort_keys=False)
            atomic_write(self.run_dir / "config.yaml", lambda f: f.write(text.encode()))

    def write_metrics(self, history: Sequence[Mapping[str, Any]]) -> None:
        """(Re)write metrics.csv from the run's rows, atomically: a resumed run drops the rows of epochs it did not
        checkpoint, and a column a task adds later gets its header."""
        if not self.enabled:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=csv_columns(self.metric_names, history), restval="", extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(history)
        atomic_write(self.csv_path, lambda f: f.write(buffer.getvalue().encode()))

    def log_step(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}", value, step)

    def log_epoch(self, row: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
        """Write ``history`` (ending with ``row``) to metrics.csv, ``row`` to TensorBoard; redraw curves.png."""
        if not self.enabled:
            return
        self.write_metrics(history)
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("epoch", "step") and _is_number(value):
                    self._tb.add_scalar(f"epoch/{key}", value, row["epoch"])
            self._tb.flush()
        self._plot(history)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def _plot(self, history: Sequence[Mapping[str, Any]]) -> None:
        try:
            plot_curves(history, self.metric_names, self.run_dir / "curves.png")
        except ImportError:
            if not self._plot_warned:
                warnings.warn(
                    "matplotlib is not installed: curves.png is skipped (pip install matplotlib)",
                    stacklevel=2,
                )
                self._plot_warned = True


def _summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError(
            "cfg.tensorboard=True needs the tensorboard package: pip install 'swinlab[tensorboard]' "
            "(or set tensorboard: false)"
        ) from None
    return SummaryWriter(log_dir=str(folder))
