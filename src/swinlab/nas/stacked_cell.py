"""A search cell whose edges reading the same states run together, with the per-edge cell's numbers bit for bit.

A DARTS search cell makes 14 edges x 7 operations of small calls (8-32 channels at CPU search sizes), and oneDNN's
cost per call is much of their time. The edges that read the same states (the 8 reading the cell inputs, then the
3, 2 and 1 reading each new node) can run as one call per operation kind instead, inputs and weights stacked along
the channels: depthwise and 1 x 1 convolutions as grouped ones, BN and pooling channel by channel. Each edge then
gets the numbers of its own call wherever the kernels keep each channel's sums apart, which :class:`_StackedConv`
checks once per shape and pass (where a grouped kernel sums otherwise, e.g. 1 x 1 at 8 x 8 with 32 channels or
3 x 3 weight gradients, it runs edge by edge). Two things stacking alone would change are kept as the per-edge cell
has them: a state's gradient is the sum of its consumers' contributions, which autograd adds one by one, the latest
created first, so each state reaches the edges through :class:`_FanOut`, whose backward re-adds them in that order;
and α's gradient is one product and sum per edge and operation, which :class:`_EdgeMix` keeps.

:func:`use_stacked` decides per call: gradients on, on the CPU, every edge a plain mixed operation of the official
kinds, and a first-call check that the stacked cell gives the per-edge cell's values, gradients and BN statistics bit
for bit on random inputs of these shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swinlab.nas.operations import DilConv, FactorizedReduce, SepConv, Zero, apply_pool

Edge = tuple[int, int]
"""(node, input state); its α row is ``offset(node) + state``."""


def use_stacked(
    cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor, edge_type: type[nn.Module]
) -> bool:
    """Whether :func:`stacked_cell_forward` runs this call of ``cell`` (a search cell whose edges are ``edge_type``,
    the plain mixed operation); the check of a new kind of call runs here, once."""
    if (
        not torch.is_grad_enabled()
        or s0.device.type != "cpu"
        or torch.is_autocast_enabled("cpu")
        or torch.compiler.is_compiling()
    ):
        return False
    state = _state(cell)
    if state is None or _global_hooks():  # hooks expect their modules to be called
        return False
    checks = cell.__dict__.setdefault("_stacked_checks", {})
    key = (state, s0.shape, s1.shape, s0.dtype, weights.shape, torch.get_num_threads())
    if key not in checks:
        checks[key] = _stackable(cell, edge_type) and _stacked_equals_per_edge(cell, s0, s1, weights)
    return checks[key]


def _global_hooks() -> bool:
    from torch.nn.modules import module  # the registries of ``nn.modules.module.register_module_*_hook``

    return bool(
        module._global_forward_hooks
        or module._global_forward_pre_hooks
        or module._global_backward_hooks
        or module._global_backward_pre_hooks
    )


def _state(cell: nn.Module) -> tuple | None:
    """What the check of a cell depends on, in one walk: its modules' types, which weights take gradients, each
    BN's mode; ``None`` if a module inside has hooks."""
    state: list = []
    for m in cell.modules():
        if m is not cell and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            return None
        state.append(type(m))
        state.extend(p is not None and p.requires_grad for p in m._parameters.values())
        if isinstance(m, nn.BatchNorm2d):
            state.append((m.training, m.running_mean is None))
    return tuple(state)


