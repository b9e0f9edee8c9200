"""FP8 optimizers: parity with torch in FP32, O2 storage and accuracy, decoupling controls, skips, state dicts."""

from __future__ import annotations

import io
import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from _ddp_worker import tiny_config, tiny_loaders
from swinlab.engine import build_optimizer, fit, load_checkpoint, precision
from swinlab.engine import loop as loop_module
from swinlab.fp8 import E4M3, FP8SGD, FP8AdamW, FP8Linear, initialize, quantize
from swinlab.fp8.formats import amax
from swinlab.fp8.optim import convert_optimizer
from swinlab.tasks import ClassificationTask

FP32_ROLES = {"master_dtype": torch.float32, "m1_dtype": torch.float32, "m2_dtype": torch.float32}


def fp8_param(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.randn(*shape) * 0.1)
    param.fp8_weight = True  # what FP8Linear marks its weight with
    return param


def twins(make_fp8, make_torch):
    """The same three parameters (an FP8 weight with an FP8 gradient, a 2-D and a 1-D weight) in two groups."""
    torch.manual_seed(0)
    ours = [fp8_param(32, 16), nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8))]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = make_fp8([{"params": ours[:2], "weight_decay": 0.05}, {"params": ours[2:], "weight_decay": 0.0}])
    ref_opt = make_torch([{"params": ref[:2], "weight_decay": 0.05}, {"params": ref[2:], "weight_decay": 0.0}])
    return ours, ref, opt, ref_opt


def feed_same_grads(ours, ref, step: int) -> None:
    """Random gradients; the FP8 weight's arrives as an E4M3 fp8_grad, torch gets its dequantised values."""
    g = torch.Generator().manual_seed(step)
    for i, (p, r) in enumerate(zip(ours, ref, strict=True)):
        grad = torch.randn(p.shape, generator=g) * 10.0 ** (-i - 1)
        if i == 0:
            p.fp8_grad = quantize(grad, E4M3, 2.0**10)
            r.grad = p.fp8_grad.dequantize()
        else:
            p.grad, r.grad = grad.clone(), grad.clone()


def max_rel_err(ours, ref) -> float:
    pairs = zip(ours, ref, strict=True)
    return max(float((p.detach().float() - r.detach()).abs().max() / r.detach().abs().max()) for p, r in pairs)


@pytest.mark.parametrize(
    ("make_fp8", "make_torch"),
    [
        (
            lambda g: FP8AdamW(g, lr=1e-2, betas=(0.9, 0.95), **FP32_ROLES),
            lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.9, 0.95)),
        ),
        (
            lambda g: FP8SGD(g, lr=0.1, momentum=0.9, nesterov=True, master_dtype=torch.float32,
                             m1_dtype=torch.float32),
            lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
        ),
    ],
    ids=["adamw", "sgd-nesterov"],
)
def test_all_fp32_roles_match_torch_over_10_steps_with_a_schedule(make_fp8, make_torch):
    ours, ref, opt, ref_opt = twins(make_fp8, make_torch)
    for step in range(10):
        for o in (opt, ref_opt):
            for group in o.param_groups:
                group["lr"] = group["lr"] * 0.9  # a schedule writing group["lr"], as the engine's LRSchedule does
        feed_same_grads(ours, ref, step)
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    assert max_rel_err(ours, ref) <= 1e-6
    assert all(p.dtype == torch.float32 and not hasattr(p, "master_scale") for p in ours)


