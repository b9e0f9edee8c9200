"""ACA (swinlab.nas.aca): no skip in the search space nor in the derived cell, channel importance and allocation on
hand-set cases, the extended genotype's JSON and its errors, the evaluation edge (identity slice bit-exact), "all
kept" = the plain network, ACA on top of PC-DARTS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from swinlab.cli import main as cli_main
from swinlab.engine import load_checkpoint
from swinlab.nas import (
    ACA_PRIMITIVES,
    AcaEdge,
    AcaGenotype,
    AlphaAllocation,
    MagnitudeImportance,
    MassAllocation,
    NetworkCIFAR,
    NetworkImageNet,
    TaylorImportance,
    aca_from_plain,
    aca_genotype,
    derive_aca_genotype,
    kept_channels,
    load_aca_genotype,
    load_genotype,
    measure_importance,
    read_genotype,
    save_genotype,
)
from swinlab.nas.genotypes import DARTS_V1, DARTS_V2, genotype_to_dict, validate_aca_genotype, validate_genotype
from swinlab.nas.model_eval import FactorizedReduce, darts_cifar
from swinlab.nas.model_search import darts_search
from test_nas_tasks import KILL_STEP, KILLING, TESTS, _eval_recipe, _recipe, _rows, _same


def _batches(n: int = 2, size: int = 16, classes: int = 5, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=gen), torch.randint(0, classes, (4,), generator=gen))
            for _ in range(n)]  # fmt: skip


def _aca_v2(keep: float = 0.5) -> AcaGenotype:
    """DARTS_V2's cell without skip (skip edges become 3 x 3 separable convs), every edge keeping ``keep``."""
    swap = lambda pairs: [("sep_conv_3x3" if n == "skip_connect" else n, j, keep) for n, j in pairs]
    return AcaGenotype(swap(DARTS_V2.normal), [2, 3, 4, 5], swap(DARTS_V2.reduce), [2, 3, 4, 5])


# --- search space and derivation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["darts", "pc"])
def test_aca_genotype_never_contains_skip(variant):
    torch.manual_seed(0)
    net = darts_search(C=8, num_classes=5, layers=3, variant=variant, primitives="aca")
    assert net.primitives == ACA_PRIMITIVES and "skip_connect" not in ACA_PRIMITIVES
    scores = measure_importance(net, _batches(1))
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for a in net.arch_parameters():
                a.copy_(torch.randn(a.shape, generator=gen))
        g = derive_aca_genotype(net, scores)
        assert all(name not in ("skip_connect", "none") for name, _, _ in g.normal + g.reduce)
        assert all(0 < keep <= 1 for _, _, keep in g.normal + g.reduce)
        assert [(n, j) for n, j, _ in g.normal] == net.genotype().normal  # the super-net's own choice of edges
    with_skip = darts_search(C=8, num_classes=5, layers=3)
    with pytest.raises(ValueError, match="ACA searches without skip_connect"):
        derive_aca_genotype(with_skip, measure_importance(with_skip, _batches(1)))


def test_mass_and_alpha_allocation_on_hand_set_scores():
    scores = torch.tensor([1.0, 4.0, 2.0, 3.0])  # shares, strongest first: 0.4, 0.3, 0.2, 0.1
    mass = MassAllocation()
    assert mass.keep(scores, 0.7) == 0.5  # 0.4 + 0.3 reaches 0.7
    assert mass.keep(scores, 0.71) == 0.75
    assert mass.keep(scores, 1.0) == 1.0
    assert mass.keep(scores, 0.1) == 0.25  # at least one channel
    assert mass.keep(torch.zeros(4), 0.5) == 1.0  # nothing measured: keep everything
    assert AlphaAllocation().keep(scores, 0.625) == 0.625


