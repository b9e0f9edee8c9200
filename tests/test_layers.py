"""Functional core of the window layers: partition / gather / masks / position tables / attention, 2D and
3D."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from swinlab.layers import (
    LOGIT_SCALE_MAX,
    MASK_VALUE,
    DropPath,
    PatchEmbed,
    PatchMerging,
    PatchMergingV2,
    WindowAttentionV1,
    WindowAttentionV2,
    clamp_window,
    from_windows,
    log_spaced_coords,
    merge_2x2,
    relative_position_index,
    to_windows,
    window_geometry,
    window_mask,
    window_partition,
    window_reverse,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize(("grid", "window"), [((8, 12), (4, 6)), ((4, 8, 6), (2, 4, 3))])
def test_partition_reverse_roundtrip(grid, window):
    x = torch.randn(2, *grid, 5)
    windows = window_partition(x, window)
    num_windows = math.prod(g // w for g, w in zip(grid, window, strict=True))
    assert windows.shape == (2, num_windows, math.prod(window), 5)
    # first window is the top-left block, raster order inside it
    block = x[(slice(None), *(slice(0, w) for w in window))]
    assert torch.equal(windows[:, 0], block.reshape(2, -1, 5))
    assert torch.equal(window_reverse(windows, window, grid), x)


def test_partition_rejects_non_multiple():
    with pytest.raises(ValueError, match="not a multiple"):
        window_partition(torch.randn(1, 5, 8, 3), (4, 4))


@pytest.mark.parametrize(
    ("grid", "window", "shift"),
    [
        ((8, 8), (4, 4), (2, 2)),
        ((9, 6), (4, 4), (2, 2)),
        ((5, 7), (4, 4), (0, 0)),
        ((4, 9, 10), (2, 4, 4), (1, 2, 2)),
    ],
)
def test_gather_equals_pad_roll_partition(grid, window, shift):
    x = torch.randn(2, *grid, 3)
    geom = window_geometry(grid, window, shift)
    pads = []
    for g, pg in zip(reversed(grid), reversed(geom.padded), strict=True):
        pads += [0, pg - g]
    padded = F.pad(x.movedim(-1, 1), pads).movedim(1, -1)
    rolled = torch.roll(padded, [-s for s in geom.shift], dims=tuple(range(1, len(grid) + 1)))
    assert torch.equal(to_windows(x, geom), window_partition(rolled, geom.window))
    assert torch.equal(from_windows(to_windows(x, geom), geom), x)


def test_clamp_window_rules():
    # Swin V2: the whole window shrinks to the smallest side and the shift is dropped.
    assert clamp_window((4, 8), (4, 4), (2, 2), per_axis=False) == ((4, 4), (0, 0))
    assert clamp_window((3, 9), (8, 8), (4, 4), per_axis=False) == ((3, 3), (0, 0))
    assert clamp_window((9, 9), (8, 8), (4, 4), per_axis=False) == ((8, 8), (4, 4))
    # Video Swin: per axis.
    assert clamp_window((4, 8, 8), (8, 7, 7), (4, 3, 3), per_axis=True) == ((4, 7, 7), (0, 3, 3))


def test_shift_mask_regions():
    geom = window_geometry((8, 8), (4, 4), (2, 2))
    mask = window_mask(geom, CPU)
    assert mask.shape == (4, 16, 16)
    assert set(mask.unique().tolist()) == {0.0, MASK_VALUE}
    assert (mask[0] == 0).all()  # the top-left window never wraps
    assert (
        (mask[3] != 0).sum() > (mask[1] != 0).sum() > 0
    )  # the corner window mixes 4 regions, an edge window 2
    assert window_mask(window_geometry((8, 8), (4, 4), (0, 0)), CPU) is None


def test_padding_tokens_are_masked():
    geom = window_geometry((5, 4), (4, 4), (0, 0))
    assert geom.padded == (8, 4) and geom.needs_padding
    mask = window_mask(geom, CPU)
    # second window row holds grid row 4 (real) and rows 5-7 (padding)
    assert (mask[1][:4, :4] == 0).all() and (mask[1][:4, 4:] == MASK_VALUE).all()
    assert (mask[0] == 0).all()


def test_unmasked_padding_is_the_official_mask_of_the_padded_grid():
    """``pad_mask=False`` (official Video Swin): no mask at all without a shift; with one, the shift mask of the
    padded size, padding tokens being ordinary keys."""
    assert window_mask(window_geometry((5, 4), (4, 4), (0, 0), pad_mask=False), CPU) is None
    geom = window_geometry((3, 5, 6), (2, 4, 4), (1, 2, 2), per_axis=True, pad_mask=False)
    assert geom.padded == (4, 8, 8) and not geom.pad_mask
    expected = window_mask(window_geometry((4, 8, 8), (2, 4, 4), (1, 2, 2), per_axis=True), CPU)
    assert torch.equal(window_mask(geom, CPU), expected)
    assert not torch.equal(window_mask(window_geometry((3, 5, 6), (2, 4, 4), (1, 2, 2), per_axis=True), CPU), expected)


def test_padded_keys_do_not_influence_real_tokens():
    attn = WindowAttentionV2(8, 2).eval()
    geom = window_geometry((4, 5), (4, 4), (0, 0))
    windows = to_windows(torch.randn(1, 4, 5, 8), geom)
    real = torch.zeros(geom.num_windows, 16, dtype=torch.bool)
    real[0] = True
    real[1, ::4] = True  # the second window holds grid column 4 only
    noisy = windows.clone()
    noisy[0, ~real] = 10 * torch.randn(int((~real).sum()), 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(noisy, geom)[0, real], attn(windows, geom)[0, real])


def test_relative_position_index_layout():
    index = relative_position_index((2, 3, 3), CPU)
    assert index.shape == (18, 18) and index.max() == 3 * 5 * 5 - 1
    # pair (query (1,2,2), key (0,0,0)): offsets (1,2,2) -> ((1+1)*5 + (2+2))*5 + (2+2)
    assert index[17, 0] == (2 * 5 + 4) * 5 + 4
    assert torch.equal(index.diagonal(), torch.full((18,), (1 * 5 + 2) * 5 + 2))


def test_log_spaced_coords():
    table = log_spaced_coords((4, 4), (0, 0), CPU)
    assert table.shape == (7, 7, 2)
    torch.testing.assert_close(table.max(), torch.tensor(math.log2(9) / 3))
    bigger = log_spaced_coords((8, 8), (2, 2), CPU)
    torch.testing.assert_close(bigger.max(), torch.tensor(math.log2(57) / 3))
    # 1-wide window (1x1 stage): the official 0/0 would be NaN; ours is the zero offset table.
    assert torch.equal(log_spaced_coords((1, 1), (0, 0), CPU), torch.zeros(1, 1, 2))


def test_merge_2x2_order_and_odd_padding():
    x = torch.arange(4 * 4, dtype=torch.float).view(1, 4, 4, 1)
    merged = merge_2x2(x)
    assert merged[0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]  # (even,even), (odd,even), (even,odd), (odd,odd)
    odd = merge_2x2(torch.ones(1, 3, 5, 2))
    assert odd.shape == (1, 2, 3, 8) and odd[0, 1, 2].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert PatchMergingV2(2)(torch.randn(1, 3, 5, 2)).shape == (1, 2, 3, 4)
    assert PatchMerging(2)(torch.randn(1, 2, 3, 5, 2)).shape == (1, 2, 2, 3, 4)  # 3D: time kept


def test_patch_embed_pads_and_handles_3d():
    assert PatchEmbed((4, 4), 3, 8)(torch.randn(1, 3, 10, 13)).shape == (1, 3, 4, 8)
    assert PatchEmbed((2, 4, 4), 3, 8)(torch.randn(1, 3, 5, 16, 16)).shape == (1, 3, 4, 4, 8)


def test_drop_path():
    layer = DropPath(0.5)
    x = torch.ones(1000, 3)
    assert torch.equal(layer.eval()(x), x)
    out = layer.train()(x)
    assert set(out[:, 0].unique().tolist()) <= {0.0, 2.0} and (out[:, 0] == 0).any()
    with pytest.raises(ValueError, match="drop path"):
        DropPath(1.0)


def test_drop_path_in_place_matches_and_backpropagates():
    norm = nn.LayerNorm(3)
    x = torch.randn(64, 5, 3, requires_grad=True)
    results = []
    for inplace in (False, True):
        torch.manual_seed(1)
        out = DropPath(0.5, inplace=inplace).train()(norm(x))
        results.append((out, *torch.autograd.grad(out.square().sum(), [x, norm.weight])))
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def _reference_v2(attn, x, geom):
    """Official formula written out with explicit matmuls."""
    b, nw, n, c = x.shape
    h = attn.num_heads
    bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    q, k, v = F.linear(x, attn.qkv.weight, bias).view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logits = logits * torch.clamp(attn.logit_scale, max=LOGIT_SCALE_MAX).exp() + attn.position_bias(geom.window)
    mask = window_mask(geom, x.device)
    if mask is not None:
        logits = logits + mask[:, None]
    out = (logits.softmax(-1) @ v).transpose(2, 3).reshape(b, nw, n, c)
    return attn.proj(out)


@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
def test_v2_attention_matches_explicit_formula(shift):
    attn = WindowAttentionV2(16, 2)
    with torch.no_grad():
        attn.logit_scale[0] = 6.0  # above the clamp
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    geom = window_geometry((8, 8), (4, 4), shift)
    x = to_windows(torch.randn(2, 8, 8, 16), geom)
    torch.testing.assert_close(attn(x, geom), _reference_v2(attn, x, geom), atol=1e-5, rtol=1e-5)
    assert pytest.approx(math.log(100), abs=1e-6) == LOGIT_SCALE_MAX


@pytest.mark.parametrize("shift", [(0, 0), (2, 2)])
def test_v2_attention_gradients_match_explicit_formula(shift):
    """The hand-written backward of the cosine q/k scaling, against autograd through F.normalize (float64)."""
    attn = WindowAttentionV2(16, 2).double().train()
    with torch.no_grad():
        attn.logit_scale[0] = 6.0  # clamped: no gradient reaches this head's scale
        attn.logit_scale[1] = 1.5
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    geom = window_geometry((8, 8), (4, 4), shift)
    x = to_windows(torch.randn(2, 8, 8, 16, dtype=torch.float64), geom)
    x[0, 0, 3] *= 1e-14  # a key with norm below the 1e-12 floor: the clamped branch of the backward
    x.requires_grad_(True)
    weights = torch.randn(2, geom.num_windows, 16, 16, dtype=torch.float64)
    grads = []
    for fn in (attn, lambda x, g: _reference_v2(attn, x, g)):
        params = [x, *attn.parameters()]
        grads.append(torch.autograd.grad((fn(x, geom) * weights).sum(), params, allow_unused=True))
    for name, ours, ref in zip(["x", *dict(attn.named_parameters())], *grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert grads[0][[n for n, _ in attn.named_parameters()].index("logit_scale") + 1][0].abs().max() == 0


def test_v2_bias_cache_invalidated_by_parameter_updates():
    attn = WindowAttentionV2(8, 2).eval()
    geom = window_geometry((4, 4), (4, 4), (0, 0))
    with torch.no_grad():
        first, _ = attn.attention_bias(geom, CPU, torch.float32)
        assert attn.attention_bias(geom, CPU, torch.float32)[0] is first  # cached
        attn.cpb_mlp[2].weight.add_(1.0)
        second, _ = attn.attention_bias(geom, CPU, torch.float32)
    assert second is not first and not torch.equal(second, first)
    attn.train()
    assert attn.attention_bias(geom, CPU, torch.float32)[0].requires_grad  # no cache while training


def test_v1_attention_smaller_window_uses_matching_offsets():
    attn = WindowAttentionV1(8, 2, (2, 4, 4))
    small = attn.position_bias((2, 2, 2))
    table = attn.relative_position_bias_table.view(3, 7, 7, 2)
    # query (1,1,1), key (0,0,0): offset (1,1,1) -> row (1+1, 1+3, 1+3) of the full table
    torch.testing.assert_close(small[:, 7, 0], table[2, 4, 4])
    geom = window_geometry((2, 4, 4), (2, 4, 4), (1, 2, 2), per_axis=True)
    assert attn(to_windows(torch.randn(1, 2, 4, 4, 8), geom), geom).shape == (1, 1, 32, 8)
    # the official slice: the first 8 x 8 pairs of the (2, 4, 4) window's index
    attn.sliced_index = True
    official = table.reshape(-1, 2)[relative_position_index((2, 4, 4), CPU)[:8, :8]].permute(2, 0, 1)
    torch.testing.assert_close(attn.position_bias((2, 2, 2)), official)
    assert not torch.allclose(small, official)
