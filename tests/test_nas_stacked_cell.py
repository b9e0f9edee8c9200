"""The stacked search cell (edges reading the same states run together) gives the per-edge cell's numbers bit for bit,
and is used only where that was checked."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from swinlab.nas import Architect, SearchNetwork, stacked_cell
from swinlab.nas.model_search import MixedOp, darts_search


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    """Kernels may sum differently with more threads (and with more groups): both counts are checked."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _cell_inputs(net: SearchNetwork, cell_index: int, batch: int = 2, size: int = 8) -> tuple[torch.Tensor, ...]:
    """Inputs of the shapes ``cell_index`` reads, from a forward of the stem and the cells before it."""
    gen = torch.Generator().manual_seed(cell_index)
    with torch.no_grad():
        s0 = s1 = net.stem(torch.randn(batch, 3, size, size, generator=gen))
        for cell in net.cells[:cell_index]:
            w = torch.softmax(net.alphas_reduce if cell.reduction else net.alphas_normal, -1)
            s0, s1 = s1, cell(s0, s1, w)
    return s0.clone().requires_grad_(), s1.clone().requires_grad_()


def _run(forward, cell, s0, s1, alpha) -> list[torch.Tensor]:
    """Output, gradients of both inputs, α and every weight taking one, and the BN statistics afterwards."""
    out = forward(s0, s1, torch.softmax(alpha, -1))
    wrt = [s0, s1, alpha, *(p for p in cell.parameters() if p.requires_grad)]
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    return [out, *torch.autograd.grad(out, wrt, grad), *(b.clone() for b in cell.buffers())]


@pytest.mark.parametrize("trainable", [False, True], ids=["finite-difference pass", "weight pass"])
@pytest.mark.parametrize("primitives", ["darts", "aca"])
def test_stacked_cell_equals_the_per_edge_cell(threads, trainable, primitives):
    """Every cell kind (normal, reduction, the one after a reduction), every gradient, and BN's running statistics."""
    torch.manual_seed(0)
    net = darts_search(C=4, layers=5, primitives=primitives)
    net.requires_grad_(trainable)
    for index, cell in enumerate(net.cells):
        s0, s1 = _cell_inputs(net, index)
        alpha = (1e-1 * torch.randn(14, len(net.primitives))).requires_grad_()
        state = {k: v.clone() for k, v in cell.state_dict().items()}
        per_edge = _run(cell.forward_per_edge, cell, s0, s1, alpha)
        cell.load_state_dict(state)
        stacked = _run(partial(stacked_cell.stacked_cell_forward, cell), cell, s0, s1, alpha)
        assert len(per_edge) == len(stacked)
        for ours, ref in zip(stacked, per_edge, strict=True):
            assert torch.equal(ours, ref), (index, cell.reduction)


def test_the_network_uses_it_and_the_architect_step_is_unchanged(threads):
    """A second-order α gradient with the stacked cells equals the per-edge one bit for bit, and the cells did run
    stacked (the check found them equal)."""
    results = []
    for stack in (True, False):
        torch.manual_seed(0)
        net = SearchNetwork(4, 10, 5)
        if not stack:
            for cell in net.cells:
                cell._ops[0].register_forward_pre_hook(lambda *args: None)  # a hook inside: edge by edge
        opt = torch.optim.SGD(net.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        arch = Architect(net, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-4, arch_weight_decay=1e-3)
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
        F.cross_entropy(net(x), y).backward()
        opt.step()  # momentum buffers, so the unrolled step uses them
        grads = arch.alpha_grads(x, y, x.flip(0), y.flip(0), 0.025, opt, unrolled=True)
        ran = [any(getattr(cell, "_stacked_checks", {}).values()) for cell in net.cells]
        results.append((grads, ran, [b.clone() for b in net.buffers()]))
    (stacked, ran, stats), (per_edge, ran_per_edge, stats_per_edge) = results
    assert all(ran) and not any(ran_per_edge)
    for a, b in zip([*stacked, *stats], [*per_edge, *stats_per_edge], strict=True):
        assert torch.equal(a, b)


def test_it_is_not_used_where_it_does_not_apply():
    torch.manual_seed(0)
    net = SearchNetwork(4, 10, 3)
    cell = net.cells[0]
    s0, s1 = _cell_inputs(net, 0)
    w = torch.softmax(net.alphas_normal, -1)
    assert stacked_cell.use_stacked(cell, s0, s1, w, MixedOp)
    with torch.no_grad():
        assert not stacked_cell.use_stacked(cell, s0, s1, w, MixedOp)
    handle = cell._ops[3].register_forward_hook(lambda *args: None)  # e.g. ACA's importance measurement
    assert not stacked_cell.use_stacked(cell, s0, s1, w, MixedOp)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert not stacked_cell.use_stacked(cell, s0, s1, w, MixedOp)
    handle.remove()
    pc = darts_search(C=4, layers=3, variant="pc").cells[0]  # partial-channel edges
    assert not stacked_cell.use_stacked(pc, *_cell_inputs(net, 0), w, MixedOp)
    fast = darts_search(C=4, layers=3, fast_convolutions=True).cells[0]  # their own convolutions
    assert not stacked_cell.use_stacked(fast, *_cell_inputs(net, 0), w, MixedOp)


def test_the_check_leaves_no_trace():
    """It draws from a generator of its own and puts the BN statistics back."""
    torch.manual_seed(0)
    net = SearchNetwork(4, 10, 3)
    cell = net.cells[1]
    s0, s1 = _cell_inputs(net, 1)
    state = {k: v.clone() for k, v in cell.state_dict().items()}
    rng = torch.get_rng_state()
    assert stacked_cell.use_stacked(cell, s0, s1, torch.softmax(net.alphas_reduce, -1), MixedOp)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, value in cell.state_dict().items():
        assert torch.equal(value, state[name]), name