def test_derive_aca_genotype_on_hand_set_alphas_and_scores():
    torch.manual_seed(0)
    net = darts_search(C=8, num_classes=5, layers=3, primitives="aca")
    scores = measure_importance(net, _batches(1))
    uniform = {kind: [[torch.ones(s.numel()) for s in cells] for cells in edges] for kind, edges in scores.items()}
    with torch.no_grad():
        for alphas in net.arch_parameters():
            alphas.zero_()
            alphas[:, 3] = 1.0  # sep_conv_3x3 strongest
            others = 5 + torch.e  # 'none' 0.76 of each edge: 0.24 left to the operations
            alphas[:, 0] = torch.log(torch.tensor(others * 0.76 / 0.24))
    g = derive_aca_genotype(net, uniform)
    # uniform importance: 2 of the normal cells' 8 channels carry 0.25 >= 0.24, 4 of the reduction cell's 16
    assert {keep for _, _, keep in g.normal + g.reduce} == {0.25}
    assert {name for name, _, _ in g.normal} == {"sep_conv_3x3"}
    alpha = derive_aca_genotype(net, uniform, AlphaAllocation())
    assert [keep for _, _, keep in alpha.normal] == pytest.approx([0.24] * 8)
    with pytest.raises(ValueError, match="channel importance of the normal cell: expected scores for 14 edges"):
        derive_aca_genotype(net, {"normal": uniform["normal"][:9], "reduce": uniform["reduce"]})


def test_magnitude_importance_is_the_mean_absolute_edge_output():
    torch.manual_seed(0)
    net = darts_search(C=4, num_classes=5, layers=3, primitives="aca")
    data = _batches(2)
    edge = net.cells[0]._ops[5]  # a normal cell's MixedOp
    seen = []
    hook = edge.register_forward_hook(lambda m, a, out: seen.append(out.detach().abs().mean((2, 3))))
    net.train()
    scores = measure_importance(net, data)
    hook.remove()
    assert net.training  # the mode is restored
    assert torch.allclose(scores["normal"][5][0], torch.cat(seen).mean(0).float())
    # 3 cells: one normal cell (4 channels), then two reduction cells (8, 16 channels)
    assert [len(cells) for cells in scores["normal"]] == [1] * 14 and [len(c) for c in scores["reduce"]] == [2] * 14
    assert [s.shape for s in scores["reduce"][0]] == [(8,), (16,)]


def test_taylor_importance_leaves_no_gradient_behind_and_differs_from_magnitude():
    torch.manual_seed(0)
    net = darts_search(C=4, num_classes=5, layers=3, primitives="aca")
    taylor = measure_importance(net, _batches(2), TaylorImportance())
    magnitude = measure_importance(net, _batches(2), MagnitudeImportance())
    assert all(p.grad is None for p in net.parameters()) and all(a.grad is None for a in net.arch_parameters())
    assert all(bool((s >= 0).all()) for cells in taylor["normal"] for s in cells)
    assert not torch.allclose(taylor["normal"][3][0], magnitude["normal"][3][0])
    assert measure_importance(net, _batches(3), max_batches=1)["normal"][0][0].equal(
        measure_importance(net, _batches(1))["normal"][0][0]
    )
    with pytest.raises(ValueError, match="at least one batch"):
        measure_importance(net, [])


# --- the evaluation edge and network --------------------------------------------------------------------------------


def test_kept_channels_rounds_and_keeps_an_even_remainder_on_reducing_edges():
    assert kept_channels(1.0, 36, False) == 36 and kept_channels(1.0, 36, True) == 36
    assert kept_channels(0.5, 36, False) == 18 and kept_channels(0.01, 36, False) == 1
    assert kept_channels(0.5 + 0.5 / 36, 36, False) == 19  # 18.5: halves up
    assert kept_channels(19 / 36, 36, True) == 20  # 19 leaves 17 for the FactorizedReduce: the nearer even one up
    assert kept_channels(0.01, 36, True) == 2