def test_o2_stores_scaled_low_precision_states_and_stays_close_to_adamw():
    # MS-AMP's check (torch's default lr, 4 steps) allows 3e-4 on a 4x4 weight; over these 512 weights the worst
    # element is ~3.2e-4 off (E4M3 moments: half an ulp is 6% of an update) while each moved by ~4e-3.
    ours, ref, opt, ref_opt = twins(lambda g: FP8AdamW(g, lr=1e-3), lambda g: torch.optim.AdamW(g, lr=1e-3))
    weight = ours[0]
    assert weight.dtype == torch.float16 and weight.master_scale.dtype == torch.float32
    before = weight.detach().float() / weight.master_scale
    torch.testing.assert_close(before, ref[0].detach(), rtol=2**-10, atol=0)  # FP16 rounding of the values only
    for step in range(4):
        feed_same_grads(ours, ref, step)
        opt.step()
        ref_opt.step()
    state = opt.state[weight]
    assert state["exp_avg"].dtype == torch.float8_e4m3fn and state["exp_avg_sq"].dtype == torch.float16
    for key in ("exp_avg", "exp_avg_sq"):
        scale = state[key + "_scale"]
        assert float(torch.log2(scale)) == round(float(torch.log2(scale)))  # powers of two
    assert all(v.dtype == torch.float32 for k, v in opt.state[ours[1]].items())  # other params: FP32
    values = weight.detach().float() / weight.master_scale
    assert float(values.abs().max() * weight.master_scale) > 65504 / 2  # the scale uses FP16's range
    error = (values - ref[0].detach()).abs()
    assert float(error.max()) <= 5e-4 and float(error.mean()) <= 1e-4


def test_o2_master_scale_follows_amax_across_powers_of_two_over_200_steps():
    """The FP16 master's per-tensor scale is a power of two set by the amax: whenever the weight's largest value
    crosses a power of two, payload and scale change together. (A step that wrote the new payload but kept the
    old scale would halve or double every value at each crossing.)

    A 32x48 weight with |w0| in [0.2, 0.9] gets E4M3 gradients of one sign per element plus noise, pushing every
    magnitude up for 70 steps, down for 90 and up again for 40 at lr 0.02 (~lr per step), so its amax climbs past
    1 and 2, falls back past 2 and 1 and climbs past 1 again. Compared with:

    * the same FP8AdamW with an FP32 master: Adam's moments depend on the gradients only, so both hold
      bit-identical E4M3/FP16 moments and their weights differ by FP16 rounding alone: at most half an FP16 ulp,
      2**-11 * amax, per stored master (T steps + the initial conversion), a strict bound;
    * ``torch.optim.AdamW`` in FP32: the E4M3 first moment rounds each update by up to half an E4M3 ulp (2**-4)
      and that rounding is carried into the next steps' moment, so each element may be off by one E4M3 ulp
      (2**-3) of the distance it travelled, plus the master bound (measured: 0.08 of the distance at worst).
    """
    steps, lr, wd = 200, 0.02, 0.01
    torch.manual_seed(0)
    w0 = (torch.rand(32, 48) * 0.7 + 0.2) * torch.randn(32, 48).sign()
    ours, twin, ref = fp8_param(32, 48), fp8_param(32, 48), nn.Parameter(w0.clone())
    for p in (ours, twin):
        p.data.copy_(w0)
    opt = FP8AdamW([ours], lr=lr, weight_decay=wd)  # O2: FP16 master + scale, E4M3 m1, FP16 m2
    twin_opt = FP8AdamW([twin], lr=lr, weight_decay=wd, master_dtype=torch.float32)
    ref_opt = torch.optim.AdamW([ref], lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    travelled, amaxes, scales = torch.zeros_like(w0), [float(w0.abs().max())], [float(ours.master_scale)]
    for step in range(steps):
        direction = -1.0 if step < 70 or step >= 160 else 1.0  # grad against the sign grows |w|
        grad = direction * w0.sign() + 0.3 * torch.randn(w0.shape, generator=g)
        ours.fp8_grad = twin.fp8_grad = quantize(grad, E4M3, 64.0)
        ref.grad = ours.fp8_grad.dequantize()
        before = ref.detach().clone()
        for o in (opt, twin_opt, ref_opt):
            o.step()
        travelled += (ref.detach() - before).abs()
        amaxes.append(float(ref.detach().abs().max()))
        scales.append(float(ours.master_scale))
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[ours][key].view(torch.uint8), twin_opt.state[twin][key].view(torch.uint8))

    # The test exercises what it is about: the reference amax crossed powers of two both ways, twice each.
    octaves = [math.floor(math.log2(a)) for a in amaxes]
    changes = [b - a for a, b in pairwise(octaves) if b != a]
    assert changes.count(1) >= 2 and changes.count(-1) >= 2 and set(changes) == {1, -1}, changes

    values = master_values(ours)
    master_bound = (steps + 1) * 2**-11 * max(amaxes)
    assert float((values - twin.detach()).abs().max()) <= master_bound
    beyond_master = ((values - ref.detach()).abs() - master_bound).clamp(min=0)
    assert float((beyond_master / travelled).max()) <= 2**-3

    # ... and the master scale tracked the amax: one halving / doubling per crossing, always the current scale.
    ratios = [b / a for a, b in pairwise(scales) if b != a]
    assert ratios == [2.0**-c for c in changes]
    assert float(ours.detach().float().abs().max()) > 65504 / 2


