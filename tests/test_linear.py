"""swinlab.layers.Linear: the oneDNN path computes nn.Linear's function and gradients, and falls back where it
must."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swinlab.layers.linear as linear_module
from swinlab.layers import Linear
from swinlab.layers.linear import linear
from swinlab.metrics import relative_l2_error

pytestmark = pytest.mark.skipif(not linear_module.ONEDNN_AVAILABLE, reason="this torch build has no oneDNN linear")


@pytest.fixture(autouse=True, params=[True, False], ids=["onednn_wgrad", "mkl_wgrad"])
def onednn_on(monkeypatch, request):
    """The oneDNN path under test whatever this CPU's default, with the weight gradient on either backend."""
    monkeypatch.setattr(linear_module, "ONEDNN_LINEAR", True)
    monkeypatch.setattr(linear_module, "ONEDNN_WEIGHT_GRAD", request.param)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return relative_l2_error(a.double(), b.double())


@pytest.mark.parametrize("shape", [(37, 24), (3, 5, 24), (2, 3, 4, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [5, 200])  # the weight-gradient GEMM picks its operand order by row count
def test_values_and_gradients_match_float64_reference(shape, bias, rows):
    torch.manual_seed(0)
    layer = Linear(24, rows, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(*shape[:-1], rows)
    out = layer(x)
    out.backward(dy)
    ref = layer.double()
    x64 = x.detach().double().requires_grad_()
    for p in ref.parameters():
        p.grad = None
    ref_out = F.linear(x64, ref.weight, ref.bias)
    ref_out.backward(dy.double())
    assert out.shape == ref_out.shape and out.dtype == torch.float32
    assert rel(out, ref_out) < 1e-6
    assert rel(x.grad, x64.grad) < 1e-6
    layer32 = Linear(24, rows, bias=bias)
    layer32.load_state_dict(layer.float().state_dict())
    out32 = layer32(x.detach())
    out32.backward(dy)
    assert rel(layer32.weight.grad, ref.weight.grad) < 1e-6
    if bias:
        assert rel(layer32.bias.grad, ref.bias.grad) < 1e-6


def test_in_place_update_of_the_output_keeps_gradients_right():
    """The V2 attention adds its q/v bias in place on the projection output."""
    torch.manual_seed(0)
    layer, plain = Linear(8, 6, bias=False), nn.Linear(8, 6, bias=False)
    plain.load_state_dict(layer.state_dict())
    extra = torch.randn(6, requires_grad=True)
    x = torch.randn(4, 8)
    grads = []
    for module in (layer, plain):
        extra.grad = None
        y = module(x)
        y += extra
        (y * torch.arange(6.0)).sum().backward()
        grads.append((module.weight.grad.clone(), extra.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_output_of_an_nd_input_is_not_an_autograd_view():
    """An in-place add on the N-D output (the V2 q/v bias) must not become a CopySlices of the 2D product, whose
    backward clones the whole gradient twice."""
    layer = Linear(8, 6, bias=False)
    y = layer(torch.randn(2, 3, 4, 8))
    y += torch.randn(6, requires_grad=True)
    assert y.grad_fn.name() == "AddBackward0"
    assert not y._is_view()


def test_state_dict_and_init_are_nn_linears():
    layer = Linear(4, 3)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    nn.Linear(4, 3).load_state_dict(layer.state_dict())


def test_falls_back_where_onednn_does_not_apply(monkeypatch):
    calls = []
    real = linear_module._onednn
    monkeypatch.setattr(linear_module, "_onednn", lambda *a: calls.append(1) or real(*a))
    w, b = torch.randn(3, 4), torch.randn(3)
    linear(torch.randn(2, 4), w, b)
    assert calls, "the fp32 CPU case must take the oneDNN path"
    calls.clear()
    linear(torch.randn(4), w, b)  # 1D input
    linear(torch.randn(0, 4), w, b)  # empty
    linear(torch.randn(2, 4).double(), w.double(), b.double())  # not fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(torch.randn(2, 4), w, b).dtype == torch.bfloat16  # autocast semantics kept
    monkeypatch.setattr(linear_module, "ONEDNN_LINEAR", False)
    linear(torch.randn(2, 4), w, b)
    assert not calls


def test_wrong_feature_count_raises_torchs_error():
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        linear(torch.randn(2, 5), torch.randn(3, 4))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_linear_gelu_fused_inference_equals_gelu_of_linear(approximate):
    from swinlab.layers.linear import linear_gelu

    torch.manual_seed(0)
    x, w, b = torch.randn(2, 7, 16), torch.randn(32, 16), torch.randn(32)
    ref = F.gelu(F.linear(x.double(), w.double(), b.double()), approximate=approximate)
    with torch.no_grad():
        fused = linear_gelu(x, w, b, approximate)
    assert fused.shape == ref.shape and rel(fused, ref) < 1e-6
    x.requires_grad_()
    out = linear_gelu(x, w, b, approximate)  # with autograd: linear then GELU, differentiable
    out.sum().backward()
    assert rel(out, ref) < 1e-6 and x.grad is not None


def test_backend_policy_follows_the_measurements_per_cpu_vendor():
    assert linear_module.onednn_policy("auto", "GenuineIntel", "AVX512") == (False, False)  # MKL wins on Intel
    assert linear_module.onednn_policy("auto", "AuthenticAMD", "AVX512", 26) == (True, True)  # Zen 5
    assert linear_module.onednn_policy("auto", "AuthenticAMD", "AVX512", 25) == (True, False)  # Zen 4: 256-bit units
    assert linear_module.onednn_policy("auto", "AuthenticAMD", "AVX2", 23) == (True, False)  # wgrad faster on MKL
    assert linear_module.onednn_policy("1", "GenuineIntel", "AVX2") == (True, True)
    assert linear_module.onednn_policy("0", "AuthenticAMD", "AVX512") == (False, False)
    assert linear_module.cpu_vendor()  # read from this machine
    assert linear_module.cpu_family() >= 0


def _node(out: torch.Tensor) -> str:
    """Name of the autograd node under the output's reshape."""
    return type(out.grad_fn.next_functions[0][0]).__name__


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize(("approximate", "bias"), [("none", True), ("tanh", True), ("none", False)])
def test_mlp_node_equals_the_plain_layers_bit_for_bit(monkeypatch, onednn, approximate, bias):
    """The MLP's own backward (GELU's derivative in place on the hidden gradient) changes no bit of any result."""
    from swinlab.layers import mlp as mlp_module

    monkeypatch.setattr(linear_module, "ONEDNN_LINEAR", onednn and linear_module.ONEDNN_AVAILABLE)
    torch.manual_seed(0)
    mlp = mlp_module.Mlp(24, 96)
    mlp.act.approximate = approximate
    if not bias:
        mlp.fc1.bias = None
    x = torch.randn(2, 5, 7, 24, requires_grad=True)
    out = mlp(x)
    assert _node(out) == "_GeluMlpBackward"  # the fused node was taken
    g = torch.randn_like(out)
    out.backward(g)
    fused = [x.grad.clone(), *(p.grad.clone() for p in mlp.parameters())]
    x.grad = None
    mlp.zero_grad()
    plain = mlp.fc2(F.gelu(mlp.fc1(x), approximate=approximate))
    plain.backward(g)
    assert torch.equal(out, plain)
    for a, b in zip(fused, [x.grad, *(p.grad for p in mlp.parameters())], strict=True):
        assert torch.equal(a, b)


def test_mlp_keeps_the_plain_layers_for_dropout_and_autocast():
    from swinlab.layers.mlp import Mlp

    mlp = Mlp(8, 16, drop=0.5).train()
    x = torch.randn(3, 8, requires_grad=True)
    assert _node(mlp(x)) != "_GeluMlpBackward"
    mlp.eval()  # dropout off: the fused node
    assert _node(mlp(x)) == "_GeluMlpBackward"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mlp.train()(x).dtype == torch.bfloat16
