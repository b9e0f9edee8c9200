"""FP8-LM O3: the FP8 weights, their gradients and the O2 optimizer states sharded across ranks (ZeRO-3 style).

Each FP8 weight matrix is flattened, zero-padded to a multiple of N and split into N equal chunks; rank ``r`` keeps
chunk ``r`` as the layer's ``weight`` parameter (a 1-D shard marked ``weight.fp8_shard``). The O2 optimizer
(:mod:`swinlab.fp8.optim`) sees only that shard, so everything it keeps is 1/N: the FP16 master with its scale,
the E4M3 first moment and the FP16 second moment. The remaining bytes of the issue's 6/N budget:

* forward: the shards are quantised to E4M3 with one scale shared by all ranks (MAX all-reduce of the shard
  amaxes) and all-gathered as bytes, so the full weight exists only as a transient FP8 copy made at all-gather
  time (kept for this layer's backward, as FP8Linear keeps its FP8 weight; one copy per layer while in ``eval()``);
* backward: the full FP32 weight gradient is reduce-scattered in FP8 (:func:`swinlab.fp8.comm.fp8_reduce_scatter`)
  and the reduced shard is re-stored as E4M3 + scale in ``weight.fp8_grad`` (1/N byte per parameter);
* everything else (biases, norms, embeddings, heads, non-FP8 linears) stays replicated; its gradients are averaged
  in their own precision at the end of each backward, in one collective.

Persistent per rank: (2 + 1 + 1 + 2) / N bytes per FP8-weight parameter, plus one fp32 scale per tensor. MS-AMP's
O3 (ZeRO-1/2 with FP8 weights kept whole on every rank) stays at 2 + 5/N or 1 + 6/N.

Why not FSDP2's ``fully_shard`` (which does run on gloo/CPU in torch 2.13: checked, DTensor dim-0 shards, AdamW
steps): it shards a parameter as a DTensor of
one dtype and reduces autograd gradients in ``reduce_dtype``; O3's master is an FP16 payload with a per-tensor
scale and its gradient leaves the FP8 GEMM as E4M3 outside autograd, so FSDP2 would need tensor-subclass
all-gather hooks plus a custom reduce-scatter and would still store the reduced gradient in ``reduce_dtype``.
A few collectives per layer say the same thing directly.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from swinlab.fp8.comm import (
    CommStats,
    FP8CommState,
    all_reduce_mean_,
    fp8_reduce_scatter,
    shared_amax,
    store_e4m3,
    sync_amax_histories_,
)
from swinlab.fp8.formats import E4M3, ScalingMeta, compute_scale, saturating_cast
from swinlab.fp8.linear import FP8Linear
from swinlab.fp8.tensor import ScaledFP8

META_NAMES = ("input_meta", "weight_meta", "grad_output_meta", "grad_weight_meta")


def require_process_group(group: dist.ProcessGroup | None = None) -> int:
    """World size of ``group``; a clear error when there is no process group to shard over."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "FP8 O3 shards weights and optimizer states across ranks, but torch.distributed is not initialised: "
            "run under torchrun (e.g. `torchrun --nproc_per_node 2 -m swinlab train ... --set precision=fp8-o3`); "
            "in a single process use O2"
        )
    return dist.get_world_size(group)


