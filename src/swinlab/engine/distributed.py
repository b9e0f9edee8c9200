"""Process-group set-up from the variables ``torchrun`` exports, and the few collectives the engine needs.

There is no launcher here on purpose: ``torchrun --nproc_per_node N`` (or ``python -m torch.distributed.run``)
starts the processes and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; a plain ``python`` run is world size 1
and never touches ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's CUDA device when CUDA exists, else CPU; any other name is taken as given (and
    refused, by name, when this machine or torch build cannot run it)."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is no device name (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r}, but torch.cuda.is_available() is False (a CPU-only torch build, or no GPU/driver): "
                "use device=auto or cpu"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); world size 1 without it."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistEnv]:
    """:func:`init_distributed` for the ``with`` block, then leave the group in step with the other ranks.

    On the way out, garbage is collected first: a DDP reducer caught in a reference cycle still holds the group,
    and if it were only freed at interpreter exit, after the group is gone, a gloo rank can abort ("terminate
    called without an active exception"). After a clean block the ranks then meet at a barrier, so one that
    finished early does not close connections a peer is still using; after an error they do not (a failed peer
    would never arrive). Run the work in a function called inside the block, so its locals (the model) are
    freed before the group is left.
    """
    env = init_distributed(device)
    clean = False
    try:
        yield env
        clean = True
    finally:
        if env.distributed and dist.is_initialized():
            gc.collect()
            if clean:
                dist.barrier()
            dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, precision: str = "fp32") -> nn.Module:
    """DistributedDataParallel for world size > 1, the model itself otherwise.

    ``fp8-o1``/``fp8-o2``: FP8-LM's data parallelism (:func:`swinlab.fp8.comm.data_parallel`: FP8 weight gradients
    all-reduced in FP8 with shared per-tensor scales). ``fp8-o3``: the model is already sharded by
    ``swinlab.fp8.initialize`` and communicates by itself, so it is returned as it is.
    """
    if not env.distributed:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    key = precision.lower()
    if key == "fp8-o3":
        return model
    if key in ("fp8-o1", "fp8-o2"):
        from swinlab.fp8.comm import data_parallel

        return data_parallel(model, device_ids=device_ids)
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP and ``torch.compile`` wrappers (what checkpoints and evaluation use)."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def all_reduce_sums(sums: Mapping[str, torch.Tensor | float], env: DistEnv) -> dict[str, float]:
    """Sum each value over all ranks (one collective, keys in sorted order) and return Python floats."""
    keys = sorted(sums)
    packed = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=env.device)
    if env.distributed:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist(), strict=True))


def all_ranks_true(flag: bool, env: DistEnv) -> bool:
    """``flag`` and-ed over ranks, so every rank takes the same branch (e.g. skipping a non-finite step)."""
    if not env.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
