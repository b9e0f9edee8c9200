"""Run under torchrun with 2 gloo ranks (from tests/test_nas_aca_ddp.py): each rank measures ACA channel importance
on its own half of the held-out batches; rank 0 saves every rank's scores to ``OUT`` (``torch.save``)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from swinlab.nas.aca import TaylorImportance, measure_importance
from swinlab.nas.model_search import darts_search


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole held-out split: 4 batches of 2 images."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 16, 16, generator=gen), torch.randint(0, 5, (2,), generator=gen)) for _ in range(4)]


def scores(rank: int | None, world: int = 2) -> dict[str, list[list[torch.Tensor]]]:
    """Taylor importance of a seeded super-net on rank ``rank``'s batches (``None``: all of them)."""
    torch.manual_seed(0)
    net = darts_search(C=8, num_classes=5, layers=3, primitives="aca")
    shard = batches() if rank is None else batches()[rank::world]
    return measure_importance(net, shard, TaylorImportance())


def main(out: str) -> None:
    dist.init_process_group("gloo")
    gathered = [None, None]
    dist.all_gather_object(gathered, scores(dist.get_rank()))
    if dist.get_rank() == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
