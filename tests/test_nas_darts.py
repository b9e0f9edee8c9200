"""DARTS (swinlab.nas): contract numbers, genotypes, and parity with the official code (quark0/darts, patched only
to run on a CPU) where ../shared/reference/darts_official is present."""

from __future__ import annotations

import importlib
import json
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call

from swinlab.nas import (
    PRIMITIVES,
    Architect,
    Genotype,
    Network,
    NetworkCIFAR,
    NetworkImageNet,
    SearchNetwork,
    derive_genotype,
    genotypes,
    load_genotype,
    save_genotype,
    use_fast_convolutions,
)
from swinlab.nas.genotypes import DARTS_V2, PUBLISHED, genotype_from_dict, validate_genotype

DARTS_OFFICIAL = Path(
    os.environ.get(
        "SWINLAB_DARTS_OFFICIAL", Path(__file__).resolve().parents[2] / "shared" / "reference" / "darts_official"
    )
)
_OFFICIAL_MODULES = ("genotypes", "operations", "utils", "model", "model_search", "architect")


@pytest.fixture(scope="module")
def official() -> SimpleNamespace:
    """The official modules, imported from their folder under their flat names and then taken out of
    ``sys.modules`` again (their names are generic); torchvision gets an empty stand-in when absent."""
    if not DARTS_OFFICIAL.is_dir():
        pytest.skip(f"official DARTS code not found at {DARTS_OFFICIAL} (it lives in shared/reference)")
    names = (*_OFFICIAL_MODULES, "torchvision", "torchvision.transforms")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    if importlib.util.find_spec("torchvision") is None:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.update({"torchvision": stub, "torchvision.transforms": stub.transforms})
    sys.path.insert(0, str(DARTS_OFFICIAL))
    try:
        return SimpleNamespace(**{n: importlib.import_module(n) for n in _OFFICIAL_MODULES})
    finally:
        sys.path.remove(str(DARTS_OFFICIAL))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode parity checks more than the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0, 0.1, generator=gen)


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "auxiliary" not in n)


# --- contract numbers -------------------------------------------------------------------------------------------


def test_parameter_counts_of_the_published_networks():
    with torch.device("meta"):
        assert _param_count(NetworkCIFAR(36, 10, 20, True, genotypes.DARTS_V2)) == 3_349_342
        assert _param_count(NetworkImageNet(48, 1000, 14, True, genotypes.DARTS_V2)) == 4_718_752


def test_contract_names():
    import swinlab.nas as nas

    assert nas.genotypes.DARTS is nas.genotypes.DARTS_V2
    assert isinstance(nas.genotypes.DARTS_V2, nas.Genotype)
    assert Genotype._fields == ("normal", "normal_concat", "reduce", "reduce_concat")
    model = SearchNetwork(4, 10, 3)
    assert [tuple(a.shape) for a in model.arch_parameters()] == [(14, 8), (14, 8)]
    assert all(a.is_leaf and a.requires_grad for a in model.arch_parameters())
    assert not {id(a) for a in model.arch_parameters()} & {id(p) for p in model.parameters()}


def test_registered_models():
    from swinlab import create_model

    model = create_model("darts_v2_cifar", C=4, layers=3, auxiliary=False)
    model.eval()
    logits, aux = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and aux is None


# --- genotypes ----------------------------------------------------------------------------------------------------


def _alphas(rows: dict[int, dict[str, float]], steps: int = 4) -> torch.Tensor:
    """α = log p with the given operation probabilities per edge, the rest of each edge's mass spread evenly."""
    a = torch.zeros(sum(2 + i for i in range(steps)), len(PRIMITIVES))
    for edge, probs in rows.items():
        rest = (1 - sum(probs.values())) / (len(PRIMITIVES) - len(probs))
        a[edge] = torch.tensor([probs.get(name, rest) for name in PRIMITIVES]).log()
    return a


