"""GMConv2d: plain-conv equivalence, the mask, sigma gradients, fusion, dynamic variant, conversion, errors."""

import math

import pytest
import torch
from torch import nn

from swinlab.engine import param_groups
from swinlab.layers import GMConv2d, conv2d_factory, convert_to_gmconv, fuse_gmconv

VARIANTS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, groups=4, padding="same"),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=(1, 3), stride=(1, 2)),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=5, padding=2, padding_mode="circular"),
]


def _pair(**kwargs) -> tuple[nn.Conv2d, GMConv2d]:
    conv = nn.Conv2d(**kwargs)
    return conv, GMConv2d.from_conv(conv)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_sigma_to_infinity_and_disabled_mask_equal_plain_conv(kwargs):
    conv, gm = _pair(**kwargs)
    x = torch.randn(2, 4, 9, 10)
    with torch.no_grad():
        gm.log_sigma.fill_(30.0)  # sigma ~ 1e13: every mask entry rounds to exactly 1
    torch.testing.assert_close(gm(x), conv(x), atol=1e-6, rtol=0)
    gm.mask_enabled = False
    torch.testing.assert_close(gm(x), conv(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_masked_conv_is_plain_conv_with_masked_weight(kwargs):
    conv, gm = _pair(**kwargs)
    x = torch.randn(2, 4, 9, 10)
    plain_out = conv(x)
    with torch.no_grad():
        conv.weight.mul_(gm.gaussian_mask())
    torch.testing.assert_close(gm(x), conv(x))
    assert not torch.allclose(gm(x), plain_out)


def test_mask_formula_and_default_sigma():
    gm = GMConv2d(2, 3, 3)
    assert gm.sigma_init == (1.5,)
    mask = gm.gaussian_mask().detach()
    assert mask.shape == (3, 1, 3, 3)
    assert mask[0, 0, 1, 1] == 1.0
    assert math.isclose(float(mask[0, 0, 0, 0]), math.exp(-2 / (2 * 1.5**2)), rel_tol=1e-6)
    assert math.isclose(float(mask[0, 0, 0, 1]), math.exp(-1 / (2 * 1.5**2)), rel_tol=1e-6)


def test_mask_first_built_in_inference_mode_still_trains():
    from swinlab.layers.gmconv import _cached_offset_grid

    _cached_offset_grid.cache_clear()  # the cached offset grid is first built below, in inference mode
    gm = GMConv2d(2, 3, (3, 5), anisotropic=True)
    with torch.inference_mode():
        gm(torch.randn(1, 2, 6, 6))
    gm(torch.randn(1, 2, 6, 6)).sum().backward()
    assert gm.log_sigma.grad.abs().sum() > 0


def test_non_square_centres_and_anisotropic_sigma():
    gm = GMConv2d(1, 1, (3, 5), anisotropic=True, sigma_init=(1.0, 2.0), granularity="layer")
    assert gm.log_sigma.shape == (1, 1, 2)
    mask = gm.gaussian_mask()[0, 0]
    rows, cols = torch.meshgrid(torch.arange(3.0) - 1, torch.arange(5.0) - 2, indexing="ij")
    torch.testing.assert_close(mask, torch.exp(-(rows**2) / 2 - cols**2 / 8))
    assert GMConv2d(1, 1, (3, 5), anisotropic=True).sigma_init == (1.5, 2.5)
    assert GMConv2d(1, 1, (3, 5)).sigma_init == (2.5,)


@pytest.mark.parametrize(
    ("granularity", "shape"), [("layer", (1, 1, 1)), ("out_channel", (6, 1, 1)), ("kernel", (6, 2, 1))]
)
def test_granularity_shapes_and_gradients_reach_sigma(granularity, shape):
    gm = GMConv2d(4, 6, 3, padding=1, groups=2, granularity=granularity)
    assert gm.log_sigma.shape == shape and (gm.sigma > 0).all()
    gm(torch.randn(2, 4, 6, 6)).square().sum().backward()
    assert gm.log_sigma.grad is not None and gm.log_sigma.grad.abs().sum() > 0


def test_one_by_one_kernel_is_plain_conv():
    conv, gm = _pair(in_channels=4, out_channels=6, kernel_size=1)
    assert gm.log_sigma is None and gm.sigma is None
    assert [n for n, _ in gm.named_parameters()] == ["weight", "bias"]
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(gm(x), conv(x), atol=0, rtol=0)


@pytest.mark.parametrize("kwargs", VARIANTS[:6])
def test_fuse_matches_unfused(kwargs):
    gm = GMConv2d(**kwargs, sigma_init=0.8)
    x = torch.randn(2, 4, 9, 10)
    fused = gm.fuse()
    assert type(fused) is nn.Conv2d
    torch.testing.assert_close(fused(x), gm(x))


def test_state_dict_round_trip_and_plain_checkpoint_loads():
    gm = GMConv2d(4, 6, 3, granularity="kernel")
    with torch.no_grad():
        gm.log_sigma.uniform_(-1, 1)
    other = GMConv2d(4, 6, 3, granularity="kernel")
    other.load_state_dict(gm.state_dict())
    torch.testing.assert_close(other.log_sigma, gm.log_sigma)
    x = torch.randn(1, 4, 7, 7)
    torch.testing.assert_close(other(x), gm(x))
    plain = nn.Conv2d(4, 6, 3)
    fresh = GMConv2d(4, 6, 3)
    fresh.load_state_dict(plain.state_dict())  # strict: log_sigma keeps its initial value
    torch.testing.assert_close(fresh.weight, plain.weight)
    torch.testing.assert_close(fresh.sigma, torch.full_like(fresh.sigma, 1.5))
    with pytest.raises(RuntimeError, match="size mismatch"):
        GMConv2d(4, 6, 3, granularity="layer").load_state_dict(gm.state_dict())


def test_dynamic_variant_shapes_grads_and_start():
    static = GMConv2d(4, 6, 3, padding=1, groups=2, sigma_init=1.0)
    dyn = GMConv2d(4, 6, 3, padding=1, groups=2, sigma_init=1.0, dynamic=True)
    dyn.load_state_dict(static.state_dict())  # plain/static checkpoint: the zero-initialised branch stays
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(dyn(x), static(x))  # zero-initialised branch: starts as the static layer
    with torch.no_grad():
        dyn.sigma_predictor.weight.normal_()
    y = dyn(x)
    assert y.shape == (3, 6, 8, 8)
    y.square().sum().backward()
    assert dyn.log_sigma.grad.abs().sum() > 0 and dyn.sigma_predictor.weight.grad.abs().sum() > 0
    # each sample equals a static conv at that sample's predicted sigma
    offset = dyn.sigma_predictor(x[1:2].mean(dim=(2, 3))).view(dyn.log_sigma.shape)
    with torch.no_grad():
        static.log_sigma.copy_(dyn.log_sigma + offset)
    torch.testing.assert_close(y[1:2], static(x[1:2]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be fused"):
        dyn.fuse()


def test_dynamic_with_padding_mode_matches_static():
    static = GMConv2d(4, 6, 3, padding=1, padding_mode="reflect")
    dyn = GMConv2d(4, 6, 3, padding=1, padding_mode="reflect", dynamic=True)
    dyn.load_state_dict(static.state_dict())
    x = torch.randn(2, 4, 6, 7)
    torch.testing.assert_close(dyn(x), static(x))


def test_clear_errors():
    with pytest.raises(ValueError, match="positive"):
        GMConv2d(2, 2, 3, sigma_init=0.0)
    with pytest.raises(ValueError, match="positive"):
        GMConv2d(2, 2, 3, sigma_init=-1.0)
    with pytest.raises(ValueError, match="granularity 'channel'"):
        GMConv2d(2, 2, 3, granularity="channel")
    with pytest.raises(ValueError, match="pair"):
        GMConv2d(2, 2, 3, sigma_init=(1.0, 2.0))
    with pytest.raises(ValueError, match="unknown conv kind"):
        conv2d_factory("gm")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, padding=2)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 4, 1))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def test_conversion_keeps_weights_and_outputs_at_sigma_infinity():
    net = _Net().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    before, weights = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    report = convert_to_gmconv(net, sigma_init=1e12)
    assert report.converted == ["stem", "body.1"]
    assert report.skipped == {"body.2": "kernel (1, 1) < min_kernel 3"}
    assert isinstance(net.stem, GMConv2d) and net.stem.weight.dtype == torch.float64
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    torch.testing.assert_close(net(x), before, atol=1e-6, rtol=0)
    assert convert_to_gmconv(net).converted == []  # already converted: nothing to do


def test_conversion_patterns_and_warning():
    net = _Net()
    report = convert_to_gmconv(net, include="body.*", granularity="layer")
    assert report.converted == ["body.1"] and report.skipped["stem"] == "not included"
    assert net.body[1].granularity == "layer"
    with pytest.warns(UserWarning, match=r"'nope\*' matches no conv; available: stem, body.1, body.2"):
        convert_to_gmconv(_Net(), exclude="nope*")
    net = _Net()
    assert convert_to_gmconv(net, exclude=["stem"], min_kernel=1).converted == ["body.1", "body.2"]


def test_shared_conv_is_converted_once_under_every_name():
    conv = nn.Conv2d(2, 2, 3)
    net = nn.ModuleDict({"a": conv, "b": conv})
    assert convert_to_gmconv(net).converted == ["a", "b"]
    assert net["a"] is net["b"] and isinstance(net["a"], GMConv2d)
    assert fuse_gmconv(net) == ["a", "b"]
    assert net["a"] is net["b"] and type(net["a"]) is nn.Conv2d


def test_fuse_gmconv_model():
    net = _Net()
    convert_to_gmconv(net, sigma_init=0.7)
    x = torch.randn(2, 3, 8, 8)
    expected = net(x)
    assert fuse_gmconv(net) == ["stem", "body.1"]
    assert not any(isinstance(m, GMConv2d) for m in net.modules())
    torch.testing.assert_close(net(x), expected)


def test_engine_param_groups_give_sigma_its_own_rate_and_no_decay():
    net = _Net()
    convert_to_gmconv(net)
    groups = param_groups(net, weight_decay=0.05, lr_mult={"log_sigma": 10.0})
    sigma_group = next(g for g in groups if g["lr_scale"] == 10.0)
    assert sigma_group["weight_decay"] == 0.0
    assert sigma_group["params"] == [net.stem.log_sigma, net.body[1].log_sigma]
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="lr_mult"):
        param_groups(net, 0.05, {"log_sigma": 0.0})
