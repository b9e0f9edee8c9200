"""FP8 gradient all-reduce (FP8-LM's "automatic scaling"), as a DDP communication hook; gloo and NCCL alike.

Neither gloo nor stock NCCL can *reduce* FP8: gloo rejects float8 dtypes and a uint8 SUM wraps modulo 256. So the
reduction is made of byte exchanges (uint8 views) and an FP32 sum:

1. the amax of every gradient tensor is MAX all-reduced (one fp32 value per tensor; NaN becomes Inf first because
   NCCL's MAX ignores NaN), giving one power-of-two scale per tensor *shared by all ranks*;
2. each rank quantises every tensor with its shared scale into one flat FP8 buffer;
3. ``"reduce_scatter"`` exchange: ``all_to_all`` of the bytes, so rank ``r`` receives chunk ``r`` of every rank,
   dequantises and sums them in FP32 and divides by N; the averaged chunk is re-quantised to E4M3 and
   ``all_gather``\\ed. Each rank sends ``2(N-1)/N`` bytes per element and every value is rounded to FP8 twice.
   ``"all_gather"`` exchange: every rank gathers all ranks' buffers and sums the whole thing itself: ``N-1`` bytes
   per element, one rounding. At N = 2 both send 1 byte/element, so ``"auto"`` takes the more accurate
   ``all_gather`` there and ``reduce_scatter`` for N > 2.

Why the shared per-tensor scale can neither overflow nor underflow: no rank's tensor exceeds the global amax, and
neither does the average, so no quantisation saturates; and because the scale is per tensor, a 1e-8 gradient is
scaled to the top of the FP8 range instead of being flushed to zero by a scale chosen for a 1e4 gradient in the same
bucket (that naive choice, ``scaling="bucket"``, is kept as the baseline the evidence is measured against). Summing
in FP32 after the exchange removes the pre-/post-division dilemma of an in-network FP8 sum (MS-AMP's 1/sqrt(N)
head-room). The averaged chunk is re-quantised to E4M3 whatever the payload: its range is already bounded by the
shared amax, so what it needs is mantissa (FP8-LM stores reduced gradients as E4M3 too).

Usage: ``ddp.register_comm_hook(FP8CommState(), fp8_allreduce_hook)``.
"""

# No ``from __future__ import annotations`` here: DDP checks the hook's annotations as live objects.

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from swinlab.fp8.formats import E4M3, FP8Format, ScalingMeta, compute_scale, get_format, saturating_cast
from swinlab.fp8.tensor import ScaledFP8, quantize_current

SCALINGS = ("tensor", "bucket")
EXCHANGES = ("auto", "reduce_scatter", "all_gather")


@dataclass
class CommStats:
    """Bytes this rank sent to other ranks, counted from the tensors handed to each collective.

    Convention (what leaves the rank, as in NCCL's bus-bandwidth accounting): ``all_to_all`` sends every chunk but
    its own, ``all_gather`` sends its input to N-1 peers, a ring ``all_reduce`` sends ``2(N-1)/N`` of its input.
    ``elements`` counts the gradient elements reduced, so ``bytes_per_element`` is the cost of one all-reduce.
    """

    bytes_sent: float = 0.0
    elements: int = 0
    by_role: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_per_element(self) -> float:
        return self.bytes_sent / self.elements if self.elements else float("nan")

    def add(self, role: str, nbytes: float) -> None:
        self.bytes_sent += nbytes
        self.by_role[role] = self.by_role.get(role, 0.0) + nbytes

    def reset(self) -> None:
        self.bytes_sent, self.elements, self.by_role = 0.0, 0, {}