def test_genotype_derivation_on_hand_set_alphas():
    # Edges: node 0 reads edges 0, 1; node 1 edges 2-4; node 2 edges 5-8; node 3 edges 9-13 (inputs 0, 1, ...).
    normal = _alphas(
        {
            0: {"none": 0.9, "sep_conv_3x3": 0.06},  # 'none' counts neither for the edge nor for the op
            1: {"max_pool_3x3": 0.5},
            2: {"dil_conv_5x5": 0.4, "skip_connect": 0.4},  # tied ops: the earlier primitive
            3: {"avg_pool_3x3": 0.3},
            4: {"sep_conv_5x5": 0.6},
            7: {"dil_conv_3x3": 0.5},
            8: {"dil_conv_3x3": 0.5},  # tied edges: the lower input first
            9: {"max_pool_3x3": 0.3},
            13: {"sep_conv_3x3": 0.7},
        }
    )
    reduce = _alphas({e: {"avg_pool_3x3": 0.2 + 0.05 * e} for e in range(14)})
    g = derive_genotype(normal, reduce)
    assert g.normal == [
        ("max_pool_3x3", 1),
        ("sep_conv_3x3", 0),
        ("sep_conv_5x5", 2),
        ("skip_connect", 0),
        ("dil_conv_3x3", 2),
        ("dil_conv_3x3", 3),
        ("sep_conv_3x3", 4),
        ("max_pool_3x3", 0),
    ]
    # The strongest edges are the latest inputs, strongest first.
    assert g.reduce == [("avg_pool_3x3", j) for j in (1, 0, 2, 1, 3, 2, 4, 3)]
    assert g.normal_concat == g.reduce_concat == [2, 3, 4, 5]
    assert derive_genotype(normal, reduce, multiplier=2).normal_concat == [4, 5]


def test_genotype_alpha_shape_errors():
    good = torch.zeros(14, 8)
    with pytest.raises(ValueError, match=r"alphas_reduce has shape \(14, 7\), the cell needs \(14, 8\)"):
        derive_genotype(good, torch.zeros(14, 7))
    with pytest.raises(ValueError, match=r"alphas_normal has shape \(14, 8\), the cell needs \(9, 8\)"):
        derive_genotype(good, good, steps=3)
    with pytest.raises(ValueError, match="no operation other than 'none'"):
        derive_genotype(torch.zeros(14, 1), torch.zeros(14, 1), primitives=["none"])
    model = SearchNetwork(4, 10, 3)
    state = {**model.state_dict(), "alphas_normal": torch.zeros(14, 7)}
    with pytest.raises(RuntimeError, match="alphas_normal"):
        model.load_state_dict(state)


def test_search_network_genotype_uses_its_search_space():
    space = [p for p in PRIMITIVES if p != "skip_connect"]
    model = SearchNetwork(4, 10, 3, primitives=space)
    assert model.alphas_normal.shape == (14, 7)
    g = model.genotype()
    validate_genotype(g, space)
    assert all(name in space and name != "none" for name, _ in g.normal + g.reduce)


def test_genotype_json_round_trip(tmp_path):
    for name, g in PUBLISHED.items():
        path = tmp_path / f"{name}.json"
        save_genotype(g, path)
        assert load_genotype(path) == validate_genotype(g)
    assert json.loads((tmp_path / "DARTS_V2.json").read_text())["kind"] == "darts"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["normal"][5].__setitem__(0, "sep_conv_9x9"), r"normal cell, node 2 \(edge 5\): unknown operation"),
        (lambda d: d["reduce"][6].__setitem__(1, 5), r"reduce cell, node 3 \(edge 6\): input 5 out of range.*0\.\.4"),
        (lambda d: d["normal"][0].__setitem__(1, -1), r"node 0 \(edge 0\): input -1 out of range"),
        (lambda d: d["normal"].pop(), "even, non-zero number"),
        (lambda d: d["reduce_concat"].append(6), r"reduce_concat: state 6 out of range 0\.\.5"),
        (lambda d: d.__setitem__("kind", "aca"), "not a plain DARTS genotype"),
        (lambda d: d.pop("reduce"), r"missing fields \['reduce'\]"),
    ],
)
def test_genotype_json_errors(tmp_path, edit, message):
    data = genotypes.genotype_to_dict(DARTS_V2)
    edit(data)
    (tmp_path / "g.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        load_genotype(tmp_path / "g.json")


def test_genotype_from_another_search_space():
    space = [p for p in PRIMITIVES if p != "skip_connect"]
    with pytest.raises(ValueError, match=r"normal cell, node 2 \(edge 5\): unknown operation 'skip_connect'"):
        genotype_from_dict(genotypes.genotype_to_dict(DARTS_V2), primitives=space)


def test_eval_network_rejects_a_bad_genotype():
    bad = DARTS_V2._replace(normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 2), *DARTS_V2.normal[2:]])
    with pytest.raises(ValueError, match=r"normal cell, node 0 \(edge 1\): input 2 out of range"):
        NetworkCIFAR(4, 10, 3, False, bad)


