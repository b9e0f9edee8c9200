"""ResNet / AlexNet: torchvision key layout, GMConv placement, plain-checkpoint loading, toolkit interface."""

from pathlib import Path

import pytest
import torch

import swinlab
from swinlab.engine import param_groups
from swinlab.engine.runs import load_source
from swinlab.layers import GMConv2d
from swinlab.metrics.erf import sigma_table
from swinlab.recipe import load_config

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _torchvision_resnet_keys(layers, bottleneck):
    """torchvision ResNet state-dict names, written out from its documented layout."""
    keys = ["conv1.weight", *(f"bn1.{k}" for k in _BN)]
    convs = 3 if bottleneck else 2
    for stage, depth in enumerate(layers, start=1):
        for block in range(depth):
            prefix = f"layer{stage}.{block}."
            for i in range(1, convs + 1):
                keys += [f"{prefix}conv{i}.weight", *(f"{prefix}bn{i}.{k}" for k in _BN)]
            if block == 0 and (stage > 1 or bottleneck):
                keys += [f"{prefix}downsample.0.weight", *(f"{prefix}downsample.1.{k}" for k in _BN)]
    return [*keys, "fc.weight", "fc.bias"]


_ALEXNET_KEYS = [f"features.{i}.{k}" for i in (0, 3, 6, 8, 10) for k in ("weight", "bias")] + [
    f"classifier.{i}.{k}" for i in (1, 4, 6) for k in ("weight", "bias")
]

TORCHVISION = {
    # name: (expected keys, parameter count of torchvision's model, some known shapes)
    "resnet18": (
        _torchvision_resnet_keys((2, 2, 2, 2), False),
        11_689_512,
        {"layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.1.conv2.weight": (512, 512, 3, 3)},
    ),
    "resnet50": (
        _torchvision_resnet_keys((3, 4, 6, 3), True),
        25_557_032,
        {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3)},
    ),
    "alexnet": (_ALEXNET_KEYS, 61_100_840, {"features.0.weight": (64, 3, 11, 11), "classifier.1.weight": (4096, 9216)}),
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_torchvision_key_layout(name):
    keys, params, shapes = TORCHVISION[name]
    with torch.device("meta"):
        model = swinlab.create_model(name)
    state = model.state_dict()
    assert list(state) == keys
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(tuple(state[k].shape) == shape for k, shape in shapes.items())


@pytest.mark.parametrize(("name", "masked"), [("resnet50_gmconv", 17), ("alexnet_gmconv", 5)])
def test_gmconv_placement(name, masked):
    with torch.device("meta"):
        model = swinlab.create_model(name)
    gm = [n for n, m in model.named_modules() if isinstance(m, GMConv2d)]
    assert len(gm) == masked  # ResNet-50: stem + 16 bottleneck 3x3; AlexNet: all five
    assert all(max(model.get_submodule(n).kernel_size) > 1 for n in gm)
    plain_keys = TORCHVISION[name.removesuffix("_gmconv")][0]
    assert sorted(model.state_dict()) == sorted([*plain_keys, *(f"{n}.log_sigma" for n in gm)])


def test_plain_checkpoint_loads_strictly_into_gmconv_model():
    plain = swinlab.create_model("resnet18", num_classes=5).eval()
    gm = swinlab.create_model("resnet18_gmconv", num_classes=5, sigma_init=1e12).eval()
    gm.load_state_dict(plain.state_dict())  # strict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), plain(x), atol=1e-5, rtol=1e-5)
    gm_state = gm.state_dict()
    assert all(torch.equal(v, gm_state[k]) for k, v in plain.state_dict().items())