@dataclass
class FP8CommState:
    """Settings of :func:`fp8_allreduce_hook` (the ``state`` argument of ``register_comm_hook``).

    ``fmt``: FP8 payload, ``"e4m3"`` (precision) or ``"e5m2"`` (range). ``scaling``: ``"tensor"`` (one shared scale
    per gradient tensor, the paper's automatic scaling) or ``"bucket"`` (one for the whole bucket: the naive baseline,
    which flushes small tensors to zero). ``exchange``: see the module docstring. ``fp8_params``: the parameters
    of the buckets whose gradients travel in FP8; the others are all-reduced in their own dtype. ``None`` means all
    of them. ``fp8_grad_params``: parameters DDP ignores whose gradient an FP8Linear keeps as E4M3 in
    ``param.fp8_grad`` (``grad_mode="fp8"``); the hook queues their FP8 all-reduce for the end of the backward pass
    (see :func:`data_parallel`), so they follow DDP's rhythm, ``no_sync`` included. ``scaling_metas``: FP8 scaling
    states whose amax histories are MAX-reduced at that point too (:func:`sync_amax_histories_`).
    """

    fmt: FP8Format | str = "e4m3"
    scaling: str = "tensor"
    exchange: str = "auto"
    process_group: dist.ProcessGroup | None = None
    fp8_params: Iterable[nn.Parameter] | None = None
    fp8_grad_params: Sequence[nn.Parameter] = ()
    scaling_metas: Sequence[ScalingMeta] = ()
    bucket_cap_mb: float = 25.0
    stats: CommStats = field(default_factory=CommStats)

    def __post_init__(self) -> None:
        self.fmt = get_format(self.fmt)
        if self.scaling not in SCALINGS:
            raise ValueError(f"unknown scaling {self.scaling!r} (choose one of {', '.join(SCALINGS)})")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"unknown exchange {self.exchange!r} (choose one of {', '.join(EXCHANGES)})")
        self._fp8_ids = None if self.fp8_params is None else {id(p) for p in self.fp8_params}
        self.fp8_grad_params = list(self.fp8_grad_params)
        self.scaling_metas = list(self.scaling_metas)
        self._queued = False

    def wants_fp8(self, param: torch.Tensor) -> bool:
        return self._fp8_ids is None or id(param) in self._fp8_ids

    def exchange_for(self, world: int) -> str:
        if self.exchange != "auto":
            return self.exchange
        return "all_gather" if world == 2 else "reduce_scatter"


def shared_amax(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, stats: CommStats) -> torch.Tensor:
    """Per-tensor amax (fp32 ``[T]``) MAX-reduced over the ranks; a non-finite tensor anywhere gives Inf."""
    local = torch.stack([t.detach().abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
                         for t in tensors])  # fmt: skip
    local = torch.where(torch.isnan(local), torch.full_like(local, float("inf")), local)
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
    world = dist.get_world_size(group)
    stats.add("amax", local.nbytes * 2 * (world - 1) / world)
    return local


