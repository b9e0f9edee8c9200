"""DARTS through the one engine: the bilevel search (``task: darts_search``) and the evaluation of a found cell
(``task: darts_eval``), with the official quark0/darts settings as the defaults.

**Search.** The recipe names the super-net (``model.name: darts_search``, its size in ``model.kwargs``; classes and
channels from the data). Every step is the official ``train()`` iteration: one architecture step of α on a batch of
the ``heldout`` loader (``data.heldout_fraction: 0.5``, DARTS's train / valid split), first order or through one
unrolled weight step (``task.unrolled``), then one weight step on the training batch through the engine.

α's optimizer is the :class:`~swinlab.nas.architect.Architect`'s own ``Adam(β=(0.5, 0.999), weight_decay)``, held
as task state, not an engine optimizer: α lives in the super-net's buffers (out of ``parameters()``, as officially),
and the official update is Adam with an L2 decay, which the engine's AdamW (decoupled decay) is not. α itself is in
the model's state dict and the Adam state in the task's, so both are in every checkpoint and a killed run resumes
exactly. Under DDP the α gradient is averaged over the ranks before the step, so α stays equal everywhere.

The weight optimizer is the engine's, from the recipe's ``optim`` (official: SGD momentum 0.9, lr 0.025 cosine to
0.001, weight decay 3e-4, ``clip_grad: 5``). With ``task.official_sgd`` (default) the task makes it the official
one: plain (not Nesterov) momentum and the decay on every weight (the engine's SGD is Nesterov and exempts norms
and biases), which is also what the second-order step predicts the next update with.

Each epoch (main rank) writes ``genotype_epoch<N>.json`` and ``genotype.json`` (the latest), appends α's softmax
weights to ``alphas.json``, and draws both cells into ``cells_epoch<N>.png`` / ``cells.png`` (matplotlib only).
The step logs ``skip_share`` (mean softmax weight of ``skip_connect`` over the normal cell's edges) and
``skip_count`` (skip edges in the derived normal cell): the signs of DARTS's collapse.

**Variants.** PC-DARTS is the super-net's choice (``model.kwargs.variant: pc``, ``partial_channels: 4``): its β are
architecture parameters like α, so the same architect step, checkpoints and history carry them.
``task.arch_start_epoch`` holds α still for the first epochs (PC-DARTS's official search: 15).

**ACA** (``task.aca: true``, with the super-net's ``model.kwargs.primitives: aca``, the space without skip): at
every evaluation (each epoch with the default ``eval_every: 1``; always after the last) the task measures the channel
importance of every mixed edge on the ``heldout`` loader (the super-net in eval mode; under DDP over every rank's
shard, the sums all-reduced) and writes the ACA genotype beside the plain one, ``genotype_aca.json`` (+
``genotype_aca_epoch<N>.json``) and ``cells_aca.png``; strategies by name, ``aca_importance`` and
``aca_allocation`` (see :mod:`swinlab.nas.aca`, the toolkit's reading of ACA). ``darts_eval`` trains it from its
JSON file (``model.kwargs.genotype: <run>/genotype_aca.json``).

**Evaluation.** ``model.name: darts_cifar`` builds :class:`~swinlab.nas.model_eval.NetworkCIFAR` from a genotype
given by name (``DARTS_V2``), JSON file, or search run folder. The loss is ``CE(logits) + auxiliary_weight *
CE(logits_aux)``; drop path rises linearly, ``drop_path_prob * epoch / drop_path_epochs`` at each epoch's start (the
official rule with ``drop_path_epochs`` = the run's epochs); optional Cutout on the normalised batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from swinlab.config import Count, NonNegative, NonNegativeInt, Positive, Probability, TaskConfig
from swinlab.nas.aca import aca_genotype, allocation_strategy, importance_strategy
from swinlab.nas.architect import Architect
from swinlab.nas.genotypes import AcaGenotype, Genotype, genotype_to_dict, save_genotype
from swinlab.nas.model_eval import NetworkCIFAR
from swinlab.nas.model_search import SearchNetwork
from swinlab.tasks.base import Batch, Logs, OptimizerSpec, Step, Task, model_device, move_to

if TYPE_CHECKING:
    from swinlab.data.build import DataBundle


def _plain(model: nn.Module) -> nn.Module:
    """The model under a DDP or compile wrapper."""
    while hasattr(model, "module") and not isinstance(model, (SearchNetwork, NetworkCIFAR)):
        model = model.module
    return getattr(model, "_orig_mod", model)


def make_official_sgd(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """Turn the engine's SGD into the official DARTS one, in place: plain momentum (``nesterov=False``) and the
    decay on every weight (the largest decay of its groups; the engine exempts norms and biases). Returns
    ``(momentum, weight_decay)``. Idempotent; any other optimizer is left as it is."""
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"task.official_sgd needs optim.name: sgd (the official one), got {type(optimizer).__name__}")
    decay = max(group["weight_decay"] for group in optimizer.param_groups)
    for group in optimizer.param_groups:
        group["nesterov"] = False
        group["weight_decay"] = decay
    return optimizer.param_groups[0]["momentum"], decay


def _classification_sums(logits_of, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
    device = model_device(model)
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in ("loss", "correct", "count")}
    for batch in loader:
        images, labels = move_to(batch, device)
        if labels.numel() == 0:
            continue
        logits = logits_of(model(images)).float()
        sums["loss"] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums["correct"] += (logits.argmax(1) == labels).sum()
        sums["count"] += labels.numel()
    return sums


def _classification_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    if not sums["count"]:
        return {}
    return {"val_loss": sums["loss"] / sums["count"], "val_top1": 100.0 * sums["correct"] / sums["count"]}


# -- search ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DartsSearchConfig(TaskConfig):
    name: str = "darts_search"
    unrolled: bool = False
    """``true``: the second-order architecture step (through one unrolled weight step, official ``--unrolled``);
    ``false``: first order (α against the held-out loss at the current weights)."""
    arch_learning_rate: Positive = 3e-4
    """Adam learning rate of α (official 3e-4, constant)."""
    arch_weight_decay: NonNegative = 1e-3
    """Adam's L2 decay of α (official 1e-3); Adam's betas are the official (0.5, 0.999)."""
    official_sgd: bool = True
    """Make the weight optimizer the official SGD: plain momentum, decay on every weight (see the module notes)."""
    cell_diagrams: bool = True
    """Draw the derived cells into ``cells_epoch<N>.png`` and ``cells.png`` after every epoch."""
    arch_start_epoch: NonNegativeInt = 0
    """Epochs of weight training before α moves (official DARTS: 0; PC-DARTS: 15)."""
    aca: bool = False
    """Derive an ACA genotype after every epoch (needs a search space without skip: ``model.kwargs.primitives:
    aca``)."""
    aca_importance: str = "magnitude"
    """Channel importance of ACA: ``magnitude`` (mean |output|) or ``taylor`` (|output · gradient|)."""
    aca_allocation: str = "mass"
    """ACA's allocation rule: ``mass`` (importance share reaching the edge's non-``none`` weight) or ``alpha`` (the
    non-``none`` weight itself)."""
    aca_batches: Count | None = None
    """Held-out batches the importance is measured on; ``null``: the whole held-out loader."""


class DartsSearchTask(Task):
    """The DARTS search: α on the held-out split by the architect, the weights on the training split by the engine."""

    Config = DartsSearchConfig
    data_kinds = ("image",)
    metric_names = ("val_loss", "val_top1")
    best_metric = ("val_top1", "max")
    loaders = ("heldout",)

    def __init__(
        self, config: DartsSearchConfig | None = None, train_loader: Any = None, heldout_loader: Any = None
    ) -> None:
        self.config = config or DartsSearchConfig()
        importance_strategy(self.config.aca_importance)  # unknown names fail before the run starts
        allocation_strategy(self.config.aca_allocation)
        self.train_loader = train_loader
        self.heldout_loader = heldout_loader
        self.arch_updates = 0
        """Architecture steps taken (task state)."""
        self.arch_skipped = 0
        """Architecture steps skipped for a non-finite α gradient (task state)."""
        self._architect: Architect | None = None
        self._pending_optimizer: Mapping[str, Any] | None = None
        self._aca: AcaGenotype | None = None
        """The ACA genotype of the last evaluation, until ``on_epoch_end`` writes it."""

    @classmethod
    def from_config(cls, config: DartsSearchConfig, data: DataBundle) -> DartsSearchTask:
        return cls(config, data.train_loader, data.extra_loaders.get("heldout"))

    def prepare_model(self, model: nn.Module) -> SearchNetwork:
        if not isinstance(model, SearchNetwork):
            raise TypeError(
                "task darts_search searches with a DARTS super-net (model.name: darts_search), "
                f"got {type(model).__name__}"
            )
        if self.config.aca and "skip_connect" in model.primitives:
            raise ValueError("task.aca searches without skip_connect: set model.kwargs.primitives: aca")
        return model

    def optimizers(self, model: nn.Module) -> dict[str, OptimizerSpec]:
        # α is in buffers, not parameters: every parameter is a weight.
        return {"weights": OptimizerSpec()}

    def architect(self, module: SearchNetwork, weights: torch.optim.Optimizer) -> Architect:
        """The architect over ``module``'s α, built on first use (after the engine moved the model), with the Adam
        state a resumed run restored."""
        if self.config.official_sgd:
            momentum, decay = make_official_sgd(weights)
        else:
            group = weights.param_groups[0]
            momentum, decay = group.get("momentum", 0.0), group["weight_decay"]
        if self._architect is None or self._architect.model is not module:
            c = self.config
            self._architect = Architect(module, momentum, decay, c.arch_learning_rate, c.arch_weight_decay)
            if self._pending_optimizer is not None:
                self._architect.optimizer.load_state_dict(self._pending_optimizer)
                self._pending_optimizer = None
        self._architect.network_momentum, self._architect.network_weight_decay = momentum, decay
        return self._architect

    def train_step(self, step: Step, batch: Batch) -> Logs:
        module = step.module
        device = model_device(module)
        weights = step.optimizer("weights")
        if self.config.unrolled and not isinstance(weights, torch.optim.SGD):
            raise TypeError("task.unrolled predicts the next SGD step: it needs optim.name: sgd")
        architect = self.architect(module, weights)
        images, labels = move_to(batch, device)
        valid_images, valid_labels = move_to(step.batch("heldout"), device)
        if self.epoch() >= self.config.arch_start_epoch:
            grads = architect.alpha_grads(
                images, labels, valid_images, valid_labels, step.lr("weights"), weights, self.config.unrolled
            )
            self._arch_update(architect, grads)
        with step.update("weights"):
            logits = step.model(images)
            loss = F.cross_entropy(logits.float(), labels)
            step.backward(loss)
        for alpha in module.arch_parameters():  # the weight loss's backward reached α too: not α's gradient
            alpha.grad = None
        share, count = skip_statistics(module)
        return {"loss": loss.detach(), "skip_share": torch.tensor(share), "skip_count": torch.tensor(float(count))}

    def epoch(self) -> int:
        """The 0-based training epoch (the engine sets it on the training sampler at each epoch's start)."""
        return int(getattr(getattr(self.train_loader, "sampler", None), "epoch", 0))

    def _arch_update(self, architect: Architect, grads: Sequence[torch.Tensor]) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.arch_skipped += 1
            return
        alphas = architect.model.arch_parameters()
        for alpha, g in zip(alphas, grads, strict=True):
            alpha.grad = g
        architect.optimizer.step()
        for alpha in alphas:
            alpha.grad = None
        self.arch_updates += 1

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        """Classification sums on ``loader``; with ACA also the channel importance on the held-out split, here
        because evaluation runs on every rank (``on_epoch_end`` on the main one only)."""
        if self.config.aca:
            self._aca = self._aca_genotype(_plain(model))
        return _classification_sums(lambda out: out, model, loader)

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return _classification_metrics(sums)

    def state_dict(self) -> dict[str, Any]:
        optimizer = self._architect.optimizer.state_dict() if self._architect is not None else self._pending_optimizer
        return {"arch_updates": self.arch_updates, "arch_skipped": self.arch_skipped, "arch_optimizer": optimizer}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.arch_updates = int(state["arch_updates"])
        self.arch_skipped = int(state["arch_skipped"])
        self._pending_optimizer = state["arch_optimizer"]
        if self._architect is not None and self._pending_optimizer is not None:
            self._architect.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None

    def on_epoch_end(self, model: nn.Module, epoch: int, run_dir: Path, metrics: Mapping[str, float]) -> None:
        net = _plain(model)
        genotype = net.genotype()
        save_genotype(genotype, run_dir / f"genotype_epoch{epoch}.json")
        save_genotype(genotype, run_dir / "genotype.json")
        share, count = skip_statistics(net)
        record = {
            "epoch": epoch,
            "arch_updates": self.arch_updates,
            "primitives": list(net.primitives),
            "normal": torch.softmax(net.alphas_normal.detach(), -1).tolist(),
            "reduce": torch.softmax(net.alphas_reduce.detach(), -1).tolist(),
            "skip_share": share,
            "skip_count": count,
            "genotype": genotype_to_dict(genotype),
            **{k: metrics[k] for k in self.metric_names if k in metrics},
        }
        if net.edge_weights(False) is not None:  # PC-DARTS: the normalised β as well
            record["edges_normal"] = net.edge_weights(False).detach().tolist()
            record["edges_reduce"] = net.edge_weights(True).detach().tolist()
        aca, self._aca = self._aca, None
        if aca is not None:
            save_genotype(aca, run_dir / f"genotype_aca_epoch{epoch}.json")
            save_genotype(aca, run_dir / "genotype_aca.json")
            record["aca_genotype"] = genotype_to_dict(aca)
        history_path = run_dir / "alphas.json"
        history = json.loads(history_path.read_text()) if history_path.is_file() else []
        history = [r for r in history if r["epoch"] < epoch] + [record]  # a resumed run rewrites what it redoes
        _write_atomically(history_path, json.dumps(history, indent=1) + "\n")
        if self.config.cell_diagrams:
            draw_cells(genotype, run_dir / f"cells_epoch{epoch}.png", title=f"epoch {epoch}")
            draw_cells(genotype, run_dir / "cells.png", title=f"epoch {epoch}")
            if aca is not None:
                draw_cells(aca, run_dir / "cells_aca.png", title=f"ACA, epoch {epoch}: operation (kept channels)")

    def _aca_genotype(self, net: SearchNetwork) -> AcaGenotype:
        if self.heldout_loader is None:
            raise ValueError("task.aca measures channel importance on the held-out split: set data.heldout_fraction")
        c = self.config
        return aca_genotype(net, self.heldout_loader, c.aca_importance, c.aca_allocation, c.aca_batches)

    def summary(self, metrics: Mapping[str, float], best: float | None, epochs: int) -> list[str]:
        lines = super().summary(metrics, best, epochs)
        lines.append(f"{self.arch_updates} architecture steps; derived cells in genotype.json and cells.png")
        if self.config.aca:
            lines.append("ACA cells (kept channel fractions) in genotype_aca.json and cells_aca.png")
        return lines


def skip_statistics(net: SearchNetwork) -> tuple[float, int]:
    """``(share, count)``: the mean softmax weight of ``skip_connect`` over the normal cell's edges, and the number of
    ``skip_connect`` edges in the derived normal cell (0 when skip is not in the search space)."""
    if "skip_connect" not in net.primitives:
        return 0.0, 0
    k = net.primitives.index("skip_connect")
    share = torch.softmax(net.alphas_normal.detach(), -1)[:, k].mean().item()
    return share, sum(name == "skip_connect" for name, _ in net.genotype().normal)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def draw_cells(genotype: Genotype | AcaGenotype, path: Path, title: str | None = None) -> None:
    """The normal and the reduction cell of ``genotype`` side by side as one PNG (matplotlib, no graphviz): inputs
    ``c_{k-2}``, ``c_{k-1}``, the intermediate nodes, the output ``c_{k}``; edges labelled with their operation (and
    an ACA edge's kept channel fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax, (cell, pairs, concat) in zip(
        axes,
        (("normal", genotype.normal, genotype.normal_concat), ("reduce", genotype.reduce, genotype.reduce_concat)),
        strict=True,
    ):
        _draw_cell(ax, pairs, concat, cell)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _draw_cell(ax, pairs: Sequence[tuple], concat: Sequence[int], cell: str) -> None:
    steps = len(pairs) // 2
    pos = {0: (0.0, 1.4), 1: (0.0, -1.4)}
    for i in range(steps):
        pos[2 + i] = (1.6 + 1.5 * i, 0.9 if i % 2 == 0 else -0.9)
    out = (1.6 + 1.5 * steps + 0.6, 0.0)
    names = {0: "c_{k-2}", 1: "c_{k-1}", **{2 + i: str(i) for i in range(steps)}}
    boxes = {0: "#a6cee3", 1: "#a6cee3", **{2 + i: "#fdbf6f" for i in range(steps)}}
    arrow = {"arrowstyle": "-|>", "color": "0.3", "shrinkA": 14, "shrinkB": 14, "lw": 1.0}
    for e, (op, src, *keep) in enumerate(pairs):
        label = f"{op} ({keep[0]:.2f})" if keep else op
        dst = 2 + e // 2
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        rad = 0.25 if e % 2 else -0.25
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={**arrow, "connectionstyle": f"arc3,rad={rad}"})
        # the label at the arc's middle: the chord's midpoint pushed out along its normal by rad * length / 2
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        nx, ny = (y1 - y0), -(x1 - x0)
        mx, my = mx + rad / 2 * nx, my + rad / 2 * ny
        ax.text(mx, my, label, fontsize=7, ha="center", va="center", color="#b2182b",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})  # fmt: skip
    for s in concat:
        ax.annotate("", xy=out, xytext=pos[s], arrowprops={**arrow, "color": "0.6", "linestyle": "--"})
    for node, (x, y) in pos.items():
        ax.text(x, y, f"${names[node]}$" if node < 2 else names[node], ha="center", va="center", fontsize=10,
                bbox={"boxstyle": "round,pad=0.35", "fc": boxes[node], "ec": "0.3"})  # fmt: skip
    ax.text(*out, "$c_{k}$", ha="center", va="center", fontsize=10,
            bbox={"boxstyle": "round,pad=0.35", "fc": "#b2df8a", "ec": "0.3"})  # fmt: skip
    ax.set_xlim(-0.7, out[0] + 0.7)
    ax.set_ylim(-2.2, 2.2)
    ax.set_aspect("equal")  # arc3 bends in display space: equal scales put the labels on the arcs
    ax.set_title(f"{cell} cell")
    ax.axis("off")


# -- evaluation ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DartsEvalConfig(TaskConfig):
    name: str = "darts_eval"
    auxiliary_weight: NonNegative = 0.4
    """Weight of the auxiliary head's loss (official 0.4; needs ``model.kwargs.auxiliary: true``)."""
    drop_path_prob: Probability = 0.2
    """Drop-path probability at the end of the ramp (official 0.2)."""
    drop_path_epochs: Count | None = None
    """Epochs over which drop path rises linearly from 0, ``drop_path_prob * epoch / drop_path_epochs`` at the start
    of epoch ``epoch`` (0-based): set it to the run's ``epochs`` for the official rule (the task does not see them);
    ``null``: ``drop_path_prob`` from the first epoch."""
    cutout_length: NonNegativeInt = 0
    """Side of the Cutout square zeroed in each training image (official ``--cutout``: 16); 0: off."""
    official_sgd: bool = True
    """Make the weight optimizer the official SGD: plain momentum, decay on every weight."""


class DartsEvalTask(Task):
    """Train a DARTS evaluation network: cross-entropy plus the weighted auxiliary loss, drop path ramped."""

    Config = DartsEvalConfig
    data_kinds = ("image",)
    metric_names = ("val_loss", "val_top1")
    best_metric = ("val_top1", "max")

    def __init__(self, config: DartsEvalConfig | None = None, train_loader: Any = None) -> None:
        self.config = config or DartsEvalConfig()
        self.train_loader = train_loader

    @classmethod
    def from_config(cls, config: DartsEvalConfig, data: DataBundle) -> DartsEvalTask:
        return cls(config, data.train_loader)

    def prepare_model(self, model: nn.Module) -> NetworkCIFAR:
        if not isinstance(model, NetworkCIFAR):
            raise TypeError(
                "task darts_eval trains a DARTS evaluation network (model.name: darts_cifar), "
                f"got {type(model).__name__}"
            )
        if self.config.auxiliary_weight > 0 and not model._auxiliary:
            raise ValueError("task.auxiliary_weight > 0 needs the auxiliary head: set model.kwargs.auxiliary: true")
        return model

    def epoch(self) -> int:
        """The 0-based training epoch (the engine sets it on the training sampler at each epoch's start)."""
        return int(getattr(getattr(self.train_loader, "sampler", None), "epoch", 0))

    def drop_path_prob(self, epoch: int) -> float:
        c = self.config
        if c.drop_path_epochs is None:
            return c.drop_path_prob
        return c.drop_path_prob * min(epoch / c.drop_path_epochs, 1.0)

    def cutout(self, images: torch.Tensor) -> torch.Tensor:
        """The official Cutout on normalised images (zeros in a square of side ``cutout_length`` around a uniform
        centre, clipped at the borders), drawn from the global generator (re-seeded by the engine every epoch)."""
        length = self.config.cutout_length
        if not length:
            return images
        n, _, h, w = images.shape
        ys, xs = torch.randint(h, (n, 1, 1)), torch.randint(w, (n, 1, 1))
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        half = length // 2
        inside = (rows >= ys - half) & (rows < ys + half) & (cols >= xs - half) & (cols < xs + half)
        keep = (~inside).unsqueeze(1).to(device=images.device, dtype=images.dtype)
        return images * keep

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Logs]:
        images, labels = move_to(batch, model_device(model))
        logits, logits_aux = model(self.cutout(images))
        loss = F.cross_entropy(logits.float(), labels)
        logs = {"loss": loss.detach()}
        if logits_aux is not None and self.config.auxiliary_weight > 0:
            loss_aux = F.cross_entropy(logits_aux.float(), labels)
            logs = {"loss": loss.detach(), "loss_aux": loss_aux.detach()}
            loss = loss + self.config.auxiliary_weight * loss_aux
        return loss, logs

    def train_step(self, step: Step, batch: Batch) -> Logs:
        if self.config.official_sgd:
            make_official_sgd(step.optimizer())
        prob = self.drop_path_prob(self.epoch())
        _plain(step.module).drop_path_prob = prob
        logs = super().train_step(step, batch)
        return {**logs, "drop_path_prob": torch.tensor(prob)}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, torch.Tensor]:
        return _classification_sums(lambda out: out[0], model, loader)

    def finalize(self, sums: Mapping[str, float]) -> dict[str, float]:
        return _classification_metrics(sums)


__all__ = [
    "DartsEvalConfig",
    "DartsEvalTask",
    "DartsSearchConfig",
    "DartsSearchTask",
    "draw_cells",
    "make_official_sgd",
    "skip_statistics",
]