def master_values(param: torch.Tensor) -> torch.Tensor:
    return param.detach().float() / getattr(param, "master_scale", 1.0)


def test_e4m3_master_loses_small_updates_fp16_master_keeps_them():
    """The precision-decoupling control: updates far below E4M3's spacing vanish in an E4M3 master."""

    def update(master_dtype: torch.dtype, m2_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        torch.manual_seed(0)
        param = fp8_param(64, 64)
        opt = FP8AdamW([param], lr=1e-3, weight_decay=0.0, master_dtype=master_dtype, m1_dtype=torch.float32,
                       m2_dtype=m2_dtype)
        start, g = master_values(param), torch.Generator().manual_seed(1)
        for _ in range(5):
            param.fp8_grad = quantize(torch.randn(64, 64, generator=g), E4M3, 64.0)
            opt.step()
        return master_values(param) - start

    ref = update(torch.float32)
    moved = float(ref.abs().mean())  # ~5 steps of lr 1e-3
    error = {dtype: float((update(dtype) - ref).abs().mean()) for dtype in (torch.float16, torch.float8_e4m3fn)}
    assert error[torch.float16] < 0.05 * moved
    assert error[torch.float8_e4m3fn] > 0.5 * moved  # the update is mostly lost
    assert float((update(torch.float16, torch.float8_e4m3fn) - ref).abs().mean()) < 0.5 * moved  # the m2 control


def test_e4m3_master_runs_through_fp8_linears_and_its_state_dict_round_trips():
    model, opt = o2_net(master_dtype=torch.float8_e4m3fn)
    weight = model.body[0].weight
    assert weight.dtype == torch.float8_e4m3fn
    losses = train_steps(model, opt, 3, seed=1)
    assert all(math.isfinite(v) for v in losses)
    assert float(amax(weight)) == float(weight.detach().float().abs().max())  # FP8 amax via the byte order
    copy, _ = o2_net(seed=3, master_dtype=torch.float8_e4m3fn)
    copy.load_state_dict(model.state_dict())
    assert torch.equal(copy.body[0].weight.view(torch.uint8), weight.view(torch.uint8))


def test_bad_roles_and_options_are_refused():
    with pytest.raises(TypeError, match="master_dtype"):
        FP8AdamW([fp8_param(4, 4)], master_dtype=torch.int8)
    with pytest.raises(ValueError, match="betas"):
        FP8AdamW([fp8_param(4, 4)], betas=(0.9, 1.0))
    model = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="amsgrad"):
        convert_optimizer(torch.optim.AdamW(model.parameters(), amsgrad=True), **FP32_ROLES)
    torch_opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    torch_opt.step()
    with pytest.raises(ValueError, match="before its first step"):
        convert_optimizer(torch_opt, **FP32_ROLES)


def test_dequantized_grad_mode_gives_an_fp32_grad_to_the_fp16_master():
    model, opt = o2_net(grad_mode="dequantized")
    weight = model.body[0].weight
    model(torch.randn(8, 8)).sum().backward()
    assert weight.dtype == torch.float16 and weight.grad.dtype == torch.float32
    assert getattr(weight, "fp8_grad", None) is None
    assert len(torch.unique(weight.grad * model.body[0].grad_weight_meta.scale)) <= 256  # E4M3 values
    assert all(math.isfinite(v) for v in train_steps(model, opt, 3, seed=1))