def test_identity_slice_is_bit_exact():
    torch.manual_seed(0)
    edge = AcaEdge("sep_conv_3x3", 8, 1, 3)
    x = torch.randn(2, 8, 6, 6)
    for drop_prob in (0.0, 0.5):  # drop path never touches the identity part
        out = edge(x, drop_prob)
        assert out.shape == x.shape and torch.equal(out[:, 3:], x[:, 3:])
        assert not torch.equal(out[:, :3], x[:, :3])
    reducing = AcaEdge("max_pool_3x3", 8, 2, 2)
    assert isinstance(reducing.rest, FactorizedReduce) and reducing(x).shape == (2, 8, 3, 3)
    with pytest.raises(ValueError, match=r"keeps 1\.\.7 of its 8 channels for its operation, got 8"):
        AcaEdge("sep_conv_3x3", 8, 1, 8)


def test_identity_slice_through_a_cell():
    """A node whose two edges keep 1 channel of C: the other channels of the node are the sum of its inputs."""
    g = AcaGenotype(
        [("sep_conv_3x3", 0, 0.125), ("dil_conv_3x3", 1, 0.125)] * 4,
        [2, 3, 4, 5],
        [("max_pool_3x3", 0, 0.25), ("max_pool_3x3", 1, 0.25)] * 4,
        [2, 3, 4, 5],
    )
    net = NetworkCIFAR(8, 10, 3, False, g)
    net.eval()
    cell = net.cells[0]
    s0, s1 = torch.randn(2, 24, 8, 8), torch.randn(2, 24, 8, 8)
    h0, h1 = cell.preprocess0(s0), cell.preprocess1(s1)
    out = cell(s0, s1, 0.0)
    assert torch.equal(out[:, 1:8], h0[:, 1:] + h1[:, 1:])  # node 0: first 8 output channels


@pytest.mark.parametrize("genotype", [DARTS_V2, DARTS_V1])
def test_all_kept_is_the_plain_network(genotype):
    torch.manual_seed(0)
    plain = NetworkCIFAR(8, 10, 5, True, genotype)
    aca = NetworkCIFAR(8, 10, 5, True, aca_from_plain(genotype))
    assert list(aca.state_dict()) == list(plain.state_dict())
    aca.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    plain.eval(), aca.eval()
    with torch.no_grad():
        assert torch.equal(aca(x)[0], plain(x)[0])
    plain.train(), aca.train()
    plain.drop_path_prob = aca.drop_path_prob = 0.3
    torch.manual_seed(3)
    logits, aux = plain(x)
    torch.manual_seed(3)
    logits_aca, aux_aca = aca(x)
    assert torch.equal(logits_aca, logits) and torch.equal(aux_aca, aux)
    # ImageNet too (the keys only: same modules)
    with torch.device("meta"):
        assert list(NetworkImageNet(8, 10, 3, False, aca_from_plain(genotype)).state_dict()) == list(
            NetworkImageNet(8, 10, 3, False, genotype).state_dict()
        )


def test_aca_network_is_smaller_and_trains():
    torch.manual_seed(0)
    aca = NetworkCIFAR(8, 10, 5, True, _aca_v2(0.5))
    full = NetworkCIFAR(8, 10, 5, True, _aca_v2(1.0))
    assert sum(p.numel() for p in aca.parameters()) < sum(p.numel() for p in full.parameters())
    assert isinstance(aca.cells[0]._ops[0], AcaEdge) and aca.cells[0]._ops[0].k == 4
    aca.drop_path_prob = 0.2
    logits, aux = aca(torch.randn(2, 3, 32, 32))
    (logits.sum() + aux.sum()).backward()
    assert all(p.grad is not None for n, p in aca.named_parameters() if "auxiliary" not in n)