def shared_scales(global_amax: torch.Tensor, fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, scale_inv)`` per tensor; ``scale_inv`` is NaN where the amax is non-finite, poisoning the output."""
    scale = compute_scale(global_amax, fmt, 0, torch.ones_like(global_amax))
    nan = torch.full_like(scale, float("nan"))
    return scale, torch.where(torch.isfinite(global_amax), scale.reciprocal(), nan)


def segment_values(values: torch.Tensor, lengths: Sequence[int], lo: int, hi: int) -> torch.Tensor:
    """``values[t]`` repeated over the positions ``[lo, hi)`` of a flat buffer made of segments of ``lengths``.

    Positions past the last segment (padding) get 1.
    """
    overlaps, start = [], 0
    for n in lengths:
        overlaps.append(max(0, min(start + n, hi) - max(start, lo)))
        start += n
    overlaps.append(max(0, hi - max(start, lo)))
    padded = torch.cat([values, values.new_ones(1)])
    return torch.repeat_interleave(padded, torch.tensor(overlaps, device=values.device), output_size=hi - lo)


def _quantize_flat(tensors: Sequence[torch.Tensor], scale: torch.Tensor, fmt: FP8Format, size: int) -> torch.Tensor:
    """The tensors, each times its scale, as one zero-padded flat FP8 buffer of ``size`` bytes (uint8 view)."""
    payload = torch.zeros(size, dtype=torch.uint8, device=tensors[0].device)
    offset = 0
    for t, s in zip(tensors, scale, strict=False):
        values = saturating_cast(t.detach().reshape(-1).float() * s, fmt)
        payload[offset:offset + t.numel()] = values.view(torch.uint8)
        offset += t.numel()
    return payload


def _write_flat(tensors: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _global_amax(tensors: Sequence[torch.Tensor], state: FP8CommState) -> torch.Tensor:
    global_amax = shared_amax(tensors, state.process_group, state.stats)
    if state.scaling == "bucket":
        global_amax = global_amax.max().expand_as(global_amax)
    return global_amax


def _reduce_scatter(tensors: Sequence[torch.Tensor], global_amax: torch.Tensor, state: FP8CommState) -> torch.Tensor:
    group, fmt = state.process_group, state.fmt
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = [t.numel() for t in tensors]
    chunk = -(-sum(lengths) // world)
    scale, scale_inv = shared_scales(global_amax, fmt)
    payload = _quantize_flat(tensors, scale, fmt, world * chunk)
    received = torch.empty_like(payload)
    dist.all_to_all_single(received, payload, group=group)
    state.stats.add("reduce_scatter", payload.nbytes * (world - 1) / world)
    inv = segment_values(scale_inv, lengths, rank * chunk, (rank + 1) * chunk)
    return (received.view(fmt.dtype).float().view(world, chunk) * inv).sum(0) / world


def fp8_reduce_scatter(tensors: Sequence[torch.Tensor], state: FP8CommState) -> torch.Tensor:
    """This rank's chunk of the rank-average of ``tensors`` (flattened one after another), exchanged as FP8 bytes.

    The flat buffer is zero-padded to ``N * ceil(total / N)`` elements and rank ``r`` gets elements
    ``[r * chunk, (r + 1) * chunk)`` as FP32 (NaN where a tensor was non-finite on any rank). Scales are shared per
    tensor as in :func:`fp8_all_reduce_`; each rank sends ``(N-1)/N`` bytes per element.
    """
    tensors = list(tensors)
    state.stats.elements += sum(t.numel() for t in tensors)
    return _reduce_scatter(tensors, _global_amax(tensors, state), state)


def fp8_all_reduce_(tensors: Sequence[torch.Tensor], state: FP8CommState) -> None:
    """Average ``tensors`` over the ranks in place, moving them as FP8 bytes (see the module docstring).

    Every rank must pass tensors of the same shapes in the same order (all of them in FP8, ``state.fp8_params`` is
    not consulted). Tensors with Inf/NaN on any rank come back all-NaN on every rank, so the usual non-finite check
    skips the step everywhere.
    """
    group, fmt, stats = state.process_group, state.fmt, state.stats
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    lengths = [t.numel() for t in tensors]
    total = sum(lengths)
    global_amax = _global_amax(tensors, state)
    stats.elements += total

    if state.exchange_for(world) == "all_gather":
        scale, scale_inv = shared_scales(global_amax, fmt)
        payload = _quantize_flat(tensors, scale, fmt, total)
        gathered = torch.empty(world * total, dtype=torch.uint8, device=payload.device)
        dist.all_gather_single(gathered, payload, group=group)  # gloo takes the concatenated form only
        stats.add("all_gather", payload.nbytes * (world - 1))
        inv = segment_values(scale_inv, lengths, 0, total)
        mean = sum(part.view(fmt.dtype).float() * inv for part in gathered.view(world, total)) / world
        _write_flat(tensors, mean)
        return

    shard_mean = _reduce_scatter(tensors, global_amax, state)
    chunk = shard_mean.numel()
    lo, hi = rank * chunk, (rank + 1) * chunk
    # |mean| <= global amax, so a scale from the same amax re-quantises it without saturating.
    out_scale, out_inv = shared_scales(global_amax, E4M3)
    shard_bytes = saturating_cast(shard_mean * segment_values(out_scale, lengths, lo, hi), E4M3).view(torch.uint8)
    gathered = torch.empty(world * chunk, dtype=torch.uint8, device=shard_bytes.device)
    dist.all_gather_single(gathered, shard_bytes, group=group)
    stats.add("all_gather", shard_bytes.nbytes * (world - 1))
    _write_flat(tensors, gathered.view(E4M3.dtype).float() * segment_values(out_inv, lengths, 0, world * chunk))


def all_reduce_mean_(tensors: Sequence[torch.Tensor], state: FP8CommState) -> None:
    """Plain average in the tensors' own dtype (for gradients kept out of FP8), one flat collective."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=state.process_group)
    world = dist.get_world_size(state.process_group)
    state.stats.add("high_precision", flat.nbytes * 2 * (world - 1) / world)
    state.stats.elements += flat.numel()
    _write_flat(tensors, flat / world)


def store_e4m3(values: torch.Tensor) -> ScaledFP8:
    """``values`` as E4M3 with a current scale, the form gradients are kept in; the scale is NaN if any value is
    non-finite (the saturating cast would otherwise turn Inf into 448), so optimizers see it and skip the step."""
    q = quantize_current(values, E4M3)
    return ScaledFP8(q.data, torch.where(torch.isfinite(values).all(), q.scale, torch.nan), E4M3)


def all_reduce_fp8_grads_(params: Sequence[nn.Parameter], state: FP8CommState) -> None:
    """Average the E4M3 gradients in ``param.fp8_grad`` over the ranks; each is re-stored with :func:`store_e4m3`.

    Gradients are dequantised a bucket (``state.bucket_cap_mb`` of FP32) at a time, so the transient FP32 copy stays
    bounded. Every rank must hold an FP8 gradient for the same parameters (they follow the same backward).
    """
    cap = state.bucket_cap_mb * 2**20 / 4

    def reduce(bucket: list[nn.Parameter]) -> None:
        values = [p.fp8_grad.dequantize() for p in bucket]
        fp8_all_reduce_(values, state)
        for p, v in zip(bucket, values, strict=True):
            p.fp8_grad = store_e4m3(v)

    bucket, size = [], 0
    for param in (p for p in params if getattr(p, "fp8_grad", None) is not None):
        if bucket and size + param.numel() > cap:
            reduce(bucket)
            bucket, size = [], 0
        bucket.append(param)
        size += param.numel()
    if bucket:
        reduce(bucket)