def stacked_cell_forward(cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``cell``'s forward (a :class:`~swinlab.nas.model_search.SearchCell`) with the edges reading the same states
    stacked; ``weights`` are the rows of softmax(α)."""
    steps = cell._steps
    offsets = [sum(2 + t for t in range(i)) for i in range(steps)]
    kinds = [k for k, kind in enumerate(cell._ops[0]._kinds) if kind != "none"]
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    totals: dict[Edge, torch.Tensor] = {}

    def complete(node: int) -> None:
        states.append(sum(totals[(node, j)] for j in range(2 + node)))  # in the per-edge order

    for group in [[0, 1], *([s] for s in range(2, steps + 1))]:
        while len(states) <= group[0]:
            complete(len(states) - 2)
        edges = [(i, j) for i in range(steps) for j in group if j < 2 + i]
        fanned = _FanOut.apply(tuple(group.index(j) for _, j in edges), len(kinds), *(states[j] for j in group))
        for j, passed in zip(group, fanned[: len(group)], strict=True):
            states[j] = passed
        outs = [
            _stacked_op(x, [cell._ops[offsets[i] + j]._ops[k] for i, j in edges])
            for k, x in zip(kinds, fanned[len(group) :], strict=True)
        ]
        mixed = _EdgeMix.apply(weights, [offsets[i] + j for i, j in edges], kinds, *outs)
        totals.update(zip(edges, mixed, strict=True))
    complete(steps - 1)
    return torch.cat(states[-cell.multiplier :], dim=1)


class _FanOut(torch.autograd.Function):
    """The states passed through (for the cell's concatenation) and stacked once per operation kind (one tensor
    each, so their gradients come back apart); ``slots`` names each stacked slot's state. The backward adds a
    state's gradient in the per-edge cell's order: the pass-through's (the concatenation is created last), then the
    edges from the latest created, each edge's operations from the last."""

    @staticmethod
    def forward(ctx, slots: tuple[int, ...], kinds: int, *states: torch.Tensor):
        ctx.slots, ctx.channels = slots, [s.shape[1] for s in states]
        stacked = torch.cat([states[i] for i in slots], 1)
        return (*(s.view_as(s) for s in states), *(stacked.view_as(stacked) for _ in range(kinds)))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        passed, stacked = grads[: len(ctx.channels)], grads[len(ctx.channels) :]
        starts = [0]
        for i in ctx.slots:
            starts.append(starts[-1] + ctx.channels[i])
        out = []
        for state, total in enumerate(passed):
            for slot in reversed([s for s, i in enumerate(ctx.slots) if i == state]):
                for grad in reversed(stacked):
                    if grad is not None:
                        part = grad[:, starts[slot] : starts[slot + 1]]
                        total = part if total is None else total + part
            out.append(total)
        return None, None, *out


class _EdgeMix(torch.autograd.Function):
    """Each edge's Σ_o w_o · o(x) from the stacked outputs of the operation kinds ``cols``: the products and sums
    element by element as the per-edge sum makes them, and α's gradient as one product and sum per edge and
    operation (``rows``: the edges' α rows)."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, rows: list[int], cols: list[int], *outs: torch.Tensor):
        C = outs[0].shape[1] // len(rows)
        scales = [weights[rows, col].repeat_interleave(C).view(1, -1, 1, 1) for col in cols]
        total = None
        for scale, out in zip(scales, outs, strict=True):
            total = scale * out if total is None else total + scale * out
        ctx.save_for_backward(weights, *outs, *scales)
        ctx.rows, ctx.cols, ctx.C, ctx.weights_node = rows, cols, C, weights.grad_fn
        return tuple(total.split(C, 1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        weights, *saved = ctx.saved_tensors
        outs, scales = saved[: len(ctx.cols)], saved[len(ctx.cols) :]
        C = ctx.C
        grad_weights = None
        if ctx.needs_input_grad[0] and _reached(ctx.weights_node):
            grad_weights = torch.zeros_like(weights)
            for e, row in enumerate(ctx.rows):
                for col, out in zip(ctx.cols, outs, strict=True):
                    grad_weights[row, col] = (grads[e] * out[:, e * C : (e + 1) * C]).sum()
        grad = torch.cat(grads, 1)
        return grad_weights, None, None, *(grad * scale for scale in scales)


def _reached(node: torch.autograd.graph.Node | None) -> bool:
    """Whether the running backward pass needs the gradient of the tensor ``node`` made: ``autograd.grad(loss, α)``
    does not need the weights', though they take gradients (torch's own nodes skip those too)."""
    return node is None or torch._C._will_engine_execute_node(node)


def _stacked_op(x: torch.Tensor, ops: Sequence[nn.Module]) -> torch.Tensor:
    """One operation kind of every edge of a group, on the stacked input."""
    op = ops[0]
    if isinstance(op, nn.Identity):
        return x
    if isinstance(op, nn.Sequential):  # a pool and its BN
        return _stacked_bn(apply_pool(op[0], x), [o[1] for o in ops])
    if isinstance(op, FactorizedReduce):
        x = F.relu(x)
        a = _stacked_conv(x, [o.conv_1 for o in ops])
        b = _stacked_conv(x[:, :, 1:, 1:], [o.conv_2 for o in ops])
        N, _, H, W = a.shape
        halves = torch.stack([a.view(N, len(ops), -1, H, W), b.view(N, len(ops), -1, H, W)], 2)
        return _stacked_bn(halves.view(N, -1, H, W), [o.bn for o in ops])
    for layers in zip(*(o.op for o in ops), strict=True):  # SepConv, DilConv: ReLU, convolutions, BN
        if isinstance(layers[0], nn.ReLU):
            x = F.relu(x)
        elif isinstance(layers[0], nn.Conv2d):
            x = _stacked_conv(x, layers)
        else:
            x = _stacked_bn(x, layers)
    return x


def _stacked_bn(x: torch.Tensor, bns: Sequence[nn.BatchNorm2d]) -> torch.Tensor:
    """Non-affine BNs side by side, choosing statistics and updates as ``nn.BatchNorm2d.forward`` does (running
    statistics updated on stacked copies, then written back)."""
    b = bns[0]
    factor = 0.0 if b.momentum is None else b.momentum
    if b.training and b.track_running_stats and b.num_batches_tracked is not None:
        for m in bns:
            m.num_batches_tracked.add_(1)
        if b.momentum is None:
            factor = 1.0 / float(b.num_batches_tracked)
    use_running = b.running_mean is not None and (not b.training or b.track_running_stats)
    mean = torch.cat([m.running_mean for m in bns]) if use_running else None
    var = torch.cat([m.running_var for m in bns]) if use_running else None
    batch_stats = b.training or b.running_mean is None
    out = F.batch_norm(x, mean, var, None, None, batch_stats, factor, b.eps)
    if use_running and batch_stats:
        for m, m_mean, m_var in zip(bns, mean.chunk(len(bns)), var.chunk(len(bns)), strict=True):
            m.running_mean.copy_(m_mean)
            m.running_var.copy_(m_var)
    return out


def _stacked_conv(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> torch.Tensor:
    c = convs[0]
    weight = torch.cat([conv.weight for conv in convs])
    return _StackedConv.apply(x, weight, len(convs), (c.stride, c.padding, c.dilation, c.groups))


class _StackedConv(torch.autograd.Function):
    """The edges' convolutions on the stacked input, each pass (forward, input gradient, weight gradient) as one
    grouped call where that gives each edge's numbers, else edge by edge on its slice (:func:`_grouped_passes`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, edges: int, args: tuple) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.edges, ctx.args, ctx.weight_node = edges, args, weight.grad_fn
        ctx.grouped = _grouped_passes(x, weight, edges, args)
        return _conv(x, weight, edges, args, ctx.grouped[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_grad(grad, x, weight, ctx.edges, ctx.args, ctx.grouped[1], 0)
        if ctx.needs_input_grad[1] and _reached(ctx.weight_node):
            grad_w = _conv_grad(grad, x, weight, ctx.edges, ctx.args, ctx.grouped[2], 1)
        return grad_x, grad_w, None, None


def _conv(x: torch.Tensor, weight: torch.Tensor, edges: int, args: tuple, grouped: bool) -> torch.Tensor:
    stride, padding, dilation, groups = args
    if grouped:
        return F.conv2d(x, weight, None, stride, padding, dilation, groups * edges)
    parts = zip(_per_edge(x, edges), weight.chunk(edges), strict=True)
    return torch.cat([F.conv2d(a, w, None, stride, padding, dilation, groups) for a, w in parts], 1)


def _per_edge(t: torch.Tensor, edges: int) -> tuple[torch.Tensor, ...]:
    """Each edge's contiguous slice of a stacked tensor, made by one copy (the kernels want contiguous inputs)."""
    return t.unflatten(1, (edges, -1)).transpose(0, 1).contiguous().unbind(0)


def _conv_grad(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, edges: int, args: tuple, grouped: bool, which: int
) -> torch.Tensor:
    """The input (``which`` 0) or the weight (1) gradient alone."""
    stride, padding, dilation, groups = args
    mask = [which == 0, which == 1, False]
    if grouped:
        return torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups * edges, mask
        )[which]
    parts = zip(_per_edge(grad, edges), _per_edge(x, edges), weight.chunk(edges), strict=True)
    grads = [
        torch.ops.aten.convolution_backward(g, a, w, None, stride, padding, dilation, False, [0, 0], groups, mask)[
            which
        ]
        for g, a, w in parts
    ]
    return torch.cat(grads, 1 - which)


_grouped: dict[tuple, tuple[bool, bool, bool]] = {}


def _grouped_passes(x: torch.Tensor, weight: torch.Tensor, edges: int, args: tuple) -> tuple[bool, bool, bool]:
    """For the forward, the input gradient and the weight gradient: does one grouped call give the edge-by-edge
    numbers? Checked once per shape on random inputs (a generator of their own, so the global random state does not
    move), where any other summation order shows."""
    if edges == 1:
        return True, True, True
    key = (tuple(x.shape), tuple(weight.shape), x.dtype, edges, args, torch.get_num_threads())
    if key not in _grouped:
        gen = torch.Generator().manual_seed(0)
        x, weight = (torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (x, weight))
        out = _conv(x, weight, edges, args, False)
        grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
        _grouped[key] = (
            torch.equal(_conv(x, weight, edges, args, True), out),
            *(
                torch.equal(
                    _conv_grad(grad, x, weight, edges, args, True, which),
                    _conv_grad(grad, x, weight, edges, args, False, which),
                )
                for which in (0, 1)
            ),
        )
    return _grouped[key]


def _stackable(cell: nn.Module, edge_type: type[nn.Module]) -> bool:
    """Every edge a plain ``edge_type`` whose operations :func:`_stacked_op` knows, with plain convolutions and
    non-affine BN (the search cell's)."""
    for edge in cell._ops:
        if type(edge) is not edge_type:
            return False
        for op in edge._ops:
            pool = isinstance(op, nn.Sequential) and len(op) == 2 and isinstance(op[0], (nn.MaxPool2d, nn.AvgPool2d))
            if not (pool or isinstance(op, (Zero, nn.Identity, FactorizedReduce, SepConv, DilConv))):
                return False
            for m in op.modules():
                if isinstance(m, nn.Conv2d) and (type(m) is not nn.Conv2d or m.bias is not None):
                    return False
                if isinstance(m, nn.BatchNorm2d) and m.affine:
                    return False
    return True


def _stacked_equals_per_edge(cell: nn.Module, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> bool:
    """Both forms on random inputs: the values, the gradients of both inputs, of the edge weights and of every
    weight taking one, and the BN statistics, equal bit for bit. The cell's statistics are put back afterwards and
    the global random state does not move."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(t.shape, generator=gen, dtype=t.dtype).requires_grad_() for t in (s0, s1)]
    mix = torch.randn(weights.shape, generator=gen, dtype=weights.dtype).softmax(-1).requires_grad_()
    wrt = [*inputs, mix, *(p for p in cell.parameters() if p.requires_grad)]
    buffers = [b for b in cell.buffers() if b is not None]
    saved = [b.clone() for b in buffers]
    results = []
    for forward in (cell.forward_per_edge, lambda a, b, w: stacked_cell_forward(cell, a, b, w)):
        out = forward(*inputs, mix)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append([out, *torch.autograd.grad(out, wrt, grad), *(b.clone() for b in buffers)])
        for b, v in zip(buffers, saved, strict=True):
            b.copy_(v)
    return all(torch.equal(a, b) for a, b in zip(*results, strict=True))