def test_a_weight_tied_to_a_non_fp8_module_is_refused():
    model = nn.ModuleDict({"embed": nn.Embedding(64, 64), "out": nn.Linear(64, 64, bias=False)})
    model["out"].weight = model["embed"].weight
    with pytest.raises(ValueError, match=r"embed\.weight is tied.*'out'"):
        initialize(model, torch.optim.AdamW(model.parameters()), "O2")


def test_conversion_keeps_groups_hyperparameters_and_extra_keys():
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    groups = [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.05, "lr_scale": 1.0},
        {"params": [model[0].bias, *model[1].parameters(), model[2].bias], "weight_decay": 0.0, "lr_scale": 10.0},
    ]
    torch_opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.8, 0.9), eps=1e-7, fused=True)
    model, opt = initialize(model, torch_opt, "O2")
    assert isinstance(opt, FP8AdamW)
    for new, old in zip(opt.param_groups, torch_opt.param_groups, strict=True):
        assert new["params"] == old["params"]
        assert {k: new[k] for k in ("lr", "betas", "eps", "weight_decay", "lr_scale")} == {
            k: old[k] for k in ("lr", "betas", "eps", "weight_decay", "lr_scale")
        }
        assert "fused" not in new
    assert isinstance(model[0], FP8Linear) and model[0].weight.dtype == torch.float16
    sgd = initialize(nn.Sequential(nn.Linear(64, 64)), None)[0]
    opt = initialize(nn.Sequential(nn.Linear(64, 64)), torch.optim.SGD(sgd.parameters(), lr=0.1, momentum=0.9,
                                                                       nesterov=True, weight_decay=1e-4))[1]
    assert isinstance(opt, FP8SGD) and opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


