"""FP8 formats, saturating casts, scale selection, delayed/current scaling, non-finite detection, ScaledFP8."""

import math

import pytest
import torch

from swinlab.fp8 import E4M3, E5M2, ScaledFP8, ScalingMeta, compute_scale, quantize, saturating_cast
from swinlab.fp8.formats import amax, get_format
from swinlab.metrics import relative_l2_error

ONE = torch.ones(())


def current_quantize(x: torch.Tensor, fmt) -> ScaledFP8:
    return quantize(x, fmt, compute_scale(amax(x), fmt, 0, ONE))


@pytest.mark.parametrize(("fmt", "l2_bound"), [(E4M3, 0.03), (E5M2, 0.06)])
def test_round_trip_error_bounds(fmt, l2_bound):
    x = torch.randn(64, 64) * 3.0
    q = current_quantize(x, fmt)
    back = q.dequantize()
    assert relative_l2_error(back, x) < l2_bound
    # Round-to-nearest: every value in the normal range is within half a unit in the last place.
    normal = (x * q.scale).abs() >= torch.finfo(fmt.dtype).tiny
    rel = ((back - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= 2.0 ** -(fmt.mantissa_bits + 1)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_saturating_cast_clamps_both_formats(fmt):
    x = torch.tensor([1e6, -1e6, math.inf, -math.inf, fmt.max, 1.0, math.nan])
    out = saturating_cast(x, fmt).float()
    expected = torch.tensor([fmt.max, -fmt.max, fmt.max, -fmt.max, fmt.max, 1.0])
    assert torch.equal(out[:-1], expected)
    assert math.isnan(float(out[-1]))


def test_torch_cast_overflow_behaviour_is_as_documented():
    """Pins what torch does without our clamp: e4m3fn saturates (Inf too), e5m2 overflows to Inf."""
    assert float(torch.tensor(math.inf).to(torch.float8_e4m3fn).float()) == 448.0
    assert float(torch.tensor(1000.0).to(torch.float8_e4m3fn).float()) == 448.0
    assert math.isinf(float(torch.tensor(70000.0).to(torch.float8_e5m2).float()))
    assert float(saturating_cast(torch.tensor(70000.0), E5M2).float()) == E5M2.max


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
@pytest.mark.parametrize("margin", [0, 1, 3])
def test_scale_is_power_of_two_and_fills_range(fmt, margin):
    amaxes = torch.tensor([1e-30, 3e-7, 0.1, 1.0, 447.9, 448.0, 1000.0, 57344.0, 3e20])
    for a in amaxes:
        scale = compute_scale(a, fmt, margin, ONE)
        assert float(a * scale) <= fmt.max / 2**margin
        assert float(a * scale) > fmt.max / 2 ** (margin + 1)
        assert math.log2(float(scale)).is_integer()


def test_scale_keeps_previous_for_zero_or_nonfinite_amax():
    previous = torch.tensor(8.0)
    for bad in (0.0, math.inf, math.nan):
        assert float(compute_scale(torch.tensor(bad), E4M3, 0, previous)) == 8.0


def test_format_constants():
    assert (E4M3.max, E5M2.max) == (torch.finfo(torch.float8_e4m3fn).max, torch.finfo(torch.float8_e5m2).max)
    assert (E4M3.tiny, E5M2.tiny) == (2.0**-9, 2.0**-16)
    assert float(torch.tensor(E4M3.tiny).to(E4M3.dtype).float()) == E4M3.tiny


def test_get_format_rejects_unknown_name():
    assert get_format("e5m2") is E5M2
    with pytest.raises(ValueError, match="e3m4"):
        get_format("e3m4")


def test_current_scaling_tracks_each_tensor():
    meta = ScalingMeta(E4M3, policy="current")
    small, big = torch.randn(32), torch.randn(32) * 100
    for x in (small, big, small):
        scale, _ = meta.observe(x)
        assert torch.equal(scale, compute_scale(amax(x), E4M3, 0, ONE))


def test_delayed_scaling_uses_history_and_ages_out():
    meta = ScalingMeta(E4M3, history_len=3, policy="delayed")
    small = torch.full((8,), 1.0)
    big = torch.full((8,), 100.0)
    first, _ = meta.observe(small)  # empty history: falls back to current scaling
    assert torch.equal(first, compute_scale(torch.tensor(1.0), E4M3, 0, ONE))
    stale, _ = meta.observe(big)  # uses the scale from the history (amax 1): big saturates
    assert torch.equal(stale, first)
    assert float(quantize(big, E4M3, stale).dequantize().max()) < 100.0
    big_scale = compute_scale(torch.tensor(100.0), E4M3, 0, ONE)
    assert torch.equal(meta.scale, big_scale)  # next cast is ready for the spike
    for _ in range(3):
        scale, _ = meta.observe(small)
        assert torch.equal(scale, big_scale)  # the spike rules the next 3 casts (window of 3) ...
    assert torch.equal(meta.scale, first)  # ... and then ages out
    assert meta.amax_history.tolist() == [1.0, 1.0, 1.0]


def test_saturation_and_underflow_flags_from_amax_before_cast():
    meta = ScalingMeta(E4M3, history_len=2)
    meta.observe(torch.full((4,), 1.0))
    assert not bool(meta.found_saturation | meta.found_underflow)
    meta.observe(torch.full((4,), 1000.0))  # stale scale 256: 256000 > 448, clipped
    assert bool(meta.found_saturation) and not bool(meta.found_underflow)
    meta.clear_flags()
    meta.observe(torch.full((4,), 1e-7))  # scale 2**-2 from the 1000 in the window: 2.5e-8 -> 0
    assert bool(meta.found_underflow) and not bool(meta.found_saturation)
    meta.clear_flags()
    meta.observe(torch.zeros(4))  # an all-zero tensor is not an underflow
    assert not bool(meta.found_underflow)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_source_is_flagged_not_recorded(bad):
    meta = ScalingMeta(E4M3, history_len=4)
    meta.observe(torch.full((4,), 2.0))
    kept = meta.scale.clone()
    x = torch.tensor([1.0, bad, 3.0])
    scale, source_amax = meta.observe(x)
    assert bool(meta.found_nonfinite)
    assert not bool(torch.isfinite(source_amax))
    assert torch.equal(meta.scale, kept) and torch.equal(scale, kept)
    assert int(meta.steps) == 0 and float(meta.amax_history.abs().sum()) == 0.0  # window reset
    payload = quantize(x, E4M3, scale).dequantize()
    if not math.isnan(bad):
        assert bool(torch.isfinite(payload).all())  # the cast alone would hide the Inf: the flag is the signal
    meta.clear_flags()
    assert not bool(meta.found_nonfinite)
    meta.observe(torch.full((4,), 64.0))  # recovers: next finite cast re-derives its scale
    assert torch.equal(meta.scale, compute_scale(torch.tensor(64.0), E4M3, 0, ONE))


def test_meta_validation_errors():
    with pytest.raises(ValueError, match="policy"):
        ScalingMeta(E4M3, policy="lazy")
    with pytest.raises(ValueError, match="history_len"):
        ScalingMeta(E4M3, history_len=0)
    with pytest.raises(ValueError, match="margin"):
        ScalingMeta(E4M3, margin=-1)


def test_meta_state_dict_round_trip():
    meta = ScalingMeta(E5M2, history_len=4)
    for value in (1.0, 5.0, 2.0):
        meta.observe(torch.full((3,), value))
    other = ScalingMeta(E5M2, history_len=4)
    other.load_state_dict(meta.state_dict())
    assert torch.equal(other.amax_history, meta.amax_history)
    assert torch.equal(other.scale, meta.scale) and int(other.steps) == 3
    assert set(meta.state_dict()) == {"scale", "amax_history", "steps"}


def test_scaled_fp8_storage_and_checks():
    x = torch.randn(8, 16)
    q = current_quantize(x, E4M3)
    assert q.data.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert q.nbytes == 8 * 16 + 4
    assert q.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(q.t().dequantize(), q.dequantize().t())
    with pytest.raises(TypeError, match="e5m2"):
        ScaledFP8(q.data, q.scale, E5M2)
    with pytest.raises(TypeError, match="scale"):
        ScaledFP8(q.data, q.scale.double(), E4M3)