def test_aca_on_top_of_pc_darts_end_to_end(tmp_path):
    torch.manual_seed(0)
    net = darts_search(C=8, num_classes=5, layers=3, variant="pc", primitives="aca")
    g = aca_genotype(net, _batches(2), importance="taylor", allocation="mass")
    # the mixed part of a normal edge is 8 / 4 = 2 channels wide: fractions are multiples of 1/2 per cell
    assert all(keep in (0.5, 0.75, 1.0) for _, _, keep in g.normal)
    save_genotype(g, tmp_path / "g.json")
    model = darts_cifar(str(tmp_path / "g.json"), C=8, num_classes=5, layers=3, auxiliary=False)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32))[0].shape == (2, 5)


# --- genotype JSON and its errors -----------------------------------------------------------------------------------


def test_aca_genotype_json_round_trip(tmp_path):
    g = _aca_v2(0.375)
    save_genotype(g, tmp_path / "g.json")
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["kind"] == "aca" and data["normal"][0] == ["sep_conv_3x3", 0, 0.375]
    assert load_aca_genotype(tmp_path / "g.json", ACA_PRIMITIVES) == validate_aca_genotype(g)
    assert read_genotype(tmp_path / "g.json") == g
    save_genotype(DARTS_V2, tmp_path / "p.json")
    assert read_genotype(tmp_path / "p.json") == validate_genotype(DARTS_V2)


