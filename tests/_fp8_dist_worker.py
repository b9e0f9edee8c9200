"""Worker of the multi-process FP8 tests (FP8 all-reduce, FP8 under the engine's DDP, O3), run under torchrun.

``python -m torch.distributed.run --standalone --nproc_per_node 2 _fp8_dist_worker.py MODE OUT [ARGS]``: every rank
runs MODE on gloo and rank 0 saves what the test asserts on to ``OUT`` (``torch.save``).
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from swinlab.metrics import relative_l2_error as rel_l2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
WORKER = Path(__file__)


def run_worker(mode: str, out: Path, *args: str, timeout: int = 300) -> dict:
    """Run this file's MODE on 2 gloo ranks under torchrun (from a test); returns what rank 0 saved."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), mode, str(out), *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def fp32_mean(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def comm_checks() -> dict:
    """The all-reduce evidence (the benchmark's own run) plus the edge cases of swinlab.fp8.comm."""
    import bench_fp8_allreduce
    from swinlab.fp8.comm import FP8CommState, data_parallel, fp8_all_reduce_, fp8_allreduce_hook
    from swinlab.fp8.linear import FP8Linear

    rank = dist.get_rank()
    out: dict = {"bench": bench_fp8_allreduce.run(repeats=1)}

    # Inf on one rank poisons that tensor on every rank, and only that one.
    g = torch.Generator().manual_seed(rank)
    bad, good = torch.randn(100, generator=g), torch.randn(50, generator=g)
    if rank == 1:
        bad[3] = float("inf")
    fp8_all_reduce_([bad, good], FP8CommState())
    out["poison"] = (bool(torch.isnan(bad).all()), bool(torch.isfinite(good).all()))

    # Sizes that do not split evenly over the ranks, through both exchanges.
    for exchange in ("reduce_scatter", "all_gather"):
        tensors = [torch.randn(n, generator=g) * 10.0**k for n, k in ((7, -6), (5, 0), (1, 3))]
        refs = [fp32_mean(t) for t in tensors]
        fp8_all_reduce_(tensors, FP8CommState(exchange=exchange))
        out[f"odd_{exchange}"] = [rel_l2(t, r) for t, r in zip(tensors, refs, strict=True)]

    # DDP hook with a parameter filter: the bias stays FP32 (exact), the weight goes through FP8.
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    ddp = nn.parallel.DistributedDataParallel(layer)
    ddp.register_comm_hook(FP8CommState(fp8_params=[layer.weight]), fp8_allreduce_hook)
    x = torch.randn(8, 64, generator=g)
    reference = nn.Linear(64, 32)
    reference.load_state_dict(layer.state_dict())
    reference(x).square().sum().backward()
    ddp(x).square().sum().backward()
    out["filter"] = {
        "bias_err": float((layer.bias.grad - fp32_mean(reference.bias.grad)).abs().max()),
        "weight_rel": rel_l2(layer.weight.grad, fp32_mean(reference.weight.grad)),
    }

    # FP8 gradients kept in weight.fp8_grad: hidden from DDP, averaged at the end of a synchronising backward only.
    torch.manual_seed(0)
    model = nn.Sequential(FP8Linear(64, 64, grad_mode="fp8"), nn.ReLU(), nn.Linear(64, 16))
    fp8_weight = model[0].weight
    ddp = data_parallel(model)
    with ddp.no_sync():
        ddp(torch.randn(8, 64, generator=g)).square().sum().backward()
    local = fp8_weight.fp8_grad.dequantize()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    out["no_sync_local"] = not torch.equal(gathered[0], gathered[1])
    model[0].zero_fp8_grad()
    model.zero_grad()
    alone = copy.deepcopy(model)  # same delayed-scaling histories as the DDP model
    ddp(x).square().sum().backward()
    alone(x).square().sum().backward()
    out["fp8_grad"] = {
        "is_fp8": fp8_weight.fp8_grad.data.dtype == torch.float8_e4m3fn,
        "grad_none": fp8_weight.grad is None,
        "weight_rel": rel_l2(fp8_weight.fp8_grad.dequantize(), fp32_mean(alone[0].weight.fp8_grad.dequantize())),
        "head_err": float((model[2].weight.grad - fp32_mean(alone[2].weight.grad)).abs().max()),
    }

    # FP8 weights whose gradient autograd holds ("dequantized"): they travel in FP8 inside DDP's buckets.
    torch.manual_seed(0)
    model = nn.Sequential(FP8Linear(64, 64, grad_mode="dequantized"), nn.ReLU(), nn.Linear(64, 16))
    alone = copy.deepcopy(model)
    ddp = data_parallel(model)
    ddp(x).square().sum().backward()
    alone(x).square().sum().backward()
    out["in_bucket"] = {
        "roles": sorted(ddp.fp8_comm.stats.by_role),
        "elements": ddp.fp8_comm.stats.elements,
        "weight_rel": rel_l2(model[0].weight.grad, fp32_mean(alone[0].weight.grad)),
        "head_err": float((model[2].weight.grad - fp32_mean(alone[2].weight.grad)).abs().max()),
    }
    return out


class FP8Net(nn.Module):
    """The engine tests' tiny classifier with one hidden linear big enough for FP8 (64x64, dims multiples of 16)."""

    def __init__(self, in_dim: int = 8, hidden: int = 64, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Linear(in_dim, hidden)  # 8 inputs: not FP8-able, stays FP32
        self.mlp = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mlp(torch.relu(self.stem(x)))))