# --- search network: α in the state dict, official weights load strictly ---------------------------------------------


def test_search_state_dict_keeps_alphas_and_official_weights_load():
    model = SearchNetwork(4, 10, 3)
    other = SearchNetwork(4, 10, 3)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.alphas_normal, model.alphas_normal)
    weights_only = {k: v for k, v in model.state_dict().items() if not k.startswith("alphas")}
    before = other.alphas_reduce.detach().clone()
    with torch.no_grad():
        other.alphas_reduce.add_(1.0)
    other.load_state_dict(weights_only, strict=True)  # no α in it: α kept
    assert torch.equal(other.alphas_reduce, before + 1.0)
    other.double()
    assert all(a.is_leaf and a.requires_grad and a.dtype == torch.float64 for a in other.arch_parameters())


def test_factorized_reduce_refuses_odd_sizes():
    from swinlab.nas.operations import FactorizedReduce

    with pytest.raises(ValueError, match=r"even height and width, got \(7, 8\)"):
        FactorizedReduce(4, 4)(torch.randn(1, 4, 7, 8))


# --- second order against exact autograd on a smooth toy ------------------------------------------------------------


class _SmoothToy(nn.Module):
    """A mixture of three smooth branches weighted by softmax(α) (no kinks, no BN): the finite-difference Hessian-vector
    product must converge to the exact one."""

    def __init__(self) -> None:
        super().__init__()
        f64 = {"dtype": torch.float64}
        self.a, self.b, self.c = nn.Linear(5, 4, **f64), nn.Linear(5, 4, **f64), nn.Linear(5, 4, **f64)
        self.head = nn.Linear(4, 3, **f64)
        self.register_buffer("alphas", torch.randn(2, 3, **f64).requires_grad_())

    def arch_parameters(self) -> list[torch.Tensor]:
        return [self.alphas]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.alphas, -1)
        h = w[0, 0] * torch.tanh(self.a(x)) + w[0, 1] * torch.sigmoid(self.b(x)) + w[0, 2] * self.c(x)
        return self.head(h * w[1].sum() + w[1, 0] * h.pow(2))

    def _loss(self, x, y, state=None):
        logits = self(x) if state is None else functional_call(self, state, (x,))
        return nn.functional.cross_entropy(logits, y)


def test_second_order_matches_exact_unrolled_autograd():
    torch.manual_seed(1)
    model = _SmoothToy()
    xt, yt, xv, yv = (
        torch.randn(8, 5).double(),
        torch.randint(0, 3, (8,)),
        torch.randn(8, 5).double(),
        torch.randint(0, 3, (8,)),
    )
    momentum, wd, eta = 0.9, 3e-4, 0.5
    sgd = torch.optim.SGD(model.parameters(), lr=eta, momentum=momentum, weight_decay=wd)
    model._loss(xt, yt).backward()
    sgd.step()  # momentum buffers exist now
    names, weights = zip(*model.named_parameters(), strict=True)
    # Exact: differentiate L_val(w'(α), α) through the unrolled step.
    g = torch.autograd.grad(model._loss(xt, yt), weights, create_graph=True)
    unrolled = [
        w - eta * (momentum * sgd.state[w]["momentum_buffer"] + gi + wd * w) for w, gi in zip(weights, g, strict=True)
    ]
    (exact,) = torch.autograd.grad(model._loss(xv, yv, dict(zip(names, unrolled, strict=True))), model.alphas)
    frozen = dict(zip(names, [u.detach() for u in unrolled], strict=True))
    (first,) = torch.autograd.grad(model._loss(xv, yv, frozen), model.alphas)  # w' held fixed
    assert (exact - first).abs().max() > 1e-3  # the second-order term matters here
    for r, tol in ((1e-2, 2e-6), (1e-4, 1e-9)):  # truncation error ~ r²
        arch = Architect(
            model, momentum=momentum, weight_decay=wd, arch_learning_rate=3e-4, arch_weight_decay=1e-3, r=r
        )
        (approx,) = arch.alpha_grads(xt, yt, xv, yv, eta, sgd, unrolled=True)
        assert torch.allclose(approx, exact, rtol=0, atol=tol), (r, (approx - exact).abs().max())


# --- parity with the official code -----------------------------------------------------------------------------------

