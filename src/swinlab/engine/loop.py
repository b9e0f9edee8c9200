"""The one training loop: epochs of task steps, evaluation, logs, artefacts, checkpoints and exact resume.

:func:`fit` takes any model, :class:`~swinlab.tasks.Task`, optimizer(s) and loaders, so tests and every workload
share it; :func:`swinlab.engine.train` only builds those parts from a config. What a step does is the task's
(:meth:`~swinlab.tasks.Task.train_step`); how an update is applied is the :class:`~swinlab.engine.step.Stepper`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from swinlab.config import OptimConfig, to_dict
from swinlab.engine import checkpoint as ckpt_io
from swinlab.engine import precision
from swinlab.engine.distributed import DistEnv, all_ranks_true, all_reduce_sums, unwrap_model, wrap_model
from swinlab.engine.precision import AutocastFactory
from swinlab.engine.runfolder import (
    RunFolderError,
    lock_run_folder,
    recipe_differences,
    remove_stale_temp_files,
    require_folder,
)
from swinlab.engine.runlog import RunLog
from swinlab.engine.schedule import build_schedule, lr_factor
from swinlab.engine.step import CycledLoader, OptimizerSlot, Stepper
from swinlab.recipe import TrainConfig
from swinlab.tasks.base import Logs, Task, batch_len, model_device

Optimizers = torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer]


class TrainingError(RuntimeError):
    """A run that cannot learn anything: nothing readable to train on, or updates skipped as non-finite."""


@dataclass
class RunState:
    """Progress that survives a restart (stored in checkpoint.pt)."""

    epoch: int = 0
    """Completed epochs."""
    step: int = 0
    """Optimizer steps done (the schedules' position)."""
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _EpochStats:
    """Sample-weighted sums of every log entry (as tensors: no device sync per step), counts and rates."""

    log_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    log_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0
    steps: int = 0
    lrs: dict[str, float] = field(default_factory=dict)

    def add(self, logs: Logs, n: int) -> None:
        """Add one micro-batch's logs with weight ``n``; non-finite values are left out of the mean."""
        for key, value in logs.items():
            value = value.detach().double()
            finite = torch.isfinite(value)
            if key not in self.log_sums:
                self.log_sums[key] = torch.zeros((), dtype=torch.float64, device=value.device)
                self.log_counts[key] = torch.zeros((), dtype=torch.float64, device=value.device)
            self.log_sums[key] += torch.where(finite, value * n, 0.0)
            self.log_counts[key] += finite.double() * n


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


def _set_epoch(loader: Iterable[Any], epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class _Counting:
    """Iterates a loader and counts the samples it yields (evaluation shards may lose unreadable samples)."""

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader, self.seen = loader, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.seen += batch_len(batch)
            yield batch


def _named_optimizers(
    task: Task, model: nn.Module, optimizers: Optimizers, default: OptimConfig
) -> dict[str, tuple[torch.optim.Optimizer, OptimConfig]]:
    """Each optimizer with the recipe of its schedule, under the names the task declares (one optimizer: the
    task's first)."""
    specs = task.optimizers(model)
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = {next(iter(specs)): optimizers}
    if list(optimizers) != list(specs):
        raise ValueError(
            f"{type(task).__name__} trains with optimizers {list(specs)}, but fit() was given {list(optimizers)}"
        )
    return {name: (optimizers[name], specs[name].config or default) for name in specs}


class _Fit:
    """One call of :func:`fit`: the parts, the resumable :class:`RunState`, and the steps of an epoch."""

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizers: Optimizers,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None,
        cfg: TrainConfig,
        env: DistEnv,
        autocast: AutocastFactory,
        loaders: Mapping[str, Iterable[Any]],
    ) -> None:
        if cfg.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {cfg.accum_steps}")
        missing = [name for name in task.loaders if name not in loaders]
        if missing:
            raise ValueError(
                f"{type(task).__name__} draws from the loader(s) {missing}, which the data does not provide"
                + (" (set data.heldout_fraction, e.g. 0.5)" if "heldout" in missing else "")
            )
        self.cfg, self.env, self.task, self.autocast = cfg, env, task, autocast
        self.train_loader, self.val_loader = train_loader, val_loader
        self.extra_loaders = {name: loaders[name] for name in task.loaders}
        ddp = isinstance(model, DistributedDataParallel)
        self.model = wrap_model(model, env, cfg.precision) if env.distributed and not ddp else model
        # Evaluation bypasses DDP: ranks may hold different numbers of validation batches, and DDP's forward
        # may run collectives (buffer broadcast). Checkpoints store the module under every wrapper.
        self.eval_model = model.module if ddp else model
        self.plain = unwrap_model(self.model)
        device = model_device(self.plain)
        frozen_modules = task.frozen_modules()
        for frozen in frozen_modules.values():
            frozen.place(device)
        # Hashed once: a tokenizer file can be large, and every epoch's checkpoint records the same fingerprint.
        self.frozen_fingerprints = {name: frozen.fingerprint() for name, frozen in frozen_modules.items()}
        self.run_dir = Path(cfg.output_dir)
        require_folder(self.run_dir)
        self.log = RunLog(self.run_dir, task.metric_names, enabled=env.is_main, tensorboard=cfg.tensorboard)
        self.micro_batches = _loader_len(train_loader, "training")
        if cfg.max_steps_per_epoch is not None:
            self.micro_batches = min(self.micro_batches, cfg.max_steps_per_epoch * cfg.accum_steps)
        steps_per_epoch = math.ceil(self.micro_batches / cfg.accum_steps)
        named = _named_optimizers(task, self.plain, optimizers, cfg.optim)
        per_rank = getattr(train_loader, "batch_size", None) or cfg.data.batch_size
        global_batch = per_rank * env.world_size * cfg.accum_steps
        for name, (_, config) in named.items():
            if (factor := lr_factor(config, global_batch)) != 1.0:
                self._say(f"learning rates of {name!r} scaled linearly by global batch {global_batch} / "
                          f"{config.base_batch}: lr {config.lr:g} -> {config.lr * factor:g}")  # fmt: skip
        owners = {id(p): name for name, (opt, _) in named.items() for g in opt.param_groups for p in g["params"]}
        self.slots = {
            name: OptimizerSlot(
                name=name,
                optimizer=opt,
                schedule=build_schedule(
                    config, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, global_batch=global_batch
                ),
                others=[p for p in self.plain.parameters() if p.requires_grad and owners.get(id(p), name) != name],
                finite=torch.ones((), dtype=torch.bool, device=device),
            )
            for name, (opt, config) in named.items()
        }
        self.stepper = Stepper(self.model, self.plain, self.slots, clip_grad=cfg.clip_grad, env=env, autocast=autocast)
        self.state = RunState()

    # -- top level -------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        with contextlib.ExitStack() as stack:
            self._take_run_folder(stack)
            try:
                self._resume()
                if self.state.epoch >= self.cfg.epochs:
                    self._say(f"nothing to train: {self.run_dir} already holds {self.state.epoch} epochs "
                              f"(epochs={self.cfg.epochs}); raise epochs to train on")  # fmt: skip
                self.log.write_config(to_dict(self.cfg))
                self.log.write_metrics(self.state.history)
                for epoch in range(self.state.epoch, self.cfg.epochs):
                    row = self._epoch(epoch)
                    self._check_trained(row)
                    self.state.history.append(row)
                    self.state.epoch = epoch + 1
                    improved = self._update_best(row)
                    self.log.log_epoch(row, self.state.history)
                    self._save(improved)
                    self._say(_summary(row, self.cfg.epochs))
            finally:
                self.log.close()
        last = self.state.history[-1] if self.state.history else {}
        summary = self.task.summary(last, self.state.best, self.state.epoch)
        done = {"best": self.state.best, "epochs_completed": self.state.epoch, "run_dir": str(self.run_dir)}
        return {**last, **done, "summary": summary}

    def _take_run_folder(self, stack: contextlib.ExitStack) -> None:
        """The main rank locks the run folder and clears what a killed run's atomic writes left; every rank stops
        together when it cannot (the others would wait for it forever)."""
        error = None
        if self.env.is_main:
            try:
                stack.enter_context(lock_run_folder(self.run_dir))
            except RunFolderError as e:
                error = e
            else:
                for path in remove_stale_temp_files(self.run_dir):
                    self._say(f"removed {path}, left half-written by a run that was killed")
        if not all_ranks_true(error is None, self.env):
            raise error or RunFolderError(f"rank 0 could not take the run folder {self.run_dir} (see its message)")

    def _check_trained(self, row: Mapping[str, Any]) -> None:
        """Stop a run that learns nothing, rather than report metrics of weights that never moved."""
        epoch = row["epoch"]
        if row["samples_seen"] == 0:
            raise TrainingError(
                f"epoch {epoch}: not one readable training sample ({row['samples_expected']} expected): every sample "
                "failed to load (see the warnings above); check the data"
            )
        updates = row["step"] - (self.state.history[-1]["step"] if self.state.history else 0)
        updates *= len(self.slots)
        if updates and row["skipped_steps"] > self.cfg.max_skipped_fraction * updates:
            raise TrainingError(
                f"epoch {epoch}: {row['skipped_steps']} of {updates} updates were skipped because the loss or the "
                f"gradients were not finite (more than max_skipped_fraction={self.cfg.max_skipped_fraction:g}): the "
                "run diverged or its scales are off; lower optim.lr, check the data, or use another precision"
            )

    def _epoch(self, epoch: int) -> dict[str, Any]:
        seed_epoch(self.cfg.seed, epoch)
        _set_epoch(self.train_loader, epoch)
        for name, loader in self.extra_loaders.items():
            _set_epoch(loader, epoch)
            self.stepper.loaders[name] = CycledLoader(name, loader)
        start = time.perf_counter()
        stats = self._train_epoch(epoch)
        train_time = time.perf_counter() - start
        last_epoch = epoch + 1 == self.cfg.epochs
        due = (epoch + 1) % max(self.cfg.eval_every, 1) == 0 or last_epoch
        metrics = {}
        if due and self.val_loader is not None:
            metrics = run_evaluation(self.eval_model, self.task, self.val_loader, self.env, self.autocast)
        if self.env.is_main:
            self.task.on_epoch_end(self.eval_model, epoch + 1, self.run_dir, metrics)
        return self._row(epoch, stats, metrics, train_time, time.perf_counter() - start)

    # -- training --------------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> _EpochStats:
        self.model.train()
        stats = _EpochStats()
        accum, total = self.cfg.accum_steps, self.micro_batches
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
            self.stepper.begin(self.state.step, group, first=i == first, last=is_last)
            n = batch_len(batch)
            # Every sample of this batch was unreadable: nothing to learn from (under DDP the empty batch still
            # runs, its NaN loss makes every rank skip the update together).
            if n > 0 or self.env.distributed:
                logs = self.task.train_step(self.stepper, batch)
                stats.add(logs, n)
                stats.seen += n
            bar.update(1)
            if is_last:
                self.stepper.finish_group()
                stats.lrs = {name: slot.schedule.lr_at(self.state.step) for name, slot in self.slots.items()}
                self.state.step += 1
                stats.steps += 1
                if self.state.step % max(self.cfg.log_every, 1) == 0 and n > 0:
                    self._log_step(bar, logs, stats.lrs)
        bar.close()
        return stats

    def _log_step(self, bar: tqdm, logs: Logs, lrs: Mapping[str, float]) -> None:
        values = {key: float(value) for key, value in logs.items()}
        lr = next(iter(lrs.values()))
        if values:  # the first entry is the task's headline
            key, value = next(iter(values.items()))
            bar.set_postfix({key: f"{value:.4f}", "lr": f"{lr:.2e}"}, refresh=False)
        self.log.log_step(self.state.step, {**values, **_per_optimizer("lr", lrs)})

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _row(
        self, epoch: int, stats: _EpochStats, metrics: dict[str, float], train_time: float, epoch_time: float
    ) -> dict[str, Any]:
        expected = _expected_samples(self.train_loader, self.micro_batches)
        sums: dict[str, torch.Tensor | float] = {
            "__seen": stats.seen,
            "__expected": stats.seen if expected is None else expected,
        }
        for key in stats.log_sums:
            sums[f"sum/{key}"], sums[f"count/{key}"] = stats.log_sums[key], stats.log_counts[key]
        totals = all_reduce_sums(sums, self.env)
        seen, skipped = int(totals["__seen"]), int(totals["__expected"] - totals["__seen"])
        if skipped > 0 and self.env.is_main:
            warnings.warn(
                f"epoch {epoch + 1}: {skipped} unreadable training samples skipped",
                RuntimeWarning,
                stacklevel=2,
            )
        train_logs = {
            f"train_{key}": totals[f"sum/{key}"] / totals[f"count/{key}"] if totals[f"count/{key}"] else math.nan
            for key in stats.log_sums
        }
        norms = {name: float(np.mean(slot.norms)) if slot.norms else math.nan for name, slot in self.slots.items()}
        row = {
            "epoch": epoch + 1,
            "step": self.state.step,
            **_per_optimizer("lr", stats.lrs or {name: math.nan for name in self.slots}),
            **train_logs,
            **metrics,
            **_per_optimizer("grad_norm", norms),
            "epoch_time": epoch_time,
            "steps_per_s": stats.steps / train_time if train_time > 0 else math.nan,
            "samples_per_s": seen / train_time if train_time > 0 else math.nan,
            "samples_seen": seen,
            "samples_expected": int(totals["__expected"]),
            "skipped_samples": max(skipped, 0),
            "skipped_steps": sum(slot.skipped for slot in self.slots.values()),
        }
        for slot in self.slots.values():
            slot.norms.clear()
            slot.skipped = 0
        return row

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
        differences = recipe_differences(ckpt["config"], to_dict(self.cfg))
        if differences and self.cfg.resume != "force":
            shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
            raise RunFolderError(
                f"{path} was trained with another recipe ({shown}): continue it anyway with --set resume=force (the "
                "new values apply from here on), start over in it with --set resume=false, or write elsewhere with "
                "--set output_dir=..."
            )
        self._check_frozen(ckpt["frozen"], path)
        if sorted(ckpt["optimizers"]) != sorted(self.slots):
            raise ckpt_io.CheckpointError(
                f"{path} holds optimizers {sorted(ckpt['optimizers'])}, this run trains {sorted(self.slots)}"
            )
        try:
            self.plain.load_state_dict(ckpt["model"])
            for name, slot in self.slots.items():
                precision.load_optimizer_state_dict(slot.optimizer, ckpt["optimizers"][name])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0][:300]
            raise ckpt_io.CheckpointError(
                f"{path} does not fit this run's model or optimizers ({first}); start over with --set resume=false "
                "or write elsewhere with --set output_dir=..."
            ) from e
        self.task.load_state_dict(ckpt["task"])
        ckpt_io.set_rng_state(ckpt["rng"])
        self.state = RunState(epoch=ckpt["epoch"], step=ckpt["step"], best=ckpt["best"], history=list(ckpt["history"]))
        self._say(f"resumed from {path} after epoch {self.state.epoch} (step {self.state.step})")
        if differences:
            self._say(f"with the recipe's new values (resume=force): {'; '.join(differences)}")

    def _check_frozen(self, recorded: Mapping[str, Any], path: Path) -> None:
        """A frozen helper (e.g. a tokenizer) must be the one the checkpoint was trained with."""
        for name, now in self.frozen_fingerprints.items():
            before = recorded.get(name)
            if before is not None and before["sha256"] != now["sha256"]:
                raise ckpt_io.CheckpointError(
                    f"{path} was trained with frozen module {name!r} from {before['source']} (sha256 "
                    f"{before['sha256']}), but {now['source']} now has sha256 {now['sha256']}: resuming would mix two "
                    "different helpers; start a new run folder or restore the original file"
                )

    def _save(self, improved: bool) -> None:
        # Every rank builds the states: a sharded model and optimizer (FP8 O3) gather their shards collectively.
        model_state = self.plain.state_dict()
        optimizer_states = {name: precision.optimizer_state_dict(s.optimizer) for name, s in self.slots.items()}
        task_state = self.task.state_dict()
        if not self.env.is_main:
            return
        path = self.run_dir / "checkpoint.pt"
        ckpt_io.save_checkpoint(
            path,
            {
                "model": model_state,
                "optimizers": optimizer_states,
                "task": task_state,
                "frozen": self.frozen_fingerprints,
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


def _per_optimizer(column: str, values: Mapping[str, float]) -> dict[str, float]:
    """``{column: main value, column_<name>: value of each other optimizer}``: one-optimizer runs keep plain
    ``lr`` / ``grad_norm`` columns."""
    names = list(values)
    return {column if i == 0 else f"{column}_{name}": values[name] for i, name in enumerate(names)}


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


_UNSUMMARISED = ("epoch", "step", "lr", "epoch_time", "steps_per_s", "samples_per_s", "samples_seen",
                 "samples_expected")  # fmt: skip


def _summary(row: dict[str, Any], epochs: int) -> str:
    values = " ".join(
        f"{k} {v:.4g}"
        for k, v in row.items()
        if k not in _UNSUMMARISED and not k.startswith("lr_") and isinstance(v, float) and math.isfinite(v)
    )
    return (
        f"epoch {row['epoch']}/{epochs} step {row['step']} lr {row['lr']:.3g} {values} | "
        f"{row['epoch_time']:.1f}s {row['steps_per_s']:.2f} steps/s {row['samples_per_s']:.0f} samples/s"
    )


def fit(
    model: nn.Module,
    task: Task,
    optimizers: Optimizers,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    cfg: TrainConfig,
    *,
    env: DistEnv | None = None,
    autocast: AutocastFactory = contextlib.nullcontext,
    loaders: Mapping[str, Iterable[Any]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``task`` for ``cfg.epochs`` epochs, writing the run folder ``cfg.output_dir``.

    Uses from ``cfg``: epochs, accum_steps, clip_grad, seed, optim (schedule), output_dir, resume, eval_every,
    tensorboard, log_every, max_steps_per_epoch. ``model`` is the plain module on its device (wrapped in
    DistributedDataParallel here when ``env`` is distributed). ``optimizers`` is one optimizer over its parameters
    or, for a task that declares several (:meth:`~swinlab.tasks.Task.optimizers`), a mapping by those names
    (:func:`swinlab.engine.optim.build_optimizers` builds it). ``autocast`` is the factory from
    :func:`swinlab.engine.precision.wrap`; ``loaders`` holds the extra loaders the task draws from by name.

    Returns the last epoch's metrics plus ``best``, ``epochs_completed``, ``run_dir`` and ``summary`` (the task's
    closing lines).
    """
    env = env or DistEnv(device=model_device(model))
    return _Fit(model, task, optimizers, train_loader, val_loader, cfg, env, autocast, loaders or {}).run()
