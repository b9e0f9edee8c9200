"""Tiny model, data and config shared by the engine tests, plus the worker script of the DDP equality test.

As a script (under ``python -m torch.distributed.run --nproc_per_node N``) it trains :class:`TinyNet` with
:func:`swinlab.engine.fit` and rank 0 saves the final weights and metrics history to ``argv[2]``.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from swinlab.config import OptimConfig
from swinlab.recipe import TrainConfig
from swinlab.tasks import ClassificationConfig

IN_DIM, NUM_CLASSES = 8, 5


class TinyNet(nn.Module):
    """An MLP with every kind of parameter the weight-decay split must recognise."""

    def __init__(self, num_classes: int = NUM_CLASSES, hidden: int = 16, drop: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Linear(IN_DIM, hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden))  # 2-D but listed in no_weight_decay()
        self.logit_scale = nn.Parameter(torch.zeros(2, 1, 1))  # 3-D, caught by keyword only
        self.cpb_mlp = nn.Linear(2, 1)  # 2-D weight, caught by keyword only
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(drop)
        self.head = nn.Linear(hidden, num_classes)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def no_weight_decay_keywords(self) -> set[str]:
        return {"cpb_mlp", "logit_scale", "relative_position_bias_table"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.relu(self.fc1(x) + self.pos_embed))
        h = h * self.logit_scale.exp().mean() + self.cpb_mlp(
            x[:, :2]
        )  # after the norm, which would cancel them
        return self.head(self.drop(h))


def tiny_dataset(n: int, seed: int) -> TensorDataset:
    """Gaussian features labelled by a fixed random linear map (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=g)
    w = torch.randn(IN_DIM, NUM_CLASSES, generator=torch.Generator().manual_seed(1234))
    return TensorDataset(x, (x @ w).argmax(dim=1))


def tiny_loaders(
    batch_size: int = 8,
    *,
    n_train: int = 64,
    n_val: int = 20,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[DataLoader, DataLoader]:
    """Loaders shaped like swinlab.data's: DistributedSampler for training, unpadded val shards per rank."""
    train_set, val_set = tiny_dataset(n_train, seed=1), tiny_dataset(n_val, seed=2)
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    train = DataLoader(train_set, batch_size=batch_size, sampler=sampler)
    val = DataLoader(val_set, batch_size=batch_size, sampler=list(range(rank, n_val, world_size)))
    return train, val


def tiny_config(output_dir: str, **overrides) -> TrainConfig:
    base = {
        "epochs": 2,
        "output_dir": str(output_dir),
        "task": ClassificationConfig(label_smoothing=0.0),
        "clip_grad": 1.0,
        "log_every": 1,
        "optim": OptimConfig(lr=0.05, warmup_epochs=0.5, warmup_lr=1e-3, min_lr=1e-4, weight_decay=0.05),
    }
    return TrainConfig(**{**base, **overrides})


def run_tiny(cfg: TrainConfig, batch_size: int, *, env=None, drop: float = 0.0, model_seed: int = 0):
    """Train a fresh TinyNet with ``cfg``; returns (model, fit result)."""
    from swinlab.engine import build_optimizer, fit
    from swinlab.tasks import ClassificationTask

    env_rank, env_world = (env.rank, env.world_size) if env is not None else (0, 1)
    torch.manual_seed(model_seed)
    model = TinyNet(drop=drop)
    train, val = tiny_loaders(batch_size, seed=cfg.seed, rank=env_rank, world_size=env_world)
    optimizer = build_optimizer(model, cfg.optim)
    result = fit(
        model, ClassificationTask(label_smoothing=cfg.task.label_smoothing), optimizer, train, val, cfg, env=env
    )
    return model, result


def main(output_dir: str, result_path: str) -> None:
    from swinlab.engine.distributed import process_group

    torch.set_num_threads(1)
    with process_group("cpu") as env:
        save_run(output_dir, result_path, env)


def save_run(output_dir: str, result_path: str, env) -> None:
    model, result = run_tiny(tiny_config(output_dir), batch_size=4, env=env)
    if env.is_main:
        torch.save({"state_dict": model.state_dict(), "result": result}, result_path)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