@pytest.mark.parametrize(
    ("name", "size"), [("resnet18", 32), ("resnet18_gmconv", 32), ("resnet50_gmconv", 32), ("alexnet_gmconv", 64)]
)
def test_registered_models_build_and_run(name, size):
    small = {"hidden_features": 64} if name.startswith("alexnet") else {}
    model = swinlab.create_model(name, num_classes=7, in_chans=1, **small)
    assert model.num_classes == 7 and model.in_chans == 1
    assert model.no_weight_decay_keywords() == {"log_sigma"} and model.no_weight_decay() == set()
    x = torch.randn(2, 1, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    logits.sum().backward()
    if name.endswith("gmconv"):
        assert all(m.log_sigma.grad is not None for m in model.modules() if isinstance(m, GMConv2d))
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, model.num_features)
        assert len(model.forward_features(x, return_stages=True)) in (3, 4)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3


def test_resnet_stages_and_grad_checkpointing():
    model = swinlab.create_model("resnet18_gmconv", num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    stages = model.forward_features(x, return_stages=True)
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    model.eval()  # BatchNorm in eval: the recomputation must not change running statistics between runs
    expected = model(x)
    expected.sum().backward()
    grad = model.layer1[0].conv1.log_sigma.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(model.layer1[0].conv1.log_sigma.grad, grad)


def test_engine_param_groups_exempt_sigma_from_decay():
    model = swinlab.create_model("resnet18_gmconv", num_classes=2)
    decay, no_decay = param_groups(model, 0.05)
    sigmas = {id(m.log_sigma) for m in model.modules() if isinstance(m, GMConv2d)}
    assert sigmas and sigmas <= {id(p) for p in no_decay["params"]}
    assert not sigmas & {id(p) for p in decay["params"]}


def test_cpu_sized_variants_keep_the_layout():
    small = swinlab.create_model("resnet18_gmconv", num_classes=10, in_chans=1, img_size=28, width=8, stem="small")
    assert small.img_size == 28 and small.conv1.kernel_size == (3, 3) and isinstance(small.conv1, GMConv2d)
    stages = small.forward_features(torch.randn(2, 1, 28, 28), return_stages=True)
    assert [tuple(s.shape[1:]) for s in stages] == [(8, 28, 28), (16, 14, 14), (32, 7, 7), (64, 4, 4)]
    plain_keys = TORCHVISION["resnet18"][0]
    assert [k for k in small.state_dict() if not k.endswith("log_sigma")] == plain_keys
    assert swinlab.create_model("alexnet", img_size=96, hidden_features=8).img_size == 96


def test_cpu_recipe_trains_through_the_engine(tmp_path):
    from swinlab.engine import train

    recipe = Path(__file__).resolve().parents[1] / "configs" / "resnet18_gmconv_fashion.yaml"
    overrides = ["epochs=1", "data.train_limit=128", "data.val_limit=64", "optim.warmup_epochs=0"]
    result = train(load_config(recipe, [*overrides, f"output_dir={tmp_path}"]))
    assert result["epochs_completed"] == 1 and result["samples_seen"] == 128 and result["skipped_steps"] == 0
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    sigma = state["layer1.0.conv1.log_sigma"].exp()
    assert sigma.shape == (16, 1, 1) and not torch.allclose(sigma, torch.full_like(sigma, 1.5))  # sigma trained
    source = load_source(str(tmp_path))  # what `swinlab erf RUN` probes: the run's model with its weights
    rows = {row.layer: row for row in sigma_table(source.model)}
    torch.testing.assert_close(rows["layer1.0.conv1"].values, sigma.flatten())
    assert source.data.name == "fashion_mnist_embedded" and source.data.img_size == 32


def test_input_errors():
    with pytest.raises(ValueError, match="at least 63x63"):
        swinlab.create_model("alexnet", num_classes=2, hidden_features=8)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        swinlab.create_model("resnet18", num_classes=2)(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown conv kind"):
        swinlab.create_model("resnet18", conv="dynamic")
    with pytest.raises(ValueError, match="unknown ResNet stem 'cifar'"):
        swinlab.create_model("resnet18", stem="cifar")
    with pytest.raises(ValueError, match="img_size=32"):
        swinlab.create_model("alexnet", img_size=32)
