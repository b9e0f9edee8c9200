"""The one training loop: accumulated, clipped, finite-checked updates; evaluation; logs; checkpoints.

:func:`fit` takes any model, :class:`~swinlab.engine.tasks.Task`, optimizer and loaders, so tests and every
workload share it; :func:`swinlab.engine.train` only builds those parts from a config.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from swinlab.config import TrainConfig, to_dict
from swinlab.engine import checkpoint as ckpt_io
from swinlab.engine import precision
from swinlab.engine.distributed import DistEnv, all_ranks_true, all_reduce_sums, unwrap_model, wrap_model
from swinlab.engine.precision import AutocastFactory
from swinlab.engine.runlog import RunLog
from swinlab.engine.schedule import build_schedule
from swinlab.engine.tasks import Task, batch_len, model_device


@dataclass
class RunState:
    """Progress that survives a restart (stored in checkpoint.pt)."""

    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Optimizer updates done (the schedule's position)."""
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _EpochStats:
    loss_sum: torch.Tensor
    loss_count: torch.Tensor
    seen: int = 0
    steps: int = 0
    skipped_steps: int = 0
    grad_norms: list[float] = field(default_factory=list)
    lr: float = math.nan


def seed_epoch(seed: int, epoch: int) -> None:
    """Re-seed every global RNG at an epoch start, so epoch ``k`` is the same in a fresh and a resumed run."""
    value = seed + epoch
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def _loader_len(loader: Iterable[Any], what: str) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"the {what} loader must have a length (got {type(loader).__name__})") from None


def _expected_samples(loader: Iterable[Any], batches: int) -> int | None:
    """Samples the loader should deliver in ``batches`` batches, or None when it cannot tell."""
    sampler = getattr(loader, "sampler", None)
    if sampler is None or not hasattr(sampler, "__len__"):
        return None
    expected = len(sampler)
    batch_size = getattr(loader, "batch_size", None)
    return expected if batch_size is None else min(expected, batches * batch_size)