@dataclass(frozen=True)
class ShardSpec:
    """Where a 1-D shard parameter comes from: the full weight's shape, its process group, this rank's chunk."""

    shape: tuple[int, ...]
    group: dist.ProcessGroup | None
    rank: int
    world: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def chunk(self) -> int:
        return -(-self.numel // self.world)

    def shard_of(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of ``full`` (flattened, zero-padded): a fresh tensor, ``full`` can be freed."""
        flat = F.pad(full.detach().reshape(-1), (0, self.world * self.chunk - self.numel))
        return flat[self.rank * self.chunk:(self.rank + 1) * self.chunk].clone()

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        """The full tensor from every rank's shard (any dtype gloo/NCCL can move; FP8 goes as uint8)."""
        gathered = shard.new_empty(self.world * self.chunk)
        dist.all_gather_single(gathered, shard.contiguous(), group=self.group)
        return gathered[: self.numel].view(self.shape)


@dataclass
class O3State:
    """What a sharded model's layers share: the group, comm accounting, the replicated parameters (averaged at the
    end of each backward) and the FP8 scaling metas (amax histories MAX-reduced then, so all ranks cast alike)."""

    group: dist.ProcessGroup | None
    replicated: list[nn.Parameter]
    metas: list[ScalingMeta]
    comm: FP8CommState = field(init=False)
    _queued: bool = False

    def __post_init__(self) -> None:
        self.comm = FP8CommState(fmt=E4M3, process_group=self.group)

    @property
    def stats(self) -> CommStats:
        return self.comm.stats

    def reduce_replicated_after_backward(self) -> None:
        """Queue (once per backward) the average of the replicated gradients for the end of the pass."""
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._reduce_replicated)

    def _reduce_replicated(self) -> None:
        self._queued = False
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if grads:
            all_reduce_mean_(grads, self.comm)
        sync_amax_histories_(self.metas, self.group)


class ShardedFP8Linear(FP8Linear):
    """An :class:`FP8Linear` whose weight parameter is this rank's 1-D shard of the matrix (see module docstring).

    ``state_dict()`` holds the full weight (gathered: every rank must call it) and loads a full weight back into
    the shard, so checkpoints look like an FP8Linear's (or an ``nn.Linear``'s).
    """

    o3: O3State
    _eval_weight: tuple[ScaledFP8, torch.Tensor] | None = None

    @classmethod
    def from_fp8_linear(cls, layer: FP8Linear, o3: O3State) -> ShardedFP8Linear:
        """The sharded twin of ``layer``: same bias, scaling metas and settings; the full weight is left behind."""
        if layer.grad_mode != "fp8":
            raise ValueError("FP8 O3 keeps weight gradients as E4M3 shards: the layers need grad_mode='fp8'")
        history = layer.input_meta.amax_history.numel()
        sharded = cls.from_linear(layer, history_len=history, margin=layer.input_meta.margin,
                                  grad_format=layer.grad_output_meta.fmt,
                                  scaling=layer.input_meta.policy)  # fmt: skip
        for name in META_NAMES:
            setattr(sharded, name, getattr(layer, name))
        spec = ShardSpec(tuple(layer.weight.shape), o3.group, dist.get_rank(o3.group), dist.get_world_size(o3.group))
        shard = nn.Parameter(spec.shard_of(layer.weight), requires_grad=layer.weight.requires_grad)
        shard.fp8_weight, shard.fp8_shard = True, spec
        sharded.weight = shard
        sharded.o3 = o3
        return sharded

    @property
    def spec(self) -> ShardSpec:
        return self.weight.fp8_shard

    def _shard_values(self) -> torch.Tensor:
        """The shard's values in FP32 (the optimizer may hold it as a scaled FP16 master payload)."""
        scale = self.master_scale
        payload = self.weight.detach()
        return payload.float() if scale is None else payload.float() / scale

    @torch.no_grad()
    def _gather_fp8(self) -> tuple[ScaledFP8, torch.Tensor]:
        values = self._shard_values()
        global_amax = shared_amax([values], self.spec.group, self.o3.stats)[0]
        finite = torch.isfinite(global_amax)
        self.weight_meta.found_nonfinite |= ~finite
        scale = compute_scale(global_amax, E4M3, self.weight_meta.margin, torch.ones_like(global_amax))
        shard_bytes = saturating_cast(values * scale, E4M3).view(torch.uint8)
        full = self.spec.gather(shard_bytes)
        self.o3.stats.add("weight_all_gather", shard_bytes.nbytes * (self.spec.world - 1))
        return ScaledFP8(full.view(E4M3.dtype), scale, E4M3), finite

    def _quantize_weight(self, weight: torch.Tensor) -> tuple[ScaledFP8, torch.Tensor]:
        if not self.training and self._eval_weight is not None:
            return self._eval_weight
        return self._gather_fp8()

    def train(self, mode: bool = True) -> ShardedFP8Linear:
        """``eval()`` gathers the FP8 weight once (every rank calls it together), so evaluation forwards need no
        collectives and ranks may run different numbers of batches; ``train()`` drops that copy."""
        super().train(mode)
        self._eval_weight = None
        if not mode and hasattr(self.weight, "fp8_shard"):
            self._eval_weight = self._gather_fp8()
        return self

    def _store_weight_grad(self, grad_w: torch.Tensor, dtype: torch.dtype) -> None:
        """Reduce-scatter the full gradient in FP8 and keep this rank's averaged shard as E4M3 (accumulating)."""
        shard = fp8_reduce_scatter([grad_w], self.o3.comm)
        previous = getattr(self.weight, "fp8_grad", None)
        if previous is not None:
            shard = shard + previous.dequantize()
        self.weight.fp8_grad = store_e4m3(shard)
        self.o3.reduce_replicated_after_backward()
        return None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_scale", None)  # the shard's own master scale; the full values are saved
        destination[prefix + "weight"] = self.spec.gather(self._shard_values())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A full weight (this layer's own checkpoint, an FP8Linear's or an ``nn.Linear``'s) loads into the shard."""
        key = prefix + "weight"
        if key in state_dict and tuple(state_dict[key].shape) == self.spec.shape:
            state_dict[key] = self.spec.shard_of(state_dict[key].float())
            state_dict.pop(prefix + "weight_scale", None)  # the full weight's scale; the shard gets its own
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shard {self.spec.chunk} of {self.spec.numel} (rank {self.spec.rank})"


@torch.no_grad()
def shard_fp8_linears(
    model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], group: dist.ProcessGroup | None = None
) -> None:
    """Replace every FP8Linear of ``model`` by its :class:`ShardedFP8Linear` and point ``optimizers`` at the shards.

    Parameters are first broadcast from rank 0 (as DDP does), so every rank starts from the same model.
    The optimizers must not have stepped yet; in their groups each full FP8 weight is replaced by its shard
    (convert them to FP8 optimizers afterwards). Raises if there is no process group.
    """
    require_process_group(group)
    root = dist.get_global_rank(group, 0) if group is not None else 0
    for param in model.parameters():
        dist.broadcast(param.data, src=root, group=group)
    layers = [(name, m) for name, m in model.named_modules() if type(m) is FP8Linear]
    if not layers:
        raise ValueError("FP8 O3 found no FP8Linear to shard (module_filter kept every linear in high precision)")
    if any(optimizer.state for optimizer in optimizers):
        raise ValueError("shard the model before the optimizer's first step (it already holds state)")
    fp8_ids = {id(layer.weight) for _, layer in layers}
    replicated = [p for p in model.parameters() if id(p) not in fp8_ids and p.requires_grad]
    o3 = O3State(group, replicated, [meta for _, layer in layers for meta in layer.metas()])
    replaced: dict[int, nn.Parameter] = {}
    for name, layer in layers:
        sharded = ShardedFP8Linear.from_fp8_linear(layer, o3)
        replaced[id(layer.weight)] = sharded.weight
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, sharded)
    for param_group in (g for optimizer in optimizers for g in optimizer.param_groups):
        param_group["params"] = [replaced.get(id(p), p) for p in param_group["params"]]