def test_an_aca_genotype_loaded_as_plain_and_the_reverse(tmp_path):
    save_genotype(_aca_v2(), tmp_path / "aca.json")
    save_genotype(DARTS_V2, tmp_path / "plain.json")
    with pytest.raises(ValueError, match=r"holds an ACA genotype \(kind 'aca'\), not a plain.*load_aca_genotype"):
        load_genotype(tmp_path / "aca.json")
    with pytest.raises(ValueError, match=r"holds a plain DARTS genotype \(kind 'darts'\), not an ACA.*load_genotype"):
        load_aca_genotype(tmp_path / "plain.json")
    with pytest.raises(ValueError, match="expected a plain DARTS genotype, got an ACA genotype"):
        validate_genotype(_aca_v2())
    with pytest.raises(ValueError, match="expected an ACA genotype, got a plain DARTS genotype"):
        validate_aca_genotype(DARTS_V2)
    # ACA entries under no kind at all: the entry is named
    data = genotype_to_dict(_aca_v2())
    del data["kind"]
    (tmp_path / "bare.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"node 0 \(edge 0\): expected an \(operation, input\) pair.*load_aca_genotype"
    ):
        load_genotype(tmp_path / "bare.json")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["normal"][3].__setitem__(2, 0.0), r"normal cell, node 1 \(edge 3\): keep 0.0 must be .* \(0, 1\]"),
        (lambda d: d["reduce"][0].__setitem__(2, 1.5), r"reduce cell, node 0 \(edge 0\): keep 1.5"),
        (lambda d: d["normal"][2].__setitem__(2, True), "keep True"),
        (lambda d: d["normal"][1].pop(), r"edge 1\): expected an \(operation, input, keep\) triple"),
        (lambda d: d["normal"][4].__setitem__(0, "sep_conv_3x4"), r"unknown operation 'sep_conv_3x4'"),
        (lambda d: d["reduce"][7].__setitem__(1, 6), r"reduce cell, node 3 \(edge 7\): input 6 out of range"),
        (lambda d: d.__setitem__("kind", "nasnet"), "unknown genotype kind 'nasnet'"),
    ],
)
def test_aca_genotype_json_errors(tmp_path, edit, message):
    data = genotype_to_dict(_aca_v2())
    edit(data)
    (tmp_path / "g.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_aca_genotype(tmp_path / "g.json")


def test_aca_genotype_from_another_search_space(tmp_path):
    save_genotype(aca_from_plain(DARTS_V2), tmp_path / "g.json")  # valid, but searched with skip
    load_aca_genotype(tmp_path / "g.json")
    with pytest.raises(ValueError, match=r"normal cell, node 2 \(edge 5\): unknown operation 'skip_connect'"):
        load_aca_genotype(tmp_path / "g.json", ACA_PRIMITIVES)


def test_eval_network_refuses_a_bad_aca_genotype():
    bad = _aca_v2()._replace(normal=[("sep_conv_3x3", 0, 0.5), ("sep_conv_3x3", 3, 0.5), *_aca_v2().normal[2:]])
    with pytest.raises(ValueError, match=r"normal cell, node 0 \(edge 1\): input 3 out of range"):
        NetworkCIFAR(8, 10, 3, False, bad)
    assert isinstance(NetworkCIFAR(8, 10, 3, False, _aca_v2()).cells[0]._ops[0].rest, nn.Identity)


# --- through the engine -----------------------------------------------------------------------------------------------


def test_aca_search_writes_an_aca_genotype_and_the_eval_task_trains_it(tmp_path):
    run = tmp_path / "search"
    settings = {"epochs": 2, "task.aca": True, "task.aca_importance": "taylor", "task.aca_batches": 2,
                "model.kwargs": "{C: 4, layers: 3, primitives: aca}"}  # fmt: skip
    assert cli_main(["train", str(_recipe(tmp_path / "s.yaml", run, **settings))]) == 0
    g = load_aca_genotype(run / "genotype_aca.json", ACA_PRIMITIVES)
    assert (run / "genotype_aca.json").read_text() == (run / "genotype_aca_epoch2.json").read_text()
    assert [(n, j) for n, j, _ in g.normal] == load_genotype(run / "genotype.json").normal
    assert (run / "cells_aca.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((run / "alphas.json").read_text())
    assert [r["aca_genotype"]["kind"] for r in history] == ["aca", "aca"]
    assert len(history[0]["normal"][0]) == 7  # α over the 7 operations without skip
    evaluation = tmp_path / "eval"
    assert cli_main(["train", str(_eval_recipe(tmp_path / "e.yaml", evaluation, str(run / "genotype_aca.json")))]) == 0
    state = torch.load(evaluation / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]
    reference = NetworkCIFAR(2, 10, 3, True, g, in_chans=1).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}


def test_aca_search_refuses_skip_in_the_search_space_and_unknown_strategies(tmp_path, capsys):
    recipe = _recipe(tmp_path / "s.yaml", tmp_path / "run", **{"task.aca": True})
    assert cli_main(["train", str(recipe)]) != 0
    assert "task.aca searches without skip_connect: set model.kwargs.primitives: aca" in capsys.readouterr().err
    recipe = _recipe(tmp_path / "t.yaml", tmp_path / "run2", **{"task.aca_importance": "fisher"})
    assert cli_main(["train", str(recipe)]) != 0
    assert "unknown channel importance 'fisher'; known: magnitude, taylor" in capsys.readouterr().err


@pytest.mark.slow
def test_aca_on_pc_darts_search_killed_mid_epoch_resumes_bit_exactly(tmp_path):
    settings = {"task.name": KILLING, "task.aca": True, "data.train_limit": 16,
                "model.kwargs": "{C: 4, layers: 3, primitives: aca, variant: pc}"}  # fmt: skip
    assert cli_main(["train", str(_recipe(tmp_path / "full.yaml", tmp_path / "full", **settings))]) == 0
    killed = _recipe(tmp_path / "killed.yaml", tmp_path / "killed", **settings)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "NAS_KILL_AT_STEP": str(KILL_STEP)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "swinlab", "train", str(killed)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert cli_main(["train", str(killed)]) == 0
    assert _rows(tmp_path / "full") == _rows(tmp_path / "killed")
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("full", "killed"))
    for key in ("model", "optimizers", "task", "step"):
        _same(a[key], b[key], key)
    assert a["model"]["betas_normal"].shape == (14,)
    for name in ("alphas.json", "genotype_aca.json", "genotype_aca_epoch2.json"):
        assert (tmp_path / "full" / name).read_text() == (tmp_path / "killed" / name).read_text()
