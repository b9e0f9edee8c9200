"""PC-DARTS (swinlab.nas.pc): the partial mixed operation, channel shuffle, edge normalisation in the super-net and
in the derivation. (Bit-identical to the official yuhuixu1993/PC-DARTS on 20 random α/β: checked outside the tests,
the official code has no licence to keep a copy here.)"""

from __future__ import annotations

import json

import pytest
import torch

from swinlab.cli import main as cli_main
from swinlab.engine import load_checkpoint
from swinlab.nas import (
    PRIMITIVES,
    Architect,
    MixedOp,
    PartialMixedOp,
    SearchNetwork,
    channel_shuffle,
    derive_genotype,
    edge_weights,
    partial_channels,
)
from swinlab.nas.model_search import darts_search
from test_nas_tasks import _recipe


def _weights(n: int = len(PRIMITIVES), seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.randn(n, generator=torch.Generator().manual_seed(seed)), -1)


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_op_with_k1_is_the_plain_mixed_op(stride):
    torch.manual_seed(0)
    plain = MixedOp(8, stride)
    partial = partial_channels(1, MixedOp)(8, stride, PRIMITIVES)
    partial.mixed.load_state_dict(plain.state_dict())
    x, w = torch.randn(2, 8, 8, 8), _weights()
    assert torch.equal(partial(x, w), plain(x, w))


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert torch.equal(channel_shuffle(x, 1), x)