_official_warnings = pytest.mark.filterwarnings("ignore::UserWarning")  # its deprecated add_(scalar, tensor) calls


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    ("name", "layers"), [("DARTS_V2", 3), ("DARTS_V2", 5), ("DARTS_V1", 5), ("NASNet", 4), ("AmoebaNet", 5)]
)
def test_eval_network_matches_official_cifar(official, name, layers):
    ref = official.model.NetworkCIFAR(4, 10, layers, True, getattr(official.genotypes, name))
    _randomize_bn(ref, torch.Generator().manual_seed(1))
    ours = NetworkCIFAR(4, 10, layers, True, getattr(genotypes, name))
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same keys in the same order
    x = torch.randn(3, 3, 32, 32)
    ref.drop_path_prob = ours.drop_path_prob = 0.3
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert _max_diff(ours(x)[0], ref(x)[0]) < 1e-5
    # Training: same drop-path masks from the same stream, auxiliary logits (layers=3: the auxiliary cell is the last).
    ref.train(), ours.train()
    torch.manual_seed(7)
    logits_ref, aux_ref = ref(x)
    torch.manual_seed(7)
    logits, aux = ours(x)
    assert _max_diff(logits, logits_ref) < 1e-5 and _max_diff(aux, aux_ref) < 1e-5


def test_eval_network_matches_official_imagenet(official):
    ref = official.model.NetworkImageNet(8, 10, 3, True, official.genotypes.DARTS_V2)
    _randomize_bn(ref, torch.Generator().manual_seed(1))
    ours = NetworkImageNet(8, 10, 3, True, genotypes.DARTS_V2)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    ref.drop_path_prob = ours.drop_path_prob = 0.2
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert _max_diff(ours(x)[0], ref(x)[0]) < 1e-5
    ref.train(), ours.train()
    torch.manual_seed(3)
    logits_ref, aux_ref = ref(x)
    torch.manual_seed(3)
    logits, aux = ours(x)
    assert _max_diff(logits, logits_ref) < 1e-5 and _max_diff(aux, aux_ref) < 1e-5


def _search_twins(official, seed: int = 0, layers: int = 4) -> tuple[nn.Module, SearchNetwork]:
    """The official search network and ours with the same weights, BN statistics and α."""
    torch.manual_seed(seed)
    ref = official.model_search.Network(4, 5, layers, nn.CrossEntropyLoss())
    ours = Network(4, 5, layers, nn.CrossEntropyLoss())
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        for a, b in zip(ours.arch_parameters(), ref.arch_parameters(), strict=True):
            a.copy_(b)
    return ref, ours


def test_search_network_matches_official(official):
    ref, ours = _search_twins(official)
    assert list(ours.state_dict()) == ["alphas_normal", "alphas_reduce", *ref.state_dict()]
    x = torch.randn(4, 3, 16, 16)
    assert _max_diff(ours(x), ref(x)) < 1e-5
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for a, b in zip(ours.arch_parameters(), ref.arch_parameters(), strict=True):
                b.copy_(torch.randn(b.shape, generator=gen) * (0.5 if seed % 2 else 1e-3))
                a.copy_(b)
        g_ref, g = ref.genotype(), ours.genotype()
        assert g.normal == g_ref.normal and g.reduce == g_ref.reduce, seed
        assert g.normal_concat == list(g_ref.normal_concat) and g.reduce_concat == list(g_ref.reduce_concat)


_ARGS = {"momentum": 0.9, "weight_decay": 3e-4, "arch_learning_rate": 3e-4, "arch_weight_decay": 1e-3}


def _architect_twins(official, unrolled_batch: int = 4):
    """Twins after one identical weight step (so the SGD momentum buffers exist), with their optimizers,
    architects and a training and a validation batch."""
    ref, ours = _search_twins(official)
    sgd = lambda m: torch.optim.SGD(
        m.parameters(), 0.025, momentum=_ARGS["momentum"], weight_decay=_ARGS["weight_decay"]
    )
    opt_ref, opt = sgd(ref), sgd(ours)
    gen = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(unrolled_batch, 3, 8, 8, generator=gen), torch.randint(0, 5, (unrolled_batch,), generator=gen))
        for _ in range(3)
    ]
    ref._loss(*batches[0]).backward()
    opt_ref.step()
    ours.load_state_dict(ref.state_dict(), strict=True)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        opt.state[p]["momentum_buffer"] = opt_ref.state[q]["momentum_buffer"].clone()
    arch_ref = official.architect.Architect(ref, SimpleNamespace(**_ARGS))
    arch = Architect(ours, **_ARGS)
    return ref, ours, opt_ref, opt, arch_ref, arch, batches[1], batches[2]


