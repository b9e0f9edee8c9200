"""Run under torchrun with 2 gloo ranks (from tests/test_ait_codebook_ddp.py): each rank trains an EMA codebook on
its own shard of a global batch; rank 0 saves every rank's codebook buffers to ``OUT`` (``torch.save``)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from swinlab.ait.codebook import EMACodebook


def shards(step: int) -> torch.Tensor:
    """The global batch of ``step``: 2 shards of (2, 4, 3, 3) encoder outputs."""
    return torch.randn(4, 4, 3, 3, generator=torch.Generator().manual_seed(100 + step)).view(2, 2, 4, 3, 3)


def train(init: str, dead_threshold: float, rank: int | None) -> dict[str, torch.Tensor]:
    """Three EMA steps on rank ``rank``'s shards (``None``: one process on the whole global batches)."""
    torch.manual_seed(0)
    codebook = EMACodebook(8, 4, init=init, dead_threshold=dead_threshold).train()
    torch.manual_seed(1 + (rank or 0))  # ranks draw different samples: only rank 0's may be used
    for step in range(3):
        batch = shards(step)
        codebook(batch.flatten(0, 1) if rank is None else batch[rank])
    return {k: v.clone() for k, v in codebook.state_dict().items()}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for init, threshold in (("official", 0.0), ("data", 0.5)):
        state = train(init, threshold, rank)
        gathered = [None, None]
        dist.all_gather_object(gathered, state)
        result[init] = gathered
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