def train_fp8_net(output_dir: str, precision: str, batch_size: int, env=None, model_seed: int = 0, **overrides):
    """Train FP8Net through the engine (precision.wrap + fit) on the DDP test's data; returns (model, result)."""
    from _ddp_worker import tiny_config, tiny_loaders
    from swinlab.engine import build_optimizer, fit
    from swinlab.engine import precision as precision_seam
    from swinlab.tasks import ClassificationTask

    cfg = tiny_config(output_dir, precision=precision, **overrides)
    rank, world = (env.rank, env.world_size) if env is not None else (0, 1)
    torch.manual_seed(model_seed)
    model = FP8Net()
    train, val = tiny_loaders(batch_size, seed=cfg.seed, rank=rank, world_size=world)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, autocast = precision_seam.wrap(model, optimizer, cfg.precision)
    result = fit(model, ClassificationTask(), optimizer, train, val, cfg, env=env, autocast=autocast)
    return model, result


def engine_run(output_dir: str, precision: str) -> dict:
    """FP8Net under torchrun with per-rank batch 4 (the test compares it with one process at batch 8)."""
    from swinlab.engine.distributed import init_distributed

    env = init_distributed("cpu")  # joins the group main() opened
    model, result = train_fp8_net(output_dir, precision, batch_size=4, env=env)
    spread = {}  # how far the ranks drifted apart: 0 when every gradient and every amax history was reduced
    for name, value in model.state_dict().items():
        gathered = [torch.empty_like(value) for _ in range(env.world_size)]
        dist.all_gather(gathered, value.contiguous())
        spread[name] = max(float((g.float() - value.float()).abs().max()) for g in gathered)
    return {"result": result, "state_dict": model.state_dict(), "model": repr(model), "rank_spread": spread}


class _Killed(Exception):
    pass


def engine_o3_resume(output_dir: str) -> dict:
    """fp8-o3 through the engine: 2 epochs straight, and a run killed after epoch 1 then resumed (same end?)."""
    from unittest import mock

    from swinlab.engine import loop
    from swinlab.engine.distributed import init_distributed

    env = init_distributed("cpu")
    straight, result = train_fp8_net(f"{output_dir}/straight", "fp8-o3", batch_size=4, env=env)

    def kill_after_epoch_1(row, epochs):  # runs after the epoch's checkpoint is written
        raise _Killed

    with mock.patch.object(loop, "_summary", kill_after_epoch_1), contextlib.suppress(_Killed):
        train_fp8_net(f"{output_dir}/resumed", "fp8-o3", batch_size=4, env=env)
    resumed, resumed_result = train_fp8_net(f"{output_dir}/resumed", "fp8-o3", batch_size=4, env=env, model_seed=7)
    return {"result": result, "resumed_result": resumed_result, "model": repr(straight),
            "state_dict": straight.state_dict(), "resumed_state_dict": resumed.state_dict()}  # fmt: skip


def o3_problem(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A stack of FP8-able linears (and an FP32 head), a torch AdamW, and 6 global batches of 16 samples."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 96),
                          nn.GELU(), nn.Linear(96, 10))  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    batches = [(torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(6)]
    return model, optimizer, batches


def o3_session(opt_level: str, rank: int = 0, world: int = 1) -> tuple[dict, nn.Module, torch.optim.Optimizer]:
    """Train :func:`o3_problem` at ``opt_level``; rank ``r`` of ``world`` takes its slice of each global batch."""
    from swinlab.fp8 import initialize, memory_report

    model, optimizer, batches = o3_problem()
    model, optimizer = initialize(model, optimizer, opt_level)
    losses = []
    for x, y in batches:
        per_rank = x.shape[0] // world
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = nn.functional.cross_entropy(model(x[part]), y[part])
        loss.backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        report = memory_report(model, optimizer)  # after the step, gradients still alive
        optimizer.zero_grad()
        losses.append(float(fp32_mean(loss) if world > 1 else loss.detach()))
    result = {"losses": losses, "state_dict": model.state_dict(), "memory": report, "model": repr(model)}
    return result, model, optimizer


def o3_train(opt_level: str) -> dict:
    return o3_session(opt_level)[0]


def o3_run() -> dict:
    """O3 on every rank; rank 0 also collects each rank's FP8-linear bytes/param. Then an Inf on rank 1 only."""
    rank, world = dist.get_rank(), dist.get_world_size()
    result, model, optimizer = o3_session("O3", rank, world)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, result["memory"]["fp8_linears"].per_param())

    before = model.state_dict()
    x = torch.randn(8, 64)
    if rank == 1:
        x[0, 0] = float("inf")
    nn.functional.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    norm = optimizer.clip_grad_norm_(1.0)
    optimizer.step()
    optimizer.zero_grad()
    after = model.state_dict()
    skipped = [None] * world
    dist.all_gather_object(skipped, (optimizer.skipped_steps, bool(torch.isfinite(norm))))
    unchanged = all(torch.equal(before[k], after[k]) for k in before if "_meta." not in k)
    return {**result, "per_rank_bytes": per_rank, "inf_step": {"skipped_norm_finite": skipped, "unchanged": unchanged}}


def main(mode: str, out_path: str, *args: str) -> None:
    from swinlab.engine.distributed import process_group

    torch.set_num_threads(1)
    with process_group("cpu"):
        run_mode(mode, out_path, *args)


def run_mode(mode: str, out_path: str, *args: str) -> None:
    result = {"comm": comm_checks, "engine": engine_run, "o3": o3_run, "engine_o3": engine_o3_resume}[mode](*args)
    if dist.get_rank() == 0:
        torch.save(result, out_path)

if __name__ == "__main__":
    main(*sys.argv[1:])
