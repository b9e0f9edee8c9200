"""``swinlab.fp8.initialize``: layer selection, opt_level errors, training through it, the engine's seam."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import swinlab
from swinlab.engine import precision
from swinlab.fp8 import FP8SGD, FP8AdamW, FP8Linear, clear_flags, found_nonfinite, initialize
from swinlab.fp8.amp import convert_linears, default_filter


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        self.small = nn.Linear(64, 8)  # 512 weights: too small to gain from FP8
        self.odd = nn.Linear(64, 72 + 2)  # not a multiple of 16
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h) + self.small(h).sum(-1, keepdim=True) + self.odd(h).mean(-1, keepdim=True)


def fp8_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def test_o1_swaps_default_layers_and_rebuilds_the_optimizer_on_the_same_params():
    model = Tiny()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = list(model.parameters())
    with pytest.warns(UserWarning, match=r"kept 1 linear\(s\) in high precision .* odd \(64->74\);"):
        model2, optimizer2 = initialize(model, optimizer, opt_level="O1")
    assert model2 is model and isinstance(optimizer2, FP8SGD)
    assert fp8_names(model) == {"body.0", "body.2"}
    assert list(model.parameters()) == params  # same Parameter objects...
    assert [p for g in optimizer2.param_groups for p in g["params"]] == params  # ...in the same groups
    assert model.body[0].weight.dtype == torch.float16 and model.head.weight.dtype == torch.float32
    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer2.zero_grad()
        loss.backward()
        assert model.body[0].weight.grad is None and model.body[0].weight.fp8_grad is not None
        optimizer2.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    buffer = optimizer2.state[model.body[0].weight]["momentum_buffer"]
    assert buffer.dtype == torch.float32  # O1: FP32 moments


def test_model_level_nonfinite_flag():
    model = Tiny()
    assert not bool(found_nonfinite(model))  # no FP8 layers yet
    initialize(model, module_filter=lambda module, fqn: fqn.startswith("body"))
    x = torch.randn(4, 64)
    model(x).sum().backward()
    assert not bool(found_nonfinite(model))
    x[0, 0] = math.nan
    model(x).sum().backward()
    assert bool(found_nonfinite(model))
    clear_flags(model)
    assert not bool(found_nonfinite(model))


def test_custom_filter_and_idempotence():
    model = Tiny()
    with pytest.warns(UserWarning, match=r"FP8Linear\(64, 10\)"):
        chosen = convert_linears(model, lambda module, fqn: fqn.startswith("body") or fqn == "head")
    assert set(chosen) == {"body.0", "body.2", "head"}
    with pytest.warns(UserWarning, match="multiples of 16"):
        assert convert_linears(model, lambda module, fqn: True) == ["small", "odd"]  # FP8Linears left alone
    assert not default_filter(nn.Conv2d(3, 3, 1), "conv")
    assert not default_filter(nn.Linear(256, 256), "head.fc")


def test_opt_level_errors():
    model = Tiny()
    with pytest.raises(ValueError, match="O4"):
        initialize(model, None, opt_level="O4")
    with pytest.raises(ValueError, match="torchrun"):  # O3 shards across ranks: no process group here
        initialize(model, torch.optim.AdamW(model.parameters()), opt_level="o3")
    with pytest.raises(TypeError, match="RMSprop"):
        initialize(model, torch.optim.RMSprop(model.parameters()), opt_level="O2")
    assert not fp8_names(model)  # a refused call leaves the model alone


@pytest.mark.parametrize(("capability", "accepted"), [((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_gpus_without_fp8_tensor_cores_are_refused_by_name(monkeypatch, capability, accepted):
    from swinlab.fp8.linear import require_fp8_gemm

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    require_fp8_gemm("cpu")  # CPU emulates _scaled_mm, whatever the GPU
    if accepted:
        require_fp8_gemm("cuda:0")
    else:
        with pytest.raises(ValueError, match=rf"8\.9 or newer .*A100.* is {capability[0]}\.{capability[1]}: .*bf16"):
            require_fp8_gemm("cuda:0")


def test_unaligned_linears_kept_out_by_default_are_named_in_one_warning():
    model = nn.Sequential(nn.Linear(64, 100), nn.Linear(100, 64), nn.Linear(64, 64), nn.Linear(256, 8))
    with pytest.warns(UserWarning, match=r"kept 2 linear\(s\) .* 0 \(64->100\), 1 \(100->64\);") as caught:
        assert convert_linears(model) == ["2"]  # 3 (256 -> 8) is a small projection: kept without a word
    assert len(caught) == 1


@pytest.mark.parametrize("grad_format", ["e4m3", "e5m2"])
def test_grad_format_reaches_every_layer_from_initialize_and_from_the_config(grad_format):
    from swinlab.recipe import load_config

    model = Tiny()
    initialize(model, module_filter=lambda module, fqn: fqn.startswith("body"), grad_format=grad_format)
    assert {model.body[i].grad_output_meta.fmt.name for i in (0, 2)} == {grad_format}
    cfg = load_config(Path(__file__).parents[1] / "configs" / "gpt_nano_stdlib.yaml",
                      ["precision=fp8-o2", f"fp8.grad_format={grad_format}", "fp8.history_len=4",
                       "fp8.scaling=current"])  # fmt: skip
    gpt = swinlab.create_model(cfg.model.name)
    gpt, _, _ = precision.wrap(gpt, torch.optim.AdamW(gpt.parameters()), cfg.precision, cfg.fp8)
    layers = [m for m in gpt.modules() if isinstance(m, FP8Linear)]
    assert layers and {m.grad_output_meta.fmt.name for m in layers} == {grad_format}
    assert {m.input_meta.amax_history.numel() for m in layers} == {4}
    assert {m.input_meta.policy for m in layers} == {"current"}


@pytest.mark.parametrize(("setting", "fp8_blocks"), [(None, {"1"}), ("[]", {"0", "1"}), ("[transformer.h.1]", {"0"})])
def test_config_high_precision_overrides_the_models_own_choice(setting, fp8_blocks):
    from swinlab.recipe import load_config

    overrides = ["precision=fp8-o1"] + ([f"fp8.high_precision={setting}"] if setting else [])
    cfg = load_config(Path(__file__).parents[1] / "configs" / "gpt_nano_stdlib.yaml", overrides)
    gpt = swinlab.create_model(cfg.model.name)
    gpt, _, _ = precision.wrap(gpt, torch.optim.AdamW(gpt.parameters()), cfg.precision, cfg.fp8)
    assert {name.split(".")[2] for name in fp8_names(gpt)} == fp8_blocks


def test_unknown_grad_format_is_refused_before_the_model_changes():
    model = Tiny()
    with pytest.raises(ValueError, match="unknown FP8 format 'bf16'"):
        initialize(model, torch.optim.AdamW(model.parameters()), "O2", grad_format="bf16")
    assert not fp8_names(model)


def test_scaling_policy_reaches_every_layer_and_a_bad_one_is_refused_before_the_model_changes():
    model = Tiny()
    body = lambda module, fqn: fqn.startswith("body")
    initialize(model, torch.optim.AdamW(model.parameters()), "O1", module_filter=body, scaling="current")
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert layers and {(m.input_meta.policy, m.grad_output_meta.policy) for m in layers} == {("current", "current")}
    model = Tiny()
    with pytest.raises(ValueError, match="unknown scaling policy 'dynamic'"):
        initialize(model, torch.optim.AdamW(model.parameters()), "O1", scaling="dynamic")
    assert not fp8_names(model)


def test_engine_precision_seam_runs_swin_nano_in_fp8():
    model = swinlab.create_model("swinv2_nano_window4_32", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, autocast = precision.wrap(model, optimizer, "fp8-o1")
    converted = fp8_names(model)
    assert "head" not in converted and not any("cpb_mlp" in name for name in converted)
    assert "layers.0.blocks.0.mlp.fc1" in converted and "layers.0.downsample.reduction" in converted
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    with autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    unused = {name for name in converted if int(model.get_submodule(name).input_meta.steps) == 0}
    assert not unused  # every converted layer, the attention's qkv projection included, ran in FP8
    assert isinstance(optimizer, FP8AdamW) and optimizer.state_dtypes["exp_avg"] == torch.float32  # O1
    with pytest.raises(TypeError, match="already an FP8 optimizer"):
        precision.wrap(model, optimizer, "fp8-o2")


@pytest.mark.parametrize(
    ("name", "make_input"),
    [
        ("video_swin_nano", lambda: torch.randn(2, 3, 8, 32, 32)),
        ("gpt_nano", lambda: torch.randint(0, 256, (2, 32))),
    ],
)
def test_o2_trains_video_swin_and_gpt(name, make_input):
    model = swinlab.create_model(name)
    model, optimizer = initialize(model, torch.optim.AdamW(model.parameters(), lr=1e-3), "O2")
    converted = fp8_names(model)
    x = make_input()
    out = model(x)
    logits = out.flatten(0, -2) if out.dim() == 3 else out
    target = x.flatten() if out.dim() == 3 else torch.tensor([0, 1])
    loss = nn.functional.cross_entropy(logits, target)
    loss.backward()
    optimizer.step()
    assert converted and torch.isfinite(loss) and optimizer.skipped_steps == 0
    assert all(int(model.get_submodule(n).input_meta.steps) == 1 for n in converted)  # each ran its FP8 GEMM
    assert optimizer.state_dtypes["exp_avg"] == torch.float8_e4m3fn


def _fp8_run(tmp_path):
    from swinlab.config import DataConfig, ModelConfig, OptimConfig
    from swinlab.engine import train
    from swinlab.recipe import TrainConfig

    cfg = TrainConfig(
        model=ModelConfig(name="swinv2_nano_window4_32"),
        data=DataConfig(name="fashion_mnist_embedded", train_limit=32, val_limit=16, batch_size=16),
        optim=OptimConfig(lr=1e-3, warmup_epochs=0.5),
        epochs=1,
        threads=1,
        precision="fp8-o1",
        output_dir=str(tmp_path / "run"),
    )
    return train(cfg)


@pytest.mark.slow
def test_engine_trains_fp8_o1(tmp_path):
    from swinlab.engine import load_checkpoint

    result = _fp8_run(tmp_path)
    assert result["step"] == 2 and result["skipped_steps"] == 0 and math.isfinite(result["train_loss"])
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    steps = [v for k, v in state.items() if k.endswith("input_meta.steps")]
    assert steps and all(int(v) == 2 for v in steps)  # every FP8 linear ran both steps' GEMMs in FP8


@pytest.mark.slow
def test_engine_evaluates_fp8_o1_run(tmp_path):
    from swinlab.engine import evaluate

    result = _fp8_run(tmp_path)
    assert evaluate(result["run_dir"])["val_loss"] == pytest.approx(result["val_loss"], rel=1e-5)