class Net(nn.Module):
    """Two FP8-sized linears between small high-precision ones (the default filter keeps those)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 64)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.body(torch.relu(self.stem(x)))))


def o2_net(seed: int = 0, sgd: bool = False, **kwargs) -> tuple[Net, FP8AdamW | FP8SGD]:
    torch.manual_seed(seed)
    model = Net()
    if sgd:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    return initialize(model, optimizer, "O2", **kwargs)


def train_steps(model, opt, steps: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("sgd", [False, True], ids=["adamw", "sgd"])
def test_o2_resume_from_state_dicts_continues_bit_identically(sgd):
    model, opt = o2_net(sgd=sgd)
    train_steps(model, opt, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    expected = train_steps(model, opt, 3, seed=2)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    moments = {"momentum_buffer": "float8_e4m3fn"} if sgd else {"exp_avg": "float8_e4m3fn", "exp_avg_sq": "float16"}
    assert saved["optimizer"]["fp8"]["dtypes"] == {"master": "float16", **moments}
    resumed, resumed_opt = o2_net(seed=5, sgd=sgd)  # other initial weights: everything must come from the file
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["optimizer"])
    assert train_steps(resumed, resumed_opt, 3, seed=2) == expected
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert value.dtype == resumed_opt.state[q][key].dtype and torch.equal(
                value.float(), resumed_opt.state[q][key].float()), key


def test_state_dict_of_another_level_or_a_torch_optimizer_is_refused():
    model, opt = o2_net()
    train_steps(model, opt, 1, seed=1)
    o1_model = Net()
    o1_model, o1_opt = initialize(o1_model, torch.optim.AdamW(o1_model.parameters(), lr=3e-3), "O1")
    train_steps(o1_model, o1_opt, 1, seed=1)
    with pytest.raises(ValueError, match=r"float8_e4m3fn.*opt_level"):  # O2 state into O1
        o1_opt.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"float32.*float8_e4m3fn.*opt_level"):  # O1 state into O2
        opt.load_state_dict(o1_opt.state_dict())
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="not an FP8 optimizer state"):
        opt.load_state_dict(plain.state_dict())


def snapshot(model, opt) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    return tensors + [v.clone() for s in opt.state.values() for v in s.values()]


@pytest.mark.parametrize("where", ["input", "grad_output", "plain_grad"])
def test_nonfinite_gradient_skips_the_whole_step(where):
    model, opt = o2_net()
    train_steps(model, opt, 2, seed=1)
    scales = [p.master_scale.clone() for p in model.parameters() if hasattr(p, "master_scale")]
    before = snapshot(model, opt)
    x = torch.randn(4, 8)
    if where == "input":
        x[0, 0] = math.inf
    out = model(x)
    opt.zero_grad()
    out.backward(torch.full_like(out, math.nan) if where == "grad_output" else torch.ones_like(out))
    if where == "plain_grad":
        model.norm.weight.grad[0] = math.inf
    fp8_grad = model.body[0].weight.fp8_grad
    if where != "plain_grad":
        assert torch.isnan(fp8_grad.scale)  # the saturated E4M3 payload cannot pass for a number
    assert not math.isfinite(float(opt.clip_grad_norm_(1.0)))
    opt.step()
    assert opt.skipped_steps == 1
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert scales == [p.master_scale for p in model.parameters() if hasattr(p, "master_scale")]
    train_steps(model, opt, 1, seed=3)  # the next finite step applies, and writes only finite values
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(model, opt), strict=True))


def test_clip_covers_fp8_gradients_by_editing_their_scale():
    model, opt = o2_net()
    out = model(torch.randn(16, 8))
    out.square().sum().mul(100).backward()
    params = [p for p in model.parameters() if p.grad is not None or getattr(p, "fp8_grad", None) is not None]
    grads = [p.fp8_grad.dequantize() if getattr(p, "fp8_grad", None) is not None else p.grad.clone()
             for p in params]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    payload = model.body[0].weight.fp8_grad.data
    norm = opt.clip_grad_norm_(0.5)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert model.body[0].weight.fp8_grad.data is payload  # only the scale changed
    clipped = [p.fp8_grad.dequantize() if getattr(p, "fp8_grad", None) is not None else p.grad for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    torch.testing.assert_close(total, torch.tensor(0.5), rtol=1e-5, atol=0)
    opt.zero_grad()
    assert model.body[0].weight.fp8_grad is None


def test_engine_skips_a_nonfinite_fp8_o2_step(tmp_path):
    torch.manual_seed(0)
    model = Net()
    cfg = tiny_config(tmp_path, epochs=1, precision="fp8-o2")
    model, opt, _ = precision.wrap(model, build_optimizer(model, cfg.optim), cfg.precision)
    x, y = torch.randn(12, 8), torch.randint(0, 5, (12,))
    poisoned = x[4:8].clone()
    poisoned[0, 0] = math.inf
    train = [(x[:4], y[:4]), (poisoned, y[4:8]), (x[8:], y[8:])]
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient at step 1"):
        result = fit(model, ClassificationTask(), opt, train, [(x, y)], cfg)
    assert result["skipped_steps"] == 1 and result["step"] == 3
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert all(torch.isfinite(v.float()).all() for s in opt.state.values() for v in s.values())


@pytest.mark.slow
def test_fp8_o2_through_the_engine_resumes_identically(tmp_path, monkeypatch):
    """fit() with fp8-o2: accumulation, clipping, skip check and checkpoint path; a killed run resumes exactly."""

    def run(out, model_seed=0):
        cfg = tiny_config(out, epochs=3, accum_steps=2, precision="fp8-o2")
        torch.manual_seed(model_seed)
        model = Net()
        model, opt, autocast = precision.wrap(model, build_optimizer(model, cfg.optim), cfg.precision)
        result = fit(model, ClassificationTask(), opt, *tiny_loaders(16), cfg, autocast=autocast)
        return model, result

    full_model, full = run(tmp_path / "full")
    assert full["skipped_steps"] == 0 and math.isfinite(full["grad_norm"])

    real_summary = loop_module._summary

    def kill_after_epoch_2(row, epochs):
        if row["epoch"] == 2:
            raise KeyboardInterrupt
        return real_summary(row, epochs)

    monkeypatch.setattr(loop_module, "_summary", kill_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.undo()
    ckpt = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert ckpt["optimizers"]["model"]["fp8"]["dtypes"]["exp_avg"] == "float8_e4m3fn"
    resumed_model, resumed = run(tmp_path / "killed", model_seed=99)
    for key in ("train_loss", "val_loss", "grad_norm", "step"):
        assert resumed[key] == full[key], key
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