def sharded_layers(model: nn.Module) -> list[ShardedFP8Linear]:
    return [m for m in model.modules() if isinstance(m, ShardedFP8Linear)]


def holds_shards(optimizer: torch.optim.Optimizer) -> bool:
    return any(hasattr(p, "fp8_shard") for group in optimizer.param_groups for p in group["params"])


def optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()``, or, over O3 shards, every rank's state (a collective: all ranks must call it).

    The gathered form ``{"fp8_o3_ranks": [state of rank 0, ...]}`` is what a rank-0 checkpoint needs to resume
    every rank; :func:`load_optimizer_state_dict` gives each rank its own entry back.
    """
    if not holds_shards(optimizer):
        return optimizer.state_dict()
    shard = next(p for g in optimizer.param_groups for p in g["params"] if hasattr(p, "fp8_shard"))
    group, world = shard.fp8_shard.group, shard.fp8_shard.world
    # Serialised with torch.save and moved as bytes: all_gather_object's pickler cannot carry FP8 storages.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8).to(shard.device)
    sizes = [torch.zeros((), dtype=torch.int64, device=shard.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(payload.numel(), device=shard.device), group=group)
    longest = int(max(sizes))
    gathered = payload.new_empty(world * longest)
    dist.all_gather_single(gathered, F.pad(payload, (0, longest - payload.numel())), group=group)
    parts = gathered.view(world, longest).cpu()
    states = [torch.load(io.BytesIO(parts[r, : int(sizes[r])].numpy().tobytes()), weights_only=True)
              for r in range(world)]  # fmt: skip
    return {"fp8_o3_ranks": states}


def load_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Inverse of :func:`optimizer_state_dict`; an O3 state must be resumed on as many ranks as it was saved on."""
    if not holds_shards(optimizer):
        if "fp8_o3_ranks" in state:
            raise ValueError("this optimizer state holds FP8 O3 shards; resume it with precision fp8-o3")
        optimizer.load_state_dict(state)
        return
    if "fp8_o3_ranks" not in state:
        raise ValueError("an FP8 O3 optimizer can only resume an FP8 O3 state (this one holds no rank shards)")
    ranks = state["fp8_o3_ranks"]
    spec = next(p.fp8_shard for g in optimizer.param_groups for p in g["params"] if hasattr(p, "fp8_shard"))
    if len(ranks) != spec.world:
        raise ValueError(f"the FP8 O3 state was saved on {len(ranks)} ranks: resume on as many (not {spec.world})")
    optimizer.load_state_dict(ranks[spec.rank])