@pytest.mark.parametrize("stride", [1, 2])
def test_partial_op_mixes_a_quarter_and_bypasses_the_rest(stride):
    torch.manual_seed(0)
    edge = partial_channels(4, MixedOp)(8, stride, PRIMITIVES)
    assert isinstance(edge, PartialMixedOp) and isinstance(edge.mixed, MixedOp)
    x, w = torch.randn(2, 8, 8, 8), _weights()
    out = edge(x, w)
    assert out.shape == (2, 8, 8 // stride, 8 // stride)
    bypass = x[:, 2:] if stride == 1 else torch.nn.functional.max_pool2d(x[:, 2:], 2, 2)
    # after the shuffle, channels 4g + i come from group g's i-th channel: group 0 is the mixed part
    unshuffled = out.view(2, 2, 4, *out.shape[2:]).transpose(1, 2).reshape(out.shape)
    assert torch.equal(unshuffled[:, 2:], bypass)
    assert torch.equal(unshuffled[:, :2], edge.mixed(x[:, :2], w))


def test_partial_channels_refuses_an_uneven_split():
    with pytest.raises(ValueError, match="a cell of 6 channels does not split into K=4"):
        partial_channels(4, MixedOp)(6, 1, PRIMITIVES)


def test_edge_weights_softmax_per_node():
    betas = torch.randn(14)
    w = edge_weights(betas, 4)
    for start, size in ((0, 2), (2, 3), (5, 4), (9, 5)):
        assert torch.allclose(w[start : start + size], torch.softmax(betas[start : start + size], -1))
    with pytest.raises(ValueError, match=r"β has shape \(9,\), the cell needs \(14,\)"):
        edge_weights(torch.zeros(9), 4)


def test_pc_super_net_has_betas_and_derives_with_them():
    torch.manual_seed(0)
    net = darts_search(C=8, num_classes=5, layers=3, variant="pc", partial_channels=4)
    names = [n for n, _ in net.named_buffers() if n.startswith(("alphas", "betas"))]
    assert names == ["alphas_normal", "alphas_reduce", "betas_normal", "betas_reduce"]
    assert [tuple(a.shape) for a in net.arch_parameters()] == [(14, 8), (14, 8), (14,), (14,)]
    # node 0: edge 1 has the stronger operation, but β moves node 0's choice order to edge 0 first
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[0, 4], net.alphas_normal[1, 5] = 1.0, 1.5
        net.betas_normal.zero_()
        net.betas_normal[0] = 2.0
    g = net.genotype()
    assert g.normal[:2] == [("sep_conv_3x3", 0), ("sep_conv_5x5", 1)]
    plain = derive_genotype(net.alphas_normal, net.alphas_reduce)
    assert plain.normal[:2] == [("sep_conv_5x5", 1), ("sep_conv_3x3", 0)]
    with pytest.raises(ValueError, match="both betas_normal and betas_reduce"):
        derive_genotype(net.alphas_normal, net.alphas_reduce, betas_normal=net.betas_normal)


def test_pc_super_net_trains_alpha_and_beta_with_the_architect():
    torch.manual_seed(0)
    net = darts_search(C=8, num_classes=5, layers=3, variant="pc")
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    sgd = torch.optim.SGD(net.parameters(), 0.025, momentum=0.9)
    arch = Architect(net, momentum=0.9, weight_decay=3e-4, arch_learning_rate=3e-2, arch_weight_decay=1e-3)
    before = [a.detach().clone() for a in net.arch_parameters()]
    for unrolled in (False, True):
        grads = arch.alpha_grads(x, y, x, y, 0.025, sgd, unrolled)
        assert [g.shape for g in grads] == [a.shape for a in net.arch_parameters()]
        assert all(g.abs().sum() > 0 for g in grads)
    arch.step(x, y, x, y, 0.025, sgd, unrolled=False)
    assert all(not torch.equal(a, b) for a, b in zip(net.arch_parameters(), before, strict=True))
    # a checkpoint carries β too, and a dtype change keeps it a leaf
    other = darts_search(C=8, num_classes=5, layers=3, variant="pc")
    other.load_state_dict(net.state_dict())
    assert torch.equal(other.betas_reduce, net.betas_reduce)
    other.double()
    assert all(a.is_leaf and a.requires_grad for a in other.arch_parameters())


def test_search_network_variant_errors():
    with pytest.raises(ValueError, match="unknown DARTS variant 'gdas'"):
        darts_search(C=8, layers=3, variant="gdas")
    with pytest.raises(ValueError, match="unknown search space 'nasnet'"):
        darts_search(C=8, layers=3, primitives="nasnet")
    assert isinstance(darts_search(C=4, layers=3, primitives=["none", "sep_conv_3x3"]), SearchNetwork)


def test_pc_search_through_the_engine_waits_arch_start_epoch(tmp_path):
    run = tmp_path / "run"
    settings = {"epochs": 2, "task.arch_start_epoch": 1, "model.kwargs": "{C: 4, layers: 3, variant: pc}"}
    assert cli_main(["train", str(_recipe(tmp_path / "r.yaml", run, **settings))]) == 0
    history = json.loads((run / "alphas.json").read_text())
    assert [r["arch_updates"] for r in history] == [0, 4]  # 4 steps an epoch, α still in the first
    assert len(history[0]["edges_normal"]) == 14 and history[0]["edges_normal"] != history[1]["edges_normal"]
    state = load_checkpoint(run / "checkpoint.pt")["model"]
    assert state["betas_reduce"].shape == (14,) and "cells.0._ops.0.mixed._ops.4.op.1.weight" in state


def test_architecture_state_of_another_search_space_or_variant_is_refused():
    pc_net = darts_search(C=8, num_classes=5, layers=3, variant="pc")
    with pytest.raises(RuntimeError, match=r"Unexpected key.*betas_normal"):
        darts_search(C=8, num_classes=5, layers=3).load_state_dict(pc_net.state_dict())
    aca_net = darts_search(C=8, num_classes=5, layers=3, primitives="aca")
    with pytest.raises(RuntimeError, match=r"alphas_normal.*torch.Size\(\[14, 8\]\).*torch.Size\(\[14, 7\]\)"):
        aca_net.load_state_dict(darts_search(C=8, num_classes=5, layers=3).state_dict(), strict=False)


def test_official_pc_darts_keys_load():
    """The official PC-DARTS MixedOp holds its operations itself (``cells.0._ops.3._ops.4.op.1.weight``); ours
    wraps the DARTS MixedOp (``cells.0._ops.3.mixed._ops.4.op.1.weight``): official checkpoints load strictly."""
    torch.manual_seed(0)
    source = darts_search(C=8, num_classes=5, layers=3, variant="pc")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    official = {k.replace(".mixed._ops.", "._ops."): v for k, v in source.state_dict().items()}
    assert "cells.0._ops.3._ops.4.op.1.weight" in official and not any(".mixed." in k for k in official)
    target = darts_search(C=8, num_classes=5, layers=3, variant="pc")
    target.load_state_dict(official, strict=True)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    target.load_state_dict(source.state_dict(), strict=True)  # and its own layout still loads