class _Counting:
    """Iterates a loader and counts the samples it yields (evaluation shards may lose unreadable samples)."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader, self.seen = loader, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.seen += batch_len(batch)
            yield batch


class _Fit:
    """One call of :func:`fit`: the parts, the resumable :class:`RunState`, and the steps of an epoch."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None,
        cfg: TrainConfig,
        env: DistEnv,
        autocast: AutocastFactory,
    ) -> None:
        if cfg.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
        self.cfg, self.env, self.task, self.optimizer, self.autocast = cfg, env, task, optimizer, autocast
        self.train_loader, self.val_loader = train_loader, val_loader
        ddp = isinstance(model, DistributedDataParallel)
        self.model = wrap_model(model, env, cfg.precision) if env.distributed and not ddp else model
        # Evaluation bypasses DDP: ranks may hold different numbers of validation batches, and DDP's forward
        # may run collectives (buffer broadcast). Checkpoints store the module under every wrapper.
        self.eval_model = model.module if ddp else model
        self.plain = unwrap_model(self.model)
        self.run_dir = Path(cfg.output_dir)
        self.log = RunLog(self.run_dir, task.metric_names, enabled=env.is_main, tensorboard=cfg.tensorboard)
        self.micro_batches = _loader_len(train_loader, "training")
        if cfg.max_steps_per_epoch is not None:
            self.micro_batches = min(self.micro_batches, cfg.max_steps_per_epoch * cfg.accum_steps)
        steps_per_epoch = math.ceil(self.micro_batches / cfg.accum_steps)
        self.schedule = build_schedule(cfg.optim, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)
        self.state = RunState()

    # -- top level -------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self._resume()
            self.log.write_config(to_dict(self.cfg))
            self.log.restart_csv(self.state.history)
            for epoch in range(self.state.epoch, self.cfg.epochs):
                row = self._epoch(epoch)
                self.state.history.append(row)
                self.state.epoch = epoch + 1
                improved = self._update_best(row)
                self.log.log_epoch(row, self.state.history)
                self._save(improved)
                self._say(_summary(row, self.cfg.epochs))
        finally:
            self.log.close()
        last = self.state.history[-1] if self.state.history else {}
        done = {"best": self.state.best, "epochs_completed": self.state.epoch, "run_dir": str(self.run_dir)}
        return {**last, **done}

    def _epoch(self, epoch: int) -> dict[str, Any]:
        seed_epoch(self.cfg.seed, epoch)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        start = time.perf_counter()
        stats = self._train_epoch(epoch)
        train_time = time.perf_counter() - start
        last_epoch = epoch + 1 == self.cfg.epochs
        due = (epoch + 1) % max(self.cfg.eval_every, 1) == 0 or last_epoch
        metrics = {}
        if due and self.val_loader is not None:
            metrics = run_evaluation(self.eval_model, self.task, self.val_loader, self.env, self.autocast)
        return self._row(epoch, stats, metrics, train_time, time.perf_counter() - start)

    # -- training --------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> _EpochStats:
        self.model.train()
        device = model_device(self.plain)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        stats = _EpochStats(loss_sum=zero.clone(), loss_count=zero.clone())
        accum, total = self.cfg.accum_steps, self.micro_batches
        group_finite = torch.ones((), dtype=torch.bool, device=device)
        bar = tqdm(
            total=total,
            desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
            file=sys.stderr,
            leave=False,
            disable=None if self.env.is_main else True,
            dynamic_ncols=True,
        )
        for i, batch in enumerate(itertools.islice(self.train_loader, total)):
            first = i - i % accum
            group = min(accum, total - first)
            is_last = i - first == group - 1
            if i == first:
                stats.lr = self._set_lr(self.schedule.lr_at(self.state.step))
            n = batch_len(batch)
            if n == 0 and not self.env.distributed:
                # Every sample of this batch was unreadable: nothing to learn from (under DDP the empty batch
                # still runs, its NaN loss makes every rank skip the update together).
                bar.update(1)
                if is_last:
                    self._optimizer_step(group_finite, stats)
                continue
            loss = self._micro_step(batch, group, sync=is_last)
            finite = torch.isfinite(loss)
            group_finite &= finite
            stats.seen += n
            stats.loss_sum += torch.where(finite, loss.double() * n, zero)
            stats.loss_count += finite.double() * n
            bar.update(1)
            if is_last:
                self._optimizer_step(group_finite, stats)
                group_finite.fill_(True)
                if stats.steps % max(self.cfg.log_every, 1) == 0:
                    self._log_step(bar, loss, stats.lr)
        bar.close()
        return stats

    def _micro_step(self, batch: Any, group: int, *, sync: bool) -> torch.Tensor:
        """Forward + backward of one micro-batch; DDP syncs gradients only on a group's last micro-batch."""
        no_sync = isinstance(self.model, DistributedDataParallel) and not sync
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self.autocast():
                loss, _ = self.task.loss(self.model, batch)
            (loss / group).backward()
        return loss.detach().float()

    def _set_lr(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _optimizer_step(self, loss_finite: torch.Tensor, stats: _EpochStats) -> None:
        """Clip and step, unless the loss or gradient is non-finite anywhere: then drop the gradients."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad else math.inf
        if not params:  # e.g. every parameter frozen for this step
            params = [torch.zeros((), device=loss_finite.device, requires_grad=True)]
        fp8_clip = getattr(self.optimizer, "clip_grad_norm_", None)
        # An FP8 optimizer's own clip also covers the E4M3 weight gradients, which live outside `.grad`.
        norm = fp8_clip(max_norm) if fp8_clip else torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = all_ranks_true(bool(loss_finite & torch.isfinite(norm)), self.env)
        if finite:
            self.optimizer.step()
            stats.grad_norms.append(float(norm))
        else:
            stats.skipped_steps += 1
            if self.env.is_main:
                warnings.warn(
                    f"non-finite loss or gradient at step {self.state.step}: update skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        stats.steps += 1

    def _log_step(self, bar: tqdm, loss: torch.Tensor, lr: float) -> None:
        value = float(loss)
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.log.log_step(self.state.step, {"loss": value, "lr": lr})

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _row(
        self, epoch: int, stats: _EpochStats, metrics: dict[str, float], train_time: float, epoch_time: float
    ) -> dict[str, Any]:
        expected = _expected_samples(self.train_loader, self.micro_batches)
        totals = all_reduce_sums(
            {
                "loss_sum": stats.loss_sum,
                "loss_count": stats.loss_count,
                "seen": stats.seen,
                "expected": stats.seen if expected is None else expected,
            },
            self.env,
        )
        skipped = int(totals["expected"] - totals["seen"])
        if skipped > 0 and self.env.is_main:
            warnings.warn(
                f"epoch {epoch + 1}: {skipped} unreadable training samples skipped",
                RuntimeWarning,
                stacklevel=2,
            )
        return {
            "epoch": epoch + 1,
            "step": self.state.step,
            "lr": stats.lr,
            "train_loss": totals["loss_sum"] / totals["loss_count"] if totals["loss_count"] else math.nan,
            **metrics,
            "grad_norm": float(np.mean(stats.grad_norms)) if stats.grad_norms else math.nan,
            "epoch_time": epoch_time,
            "steps_per_s": stats.steps / train_time if train_time > 0 else math.nan,
            "samples_per_s": totals["seen"] / train_time if train_time > 0 else math.nan,
            "samples_seen": int(totals["seen"]),
            "samples_expected": int(totals["expected"]),
            "skipped_samples": max(skipped, 0),
            "skipped_steps": stats.skipped_steps,
        }

    def _update_best(self, row: dict[str, Any]) -> bool:
        key, mode = self.task.best_metric
        value = row.get(key)
        if value is None or not math.isfinite(value):
            return False
        best = self.state.best
        if best is None or (value > best if mode == "max" else value < best):
            self.state.best = value
            return True
        return False

    def _resume(self) -> None:
        path = self.run_dir / "checkpoint.pt"
        if not (self.cfg.resume and path.is_file()):
            return
        ckpt = ckpt_io.load_checkpoint(path)
        self.plain.load_state_dict(ckpt["model"])
        precision.load_optimizer_state_dict(self.optimizer, ckpt["optimizer"])
        ckpt_io.set_rng_state(ckpt["rng"])
        self.state = RunState(
            epoch=ckpt["epoch"], step=ckpt["step"], best=ckpt["best"], history=list(ckpt["history"])
        )
        self._say(f"resumed from {path} after epoch {self.state.epoch} (step {self.state.step})")

    def _save(self, improved: bool) -> None:
        # Every rank builds the states: a sharded model and optimizer (FP8 O3) gather their shards collectively.
        model_state = self.plain.state_dict()
        optimizer_state = precision.optimizer_state_dict(self.optimizer)
        if not self.env.is_main:
            return
        path = self.run_dir / "checkpoint.pt"
        ckpt_io.save_checkpoint(
            path,
            {
                "model": model_state,
                "optimizer": optimizer_state,
                "epoch": self.state.epoch,
                "step": self.state.step,
                "config": to_dict(self.cfg),
                "history": self.state.history,
                "rng": ckpt_io.rng_state(),
                "best": self.state.best,
            },
        )
        if improved:
            ckpt_io.copy_checkpoint(path, self.run_dir / "best.pt")

    def _say(self, text: str) -> None:
        if self.env.is_main:
            print(text, flush=True)


def run_evaluation(
    model: nn.Module,
    task: Task,
    loader: Iterable[Any],
    env: DistEnv | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> dict[str, float]:
    """Task metrics over a (possibly rank-sharded) evaluation loader, summed over all ranks.

    ``model`` must not be wrapped in DistributedDataParallel (shards may differ in batch count). Also reports
    ``val_skipped_samples``: samples the loader's sampler promised but the loader did not deliver.
    """
    env = env or DistEnv(device=model_device(model))
    model.eval()
    counting = _Counting(loader)
    with autocast():
        sums = dict(task.evaluate(model, counting))
    expected = _expected_samples(loader, _loader_len(loader, "validation"))
    sums["__seen"] = counting.seen
    sums["__expected"] = counting.seen if expected is None else expected
    totals = all_reduce_sums(sums, env)
    missing = int(totals.pop("__expected") - totals.pop("__seen"))
    if missing > 0 and env.is_main:
        warnings.warn(f"evaluation skipped {missing} unreadable samples", RuntimeWarning, stacklevel=2)
    return {**task.finalize(totals), "val_skipped_samples": max(missing, 0)}


_COUNT_COLUMNS = ("samples_seen", "samples_expected")


def _summary(row: dict[str, Any], epochs: int) -> str:
    skip = {"epoch", "step", "lr", "epoch_time", "steps_per_s", "samples_per_s", *_COUNT_COLUMNS}
    values = " ".join(
        f"{k} {v:.4g}" for k, v in row.items() if k not in skip and isinstance(v, float) and math.isfinite(v)
    )
    return (
        f"epoch {row['epoch']}/{epochs} step {row['step']} lr {row['lr']:.3g} {values} | "
        f"{row['epoch_time']:.1f}s {row['steps_per_s']:.2f} steps/s {row['samples_per_s']:.0f} samples/s"
    )


def fit(
    model: nn.Module,
    task: Task,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    cfg: TrainConfig,
    *,
    env: DistEnv | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` for ``cfg.epochs`` epochs, writing the run folder ``cfg.output_dir``.

    Uses from ``cfg``: epochs, accum_steps, clip_grad, seed, optim (schedule), output_dir, resume, eval_every,
    tensorboard, log_every, max_steps_per_epoch. ``model`` is the plain module on its device (wrapped in
    DistributedDataParallel here when ``env`` is distributed) and ``optimizer`` is built over its parameters.
    ``autocast`` is the factory from :func:`swinlab.engine.precision.wrap`.

    Returns the last epoch's metrics plus ``best``, ``epochs_completed`` and ``run_dir``.
    """
    env = env or DistEnv(device=model_device(model))
    return _Fit(model, task, optimizer, train_loader, val_loader, cfg, env, autocast).run()
