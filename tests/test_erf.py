"""Effective receptive fields, sigma tables and ``swinlab erf`` on tiny models and runs."""

from pathlib import Path

import pytest
import torch
from torch import nn

from swinlab.cli import main
from swinlab.layers import GMConv2d, convert_to_gmconv
from swinlab.metrics.erf import effective_receptive_field, erf_spread, radial_profile, sigma_table

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 5, padding=2)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.body(self.stem(x)).mean(dim=(2, 3))


def test_erf_of_a_single_conv_is_its_kernel_support():
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    erf = effective_receptive_field(conv, torch.randn(2, 1, 9, 9))
    expected = torch.zeros(9, 9)
    expected[3:6, 3:6] = 1.0
    torch.testing.assert_close(erf, expected)
    gm = GMConv2d.from_conv(conv, sigma_init=0.5)
    narrow = effective_receptive_field(gm, torch.randn(2, 1, 9, 9))
    assert narrow[4, 4] == erf[4, 4] and narrow[3, 3] < 0.2 * erf[3, 3]
    assert erf_spread(narrow) < erf_spread(erf)
    assert erf_spread(expected) == pytest.approx((12 / 9) ** 0.5)  # 8 cells at distance 1 or sqrt(2), one at 0
    profile = radial_profile(narrow)
    assert profile[0] == 1.0 and profile[1] < 0.2 and (profile[2:] == 0).all()


def test_erf_at_a_named_layer_restores_mode_and_reports_bad_names():
    net = _Net().train()
    erf = effective_receptive_field(net, torch.randn(3, 3, 11, 11), layer="body.1")
    assert erf.shape == (11, 11) and net.training
    support = (erf > 0).nonzero()
    assert support.min().item() == 2 and support.max().item() == 8  # 5x5 stem then 3x3: a 7x7 field around 5
    with pytest.raises(ValueError, match=r"conv layers: stem, body\.1, body\.2"):
        effective_receptive_field(net, torch.randn(1, 3, 8, 8), layer="body.9")
    with pytest.raises(ValueError, match=r"\(B, C, h, w\) output"):
        effective_receptive_field(net, torch.randn(1, 3, 8, 8))


def test_sigma_table_lists_masked_layers_with_their_start():
    net = _Net()
    convert_to_gmconv(net, min_kernel=1, anisotropic=True)  # the 1x1 becomes a GMConv2d without a mask
    rows = sigma_table(net)
    assert [(r.layer, r.kernel, r.init, r.values.numel()) for r in rows] == [
        ("stem", (5, 5), (2.5, 2.5), 16),
        ("body.1", (3, 3), (1.5, 1.5), 16),
    ]
    assert rows[1].format().split()[:3] == ["body.1", "3x3", "1.50/1.50"]


def _tiny_run(tmp_path, name, model):
    overrides = [
        f"model.name={model}", "model.kwargs={width: 4}", "data.train_limit=64", "data.val_limit=16", "epochs=1",
        "data.batch_size=16", f"output_dir={tmp_path / name}",
    ]  # fmt: skip
    assert main(["train", str(CONFIGS / "resnet18_fashion.yaml"), *(a for o in overrides for a in ("--set", o))]) == 0
    return str(tmp_path / name)


@pytest.mark.slow  # two trainings' and three figures' matplotlib rendering: ~4 s idle, 15+ s on a busy CPU
def test_erf_command_compares_a_run_with_a_model(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    gm = _tiny_run(tmp_path, "gm", "resnet18_gmconv")
    capsys.readouterr()
    args = ["--layer", "layer2.1.conv2", "--compare", "resnet18", "--img-size", "32", "--batch", "4"]
    assert main(["erf", gm, *args]) == 0
    out = capsys.readouterr().out
    assert f"{gm} " in out and "resnet18 " in out and "spread" in out
    assert "layer2.1.conv2           3x3" in out and "(no GMConv layers)" in out  # the plain model has no sigma
    for png in ("erf_layer2.1.conv2.png", "sigma.png"):
        assert (Path(gm) / png).read_bytes()[:4] == b"\x89PNG"
    # noise inputs and a registered model name, into a chosen folder
    args = ["--img-size", "32", "--inputs", "noise", "--batch", "2", "--out", str(tmp_path / "o")]
    assert main(["erf", "resnet18", *args]) == 0
    assert (tmp_path / "o" / "erf_layer4.1.conv2.png").is_file() and not (tmp_path / "o" / "sigma.png").exists()


def test_erf_report_of_two_models_on_the_same_images(tmp_path):
    pytest.importorskip("matplotlib")
    from swinlab.engine.runs import load_source, probe_inputs
    from swinlab.metrics.erf import erf_report

    sources = [load_source(name, img_size=32) for name in ("resnet18_gmconv", "resnet18")]
    probes = {s.label: (s.model, probe_inputs(s, batch=2)) for s in sources}
    assert torch.equal(probes["resnet18"][1], probes["resnet18_gmconv"][1])  # same data config: the same images
    report = erf_report(probes, "layer1.1.conv2", tmp_path)
    gm, plain = report.erfs["resnet18_gmconv"], report.erfs["resnet18"]
    assert gm.shape == plain.shape == (32, 32)
    assert erf_spread(gm) < erf_spread(plain)  # same init weights scale, but the mask damps the kernels' rims
    assert len(report.sigmas["resnet18_gmconv"]) == 17 and report.sigmas["resnet18"] == []
    assert report.figure == tmp_path / "erf_layer1.1.conv2.png" and report.sigma_figure == tmp_path / "sigma.png"
    assert "resnet18_gmconv" in report.format() and "(no GMConv layers)" in report.format()


def test_model_name_source_loads_pretrained_weights(tmp_path):
    import swinlab
    from swinlab.engine.runs import load_source

    model = swinlab.create_model("resnet18_gmconv")
    with torch.no_grad():
        model.conv1.log_sigma.fill_(0.0)
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    source = load_source("resnet18_gmconv", img_size=40, pretrained=str(tmp_path / "weights.pth"))
    assert sigma_table(source.model)[0].values.eq(1.0).all() and not source.model.training
    assert (source.data.name, source.data.img_size, source.data.in_chans) == ("fashion_mnist_embedded", 40, 3)


def test_erf_command_errors_are_one_line(tmp_path, capsys):
    assert main(["erf", "resnet18", "--img-size", "32", "--layer", "layer9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no layer 'layer9'" in err and "layer1.0.conv1" in err and "Traceback" not in err
    assert main(["erf", "resnet18", "--img-size", "32", "--batch", "0", "--out", str(tmp_path)]) == 2
    assert "batch must be >= 1" in capsys.readouterr().err