@torch.no_grad()
def sync_amax_histories_(metas: Sequence[ScalingMeta], group: dist.ProcessGroup | None = None) -> None:
    """MAX-reduce the amax histories of ``metas`` over the ranks (MIN for their step counters; one collective) and
    refresh their scales.

    Each rank records the amaxes of its own activations and output gradients, so delayed scales drift apart;
    reduced after every synchronising backward (as TransformerEngine reduces amaxes over its FP8 group), every rank
    casts with the same scales, and a checkpoint written by rank 0 holds every rank's scaling state.
    """
    if not metas:
        return
    # One MAX collective for both: histories as they are, step counters negated (a MIN, so a history that one rank
    # wiped after a non-finite amax restarts its warm-up everywhere).
    steps = torch.stack([m.steps for m in metas]).float()
    flat = torch.cat([*(m.amax_history for m in metas), -steps])
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    offset = 0
    for i, meta in enumerate(metas):
        n = meta.amax_history.numel()
        meta.amax_history.copy_(flat[offset:offset + n])
        meta.steps.copy_(-flat[len(flat) - len(metas) + i])
        meta.scale.copy_(compute_scale(meta.amax_history.max(), meta.fmt, meta.margin, meta.scale))
        offset += n


def _after_backward(state: FP8CommState) -> None:
    state._queued = False
    all_reduce_fp8_grads_(state.fp8_grad_params, state)
    sync_amax_histories_(state.scaling_metas, state.process_group)


def fp8_allreduce_hook(state: FP8CommState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients averaged over the ranks through FP8 (see module docstring).

    The collectives run when DDP calls the hook (as each bucket becomes ready during backward) and the returned
    future is already complete: simple and the same on gloo and NCCL, but a bucket's exchange does not overlap the
    rest of the backward pass as DDP's asynchronous default does. The first call of a backward pass also queues
    the all-reduce of ``state.fp8_grad_params`` (and the amax-history sync) for the end of that pass. Register with
    ``ddp.register_comm_hook(FP8CommState(...), fp8_allreduce_hook)``.
    """
    if (state.fp8_grad_params or state.scaling_metas) and not state._queued:
        state._queued = True
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _after_backward(state))
    grads, params = bucket.gradients(), bucket.parameters()
    fp8 = [g for g, p in zip(grads, params, strict=True) if state.wants_fp8(p)]
    high = [g for g, p in zip(grads, params, strict=True) if not state.wants_fp8(p)]
    if fp8:
        fp8_all_reduce_(fp8, state)
    if high:
        all_reduce_mean_(high, state)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def data_parallel(
    model: nn.Module,
    *,
    fmt: FP8Format | str = "e4m3",
    process_group: dist.ProcessGroup | None = None,
    **ddp_kwargs,
) -> DistributedDataParallel:
    """``DistributedDataParallel`` for a model with FP8 linears, gradients reduced the FP8-LM way.

    FP8 weights whose gradient lives in ``weight.fp8_grad`` (``grad_mode="fp8"``) are hidden from DDP (its reducer
    only sees autograd gradients, and a parameter whose gradient never arrives would stall it) and averaged in FP8
    at the end of every synchronising backward; FP8 weights with ordinary gradients (``"dequantized"``) travel in
    FP8 inside DDP's buckets; every other parameter (biases, norms, embeddings, heads) is all-reduced in its own
    precision, as MS-AMP does. The FP8 scaling histories are MAX-reduced after each synchronising backward, so all
    ranks cast alike. The hook's :class:`FP8CommState` is ``ddp.fp8_comm``. ``ddp_kwargs`` go to
    ``DistributedDataParallel`` (e.g. ``device_ids``).
    """
    from swinlab.fp8.linear import FP8Linear

    hidden, in_buckets = [], []
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            target = hidden if module.grad_mode == "fp8" else in_buckets
            target.append((f"{name}.weight" if name else "weight", module.weight))
    if not hidden and not in_buckets:
        raise ValueError("data_parallel: the model has no FP8Linear layers (call swinlab.fp8.initialize first)")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [name for name, _ in hidden])
    ddp = DistributedDataParallel(model, process_group=process_group, **ddp_kwargs)
    metas = [meta for m in model.modules() if isinstance(m, FP8Linear) for meta in m.metas()]
    state = FP8CommState(fmt=fmt, process_group=process_group, fp8_params=[p for _, p in in_buckets],
                         fp8_grad_params=[p for _, p in hidden], scaling_metas=metas)  # fmt: skip
    ddp.register_comm_hook(state, fp8_allreduce_hook)
    ddp.fp8_comm = state  # its ``stats`` count the bytes this rank sends
    return ddp