def _second_order_alpha_grads(official, dtype: torch.dtype = torch.float32, fast: bool = False) -> torch.Tensor:
    """Our second-order α gradient from :func:`_architect_twins`' state, in ``dtype``, optionally with
    :func:`use_fast_convolutions`; flattened."""
    _, ours, _, opt, _, arch, (xt, yt), (xv, yv) = _architect_twins(official)
    if fast:
        use_fast_convolutions(ours)
    ours.to(dtype)
    for state in opt.state.values():
        state["momentum_buffer"] = state["momentum_buffer"].to(dtype)
    grads = arch.alpha_grads(xt.to(dtype), yt, xv.to(dtype), yv, 0.025, opt, unrolled=True)
    return torch.cat([g.reshape(-1) for g in grads]).double()


@_official_warnings
def test_fast_convolutions_keep_the_second_order_as_close_to_float64_as_official(official):
    """The opt-in convolutions sum in another order, which the finite difference amplifies; they must stay as close to
    the same algorithm in float64 as the official fp32 result is (x2: one state, heavy-tailed errors; the benchmark's
    gate averages six)."""
    ref, _, _, opt_ref, arch_ref, _, (xt, yt), (xv, yv) = _architect_twins(official)
    arch_ref.optimizer.zero_grad()
    arch_ref._backward_step_unrolled(xt, yt, xv, yv, 0.025, opt_ref)
    official_grads = torch.cat([a.grad.reshape(-1) for a in ref.arch_parameters()]).double()
    exact = _second_order_alpha_grads(official, torch.float64)
    fast = _second_order_alpha_grads(official, fast=True)
    official_err = (official_grads - exact).abs().max().item()
    assert 0 < (fast - exact).abs().max().item() <= 2 * official_err
    assert (fast - official_grads).abs().max().item() > 0  # the fast path really runs other kernels


@_official_warnings
@pytest.mark.parametrize("unrolled", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_architect_alpha_grads_match_official(official, unrolled, training):
    """In eval mode too: the official unrolled copy is a new model, in training mode whatever the model's."""
    ref, ours, opt_ref, opt, arch_ref, arch, (xt, yt), (xv, yv) = _architect_twins(official)
    ref.train(training), ours.train(training)
    eta = 0.025
    grads = arch.alpha_grads(xt, yt, xv, yv, eta, opt, unrolled)
    arch_ref.optimizer.zero_grad()
    if unrolled:
        arch_ref._backward_step_unrolled(xt, yt, xv, yv, eta, opt_ref)
    else:
        arch_ref._backward_step(xv, yv)
    tol = 2e-6 if unrolled else 2e-7
    for g, a in zip(grads, ref.arch_parameters(), strict=True):
        assert _max_diff(g, a.grad) < tol
    # BN statistics moved as officially (the unrolled pass on copies only).
    state = ours.state_dict()
    for name, b_ref in ref.state_dict().items():
        assert _max_diff(state[name].float(), b_ref.float()) < 1e-6, name
    if unrolled:  # the implicit term is large here, so a wrong one would show
        first = arch.alpha_grads(xt, yt, xv, yv, eta, opt, unrolled=False)
        assert max(_max_diff(g, f) for g, f in zip(grads, first, strict=True)) > 0.1


@_official_warnings
@pytest.mark.parametrize("unrolled", [False, True])
def test_architect_step_matches_official(official, unrolled):
    ref, ours, opt_ref, opt, arch_ref, arch, (xt, yt), (xv, yv) = _architect_twins(official)
    for _ in range(2):  # the second step also checks Adam's state
        arch.step(xt, yt, xv, yv, 0.025, opt, unrolled)
        arch_ref.step(xt, yt, xv, yv, 0.025, opt_ref, unrolled)
    for a, a_ref in zip(ours.arch_parameters(), ref.arch_parameters(), strict=True):
        assert _max_diff(a, a_ref) < 1e-6
    for p, p_ref in zip(ours.parameters(), ref.parameters(), strict=True):
        assert _max_diff(p, p_ref) < 1e-6  # the official perturbation leaves only round-off on the weights


def test_darts_networks_are_in_the_registry_after_importing_swinlab():
    import subprocess
    import sys

    code = "import swinlab; print(swinlab.list_models('darts*'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "darts_v2_cifar" in out and "darts_v2_imagenet" in out
