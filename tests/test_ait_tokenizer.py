"""AiT's SoftVQVAE tokenizer: parity with the official code (the shared depth case and a small instance-mask case
recorded from the official classes), soft decoding, the EMA codebook rule, mask augmentation, codebook health and
the errors that name bad input."""

import math
from pathlib import Path

import pytest
import torch

import swinlab
from swinlab.ait import SoftVQVAE, mask_patches, official_geometry
from swinlab.models.checkpoints import load_official

MASK_FIXTURE = Path(__file__).parent / "fixtures" / "ait_mask_vqvae_small.pt"
"""Recorded from the unmodified official classes at AiT 3527d50 (64 px is the released size; this one is 32 px,
downsample 8, width 2, 24 codes of 8 dims, so that it stays small); its ``meta`` says how."""


def _close(actual, expected, rtol, atol=0.0):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def _grads_close(model, grads):
    for name, expected in grads.items():
        got = model.get_parameter(name).grad
        _close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _official(case: dict) -> SoftVQVAE:
    vae = SoftVQVAE.from_official(case["config"])
    report = load_official(vae, case["state_dict"], strict=True)
    assert not report.missing and not report.unexpected
    return vae


@pytest.fixture(scope="module")
def depth_case(golden_dir):
    return torch.load(golden_dir / "ait_depth_vqvae.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def mask_case():
    return torch.load(MASK_FIXTURE, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------ parity
def test_golden_depth_eval(depth_case):
    g = depth_case
    vae = _official(g).eval()
    x = g["input"]
    ids = vae.encode(x)
    assert ids.dtype == torch.int64 and torch.equal(ids, g["indices"])
    with torch.no_grad():
        _close(vae.encoder(x), g["z_e"], rtol=1e-4, atol=2e-4)
        out = vae(x)
        _close(vae._vq_vae(vae.encoder(x)).latents, g["quantized"], rtol=0, atol=1e-5)
        # The official code run on this CPU differs from the recording (another CPU) by up to 1.3e-5 on values up to
        # 14 — exactly as this implementation does (bit-identical to it here): atol 1e-5 plus rtol 1e-4.
        _close(out["output"], g["reconstruction"], rtol=1e-4, atol=1e-5)
        _close(vae.decode_ids(ids), g["hard_decode"], rtol=1e-4, atol=1e-5)
        _close(vae.decode_ids(g["head_tokens"])[:, 0], g["head_hard_decode"], rtol=1e-4, atol=1e-5)
        _close(vae.decode_soft(g["soft_logits"])[:, 0], g["soft_decode"], rtol=1e-4, atol=1e-5)
        _close(vae.decode_soft(g["soft_logits"], 0.8)[:, 0], g["soft_decode"], rtol=1e-4, atol=1e-5)  # the case's τ
        probs = torch.softmax(0.8 * g["soft_logits"], -1).transpose(1, 2).reshape(2, 128, 8, 8)
        _close(vae._vq_vae.embed_soft(probs), g["soft_embed"], rtol=1e-5, atol=1e-5)
    for key, ref in (("loss", "total"), ("recon_loss", "recon"), ("vq_loss", "vq"), ("perplexity", "perplexity")):
        _close(out[key], g[f"eval_{ref}_loss" if key != "perplexity" else "eval_perplexity"], rtol=1e-5)
    assert torch.equal(vae.encode(x).flatten(1), g["head_tokens"])


def test_golden_depth_train_step(depth_case):
    g, t = depth_case, depth_case["train"]
    vae = SoftVQVAE.from_official(g["config"])
    vae.load_state_dict(g["state_dict"], strict=True)
    out = vae.train()(t["input"], t["label"])
    out["loss"].backward()
    assert torch.equal(out["ids"], t["indices"])
    for key, ref in (("loss", "total_loss"), ("recon_loss", "recon_loss"), ("vq_loss", "vq_loss")):
        _close(out[key], t[ref], rtol=1e-5)
    _close(out["perplexity"], t["perplexity"], rtol=1e-5)
    _close(out["output"], t["output"], rtol=1e-4, atol=1e-5)
    vq = vae._vq_vae
    _close(vq._ema_cluster_size, t["ema_cluster_size_after"], rtol=1e-5)
    _close(vq._ema_w, t["ema_w_after"], rtol=1e-5, atol=1e-5)
    _close(vq._embedding, t["embedding_after"], rtol=1e-5, atol=1e-5)
    _grads_close(vae, t["grads"])


def test_official_mask_case(mask_case):
    c = mask_case
    vae = _official(c).eval()
    assert vae.kind == "mask" and vae.use_norm
    x = c["input"]  # stored as bool: binary masks are accepted as such
    assert torch.equal(vae.encode(x), c["ids"])
    with torch.no_grad():
        out = vae(x)
        for key, ref in (("loss", "total"), ("recon_loss", "recon"), ("vq_loss", "vq"), ("perplexity", "perplexity")):
            _close(out[key], c["eval"][ref], rtol=1e-5)
        _close(out["output"], c["eval"]["output"], rtol=1e-4, atol=1e-5)
        _close(vae.decode_ids(c["ids"]), c["hard_decode"], rtol=1e-4, atol=1e-5)
        _close(vae.decode_ids(c["ids"].flatten(1))[:, 0], c["head_decode"], rtol=1e-4, atol=1e-5)
        _close(vae.decode_soft(c["soft_logits"], tau=1.0)[:, 0], c["soft_decode"], rtol=1e-4, atol=1e-5)
    train = SoftVQVAE.from_official(c["config"])
    train.load_state_dict(c["state_dict"], strict=True)
    out = train.train()(x)
    out["loss"].backward()
    _close(out["loss"], c["train"]["total"], rtol=1e-5)
    _close(out["recon_loss"], c["train"]["recon"], rtol=1e-5)
    _close(out["output"], c["train"]["output"], rtol=1e-4, atol=1e-5)
    state = train.state_dict()
    for name, expected in c["train"]["buffers_after"].items():
        _close(state[name], expected, rtol=1e-5, atol=1e-6)
    _grads_close(train, c["train"]["grads"])


def test_wrapped_official_checkpoint_loads(mask_case):
    """The official training scripts save ``{'weights': ddp_model.state_dict()}`` (``module.`` keys)."""
    wrapped = {"weights": {f"module.{k}": v for k, v in mask_case["state_dict"].items()}}
    vae = SoftVQVAE.from_official(mask_case["config"])
    load_official(vae, wrapped, strict=True)
    assert torch.equal(vae.encode(mask_case["input"]), mask_case["ids"])


def test_task_head_config_builds_the_same_tokenizer(depth_case, tmp_path):
    """AiT's heads describe the tokenizer by token_length / mask_size / decoder top width (golden ``head_config``)."""
    path = tmp_path / "vqvae_depth.pt"
    torch.save({"weights": {f"module.{k}": v for k, v in depth_case["state_dict"].items()}}, path)
    head = SoftVQVAE.from_official_head({**depth_case["head_config"], "pretrained": str(path)})
    assert head.kind == "depth" and head.tau == 0.8 and not head.training
    assert not any(p.requires_grad for p in head.parameters())
    assert official_geometry(head.state_dict()) == official_geometry(depth_case["state_dict"])
    assert torch.equal(head.encode(depth_case["input"][:, 0]).flatten(1), depth_case["head_tokens"])
    with torch.no_grad():
        _close(head.decode_soft(depth_case["soft_logits"])[:, 0], depth_case["soft_decode"], rtol=1e-4, atol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        SoftVQVAE.from_official_head({**depth_case["head_config"], "pretrained": str(tmp_path / "missing.pt")})
    with pytest.raises(ValueError, match="did you mean 'token_length'"):
        SoftVQVAE.from_official_head({"token_lenght": 16})


def test_float64_matches_float32_ids(depth_case):
    vae = _official(depth_case).double()
    assert torch.equal(vae.encode(depth_case["input"].double()), depth_case["indices"])


# ------------------------------------------------------------------------------------------------ soft tokens
def _small(kind="depth", **kw) -> SoftVQVAE:
    """A small tokenizer whose weights are spread out (a fresh init leaves most decoder ReLUs off)."""
    args = {"image_size": 32, "downsample": 8, "num_codes": 16, "code_dim": 8, "width": 4, "num_res_blocks": 1}
    vae = SoftVQVAE(kind, **{**args, **kw}).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1 * torch.randn_like(p))
    return vae


def _depth(b=2, h=32, w=32) -> torch.Tensor:
    return 0.5 + 9 * torch.rand(b, 1, h, w)


def test_soft_decode_cold_limit_is_the_hard_decode():
    """τ multiplies the logits (official; the golden case records τ = 0.8 so), an inverse temperature: the hard decode
    is the limit of temperature 1/τ → 0 and τ = inf is it exactly; τ = 0 mixes every code evenly."""
    vae = _small(codebook_init="official")
    logits = 3 * torch.randn(2, 16, 16)
    with torch.no_grad():
        hard = vae.decode_ids(logits.argmax(-1))
        # equal up to the decoder's rounding of a channels-last vs a contiguous latent map (as the official paths)
        torch.testing.assert_close(vae.decode_soft(logits, tau=1e4), hard, rtol=1e-5, atol=1e-6)
        assert torch.equal(vae.decode_soft(logits, tau=math.inf), hard)
        assert not torch.allclose(vae.decode_soft(logits, tau=1.0), hard, atol=1e-3)
        mean = vae._vq_vae.codebook.mean(0).view(1, -1, 1, 1).expand(2, -1, 4, 4)
        torch.testing.assert_close(vae.decode_soft(logits, tau=0.0), vae.decode_latents(mean))
        # the official depth heads' formula, softmax(0.8 · logits)
        official = vae.decode_latents(
            vae._vq_vae.embed_soft(torch.softmax(logits.transpose(1, 2).view(2, 16, 4, 4) * 0.8, 1))
        )
        torch.testing.assert_close(vae.decode_soft(logits, tau=0.8), official, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"tau \(the logits' multiplier\) must be >= 0"):
        vae.decode_soft(logits, tau=-1.0)


def test_soft_decode_is_differentiable_in_logits():
    vae = _small(codebook_init="official").requires_grad_(False)
    logits = torch.randn(1, 16, 16, requires_grad=True)
    vae.decode_soft(logits).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ EMA codebook
def test_ema_update_follows_the_official_rule():
    vae = _small(codebook_init="official", dead_code_threshold=0.0)
    vq = vae._vq_vae
    vq._ema_cluster_size.uniform_(0.5, 4.0)
    before = {k: v.clone() for k, v in vae.state_dict().items() if k.startswith("_vq_vae")}
    x = _depth()
    with torch.no_grad():
        z = vae.encoder(x)
        eval_out = vae(x)  # eval mode: no update
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(vae.encode(x), eval_out["ids"])
    out = vae.train()(x)
    # ids and losses come from the codebook as it was before the step
    assert torch.equal(out["ids"], eval_out["ids"])
    torch.testing.assert_close(out["loss"], eval_out["loss"])
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).double()
    onehot = torch.nn.functional.one_hot(eval_out["ids"].flatten(), 16).double()
    size = before["_vq_vae._ema_cluster_size"].double() * 0.99 + 0.01 * onehot.sum(0)
    n = size.sum()
    size = (size + 1e-5) / (n + 16 * 1e-5) * n
    ema_w = before["_vq_vae._ema_w"].double() * 0.99 + 0.01 * onehot.T @ flat
    torch.testing.assert_close(vq._ema_cluster_size.double(), size, rtol=1e-6, atol=0)
    torch.testing.assert_close(vq._ema_w.double(), ema_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq._embedding.double(), ema_w / size[:, None], rtol=1e-5, atol=1e-6)
    counts = onehot.sum(0) / onehot.shape[0]
    perplexity = torch.exp(-(counts * torch.log(counts + 1e-10)).sum())
    torch.testing.assert_close(out["perplexity"].double(), perplexity)
    assert out["usage"].item() == pytest.approx((counts > 0).sum().item() / 16)


def test_data_init_and_dead_code_reseeding():
    vae = _small(codebook_init="data", dead_code_threshold=1.0).train()
    vq = vae._vq_vae
    assert not vq._ema_cluster_size.any()
    x = _depth(4)
    out = vae(x)  # the first call seeds every code from the batch's encoder outputs before the search
    assert out["usage"] > 1 / 16 and (vq._ema_cluster_size > 0).all()
    # a code far from every encoder output, its EMA size below the threshold: replaced by an encoder output
    with torch.no_grad():
        vq._embedding[3] = 1e6
        vq._ema_cluster_size[3] = 0.5
        vq._ema_w[3] = 1e6 * 0.5
        z = vae.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)
    out = vae(x)
    assert out["reseeded"] >= 1 and 3 not in out["ids"]
    assert torch.cdist(vq._embedding[3:4], z).min() == 0
    assert vq._ema_cluster_size[3] == 1.0
    torch.testing.assert_close(vq._ema_w[3], vq._embedding[3])


def test_official_init_collapses_where_data_init_does_not():
    """The official N(0, 1) init: every code unused in the first step jumps to ~1e5 (m / N with N ≈ 1e-5)."""
    torch.manual_seed(1)
    official = _small(codebook_init="official", dead_code_threshold=0.0).train()
    x = _depth(4)
    official(x)
    assert official._vq_vae._embedding.abs().max() > 1e3
    healthy = _small(codebook_init="data").train()
    healthy(x)
    assert healthy._vq_vae._embedding.abs().max() < 1e3


def test_learned_codebook_losses():
    vae = _small(ema_decay=0.0).train()
    x = _depth()
    out = vae(x)
    with torch.no_grad():
        z = vae.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)
        codes = vae._vq_vae.codebook[out["ids"].flatten()]
        expected = 1.25 * ((codes - z) ** 2).mean()
    torch.testing.assert_close(out["vq_loss"], expected)
    out["loss"].backward()
    assert vae._vq_vae._embedding.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ mask augmentation
def test_mask_patches_counts_and_cells():
    x = _depth(3, 64, 48)
    gen = torch.Generator().manual_seed(0)
    masked, keep = mask_patches(x, ratio=0.5, patch=16, generator=gen)
    cells = keep[:, 0, ::16, ::16]
    assert cells.shape == (3, 4, 3)
    assert (cells.flatten(1).sum(1) == 12 - math.ceil(0.5 * 12)).all()
    assert torch.equal(keep, cells.repeat_interleave(16, 1).repeat_interleave(16, 2).unsqueeze(1))
    assert torch.equal(masked, x * keep)
    again, _ = mask_patches(x, 0.5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)


def test_masked_training_loss_only_on_valid_label_pixels():
    vae = _small(codebook_init="official").train()
    label = _depth()
    label[:, :, :5] = 0.0  # sensor holes
    masked, keep = mask_patches(label, ratio=0.5, patch=8)
    out = vae(masked, label)
    valid = label > 0
    expected = ((label - out["output"])[valid] ** 2).mean()
    torch.testing.assert_close(out["recon_loss"], expected)
    grad = torch.autograd.grad(out["recon_loss"], out["output"])[0]
    assert (grad[~valid] == 0).all() and (grad[valid & (keep == 0)] != 0).any()


# ------------------------------------------------------------------------------------------------ registry
def test_registered_official_sizes():
    depth = swinlab.create_model("ait_depth_vqvae")
    mask = swinlab.create_model("ait_insseg_vqvae")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (depth.grid, mask.grid) == ((15, 15), (4, 4))
    assert (count(depth.encoder), count(depth.decoder)) == (3_320_560, 4_368_641)
    assert (count(mask.encoder), count(mask.decoder)) == (861_936, 1_123_457)
    assert official_geometry(depth.state_dict())["downsample"] == 32
    # the vae_cfg of AiT's released depth and instance-segmentation configs describe the same two tokenizers
    depth_head = {"token_length": 225, "mask_size": 480, "embedding_dim": 512, "hidden_dim": 256, "num_embeddings": 128}
    mask_head = {"token_length": 16, "mask_size": 64, "embedding_dim": 512, "hidden_dim": 128, "num_embeddings": 128}
    for model, head in ((depth, {**depth_head, "use_norm": False, "tau": 0.8}), (mask, mask_head)):
        built = SoftVQVAE.from_official_head(head)
        assert official_geometry(built.state_dict()) == official_geometry(model.state_dict())
        assert (built.kind, built.tau, built.grid) == (model.kind, model.tau, model.grid)


# ------------------------------------------------------------------------------------------------ errors
def test_depth_input_errors():
    vae = _small()
    with pytest.raises(TypeError, match="millimetres"):
        vae.encode((1000 * _depth()).to(torch.int32))
    with pytest.raises(ValueError, match=r"must be \(B, 1, H, W\)"):
        vae.encode(_depth().expand(2, 2, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the tokenizer's downsampling 8"):
        vae.encode(_depth(2, 36, 32))
    with pytest.raises(ValueError, match="finite and >= 0"):
        vae.encode(-_depth())
    empty = _depth()
    empty[1] = 0
    with pytest.raises(ValueError, match="depth map 1 of the batch has no valid pixel"):
        vae.encode(empty)
    with pytest.raises(ValueError, match="depth label 1 of the batch has no valid pixel"):
        vae.train()(_depth(), empty)


def test_mask_input_and_token_errors():
    vae = _small("mask")
    with pytest.raises(ValueError, match=r"values must lie in \[0, 1\]"):
        vae.encode(torch.full((1, 32, 32), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        vae.decode_ids(torch.full((1, 4, 4), 16))
    with pytest.raises(ValueError, match=r"must be \(B, N, 16\)"):
        vae.decode_soft(torch.randn(1, 16, 12))
    with pytest.raises(ValueError, match="neither"):
        vae.decode_soft(torch.randn(1, 15, 16))


def test_configuration_errors():
    with pytest.raises(ValueError, match="image size 100 is not a multiple of the tokenizer's downsampling 32"):
        SoftVQVAE(image_size=100)
    with pytest.raises(ValueError, match="power of two"):
        SoftVQVAE(image_size=96, downsample=12)
    with pytest.raises(ValueError, match="did you mean 'residul_type'"):
        SoftVQVAE.from_official({"residual_type": "v1"})
    with pytest.raises(ValueError, match="use_norm maps 0 to -1"):
        SoftVQVAE.from_official({"loss_type": "mse_ignore_zero", "use_norm": True})
    with pytest.raises(ValueError, match="regression"):
        SoftVQVAE.from_official({"train_objective": "classification"})


def test_depth_checkpoint_into_mask_tokenizer_is_named():
    depth_state = swinlab.create_model("ait_depth_vqvae").state_dict()
    mask = swinlab.create_model("ait_insseg_vqvae")
    message = r"checkpoint holds a depth tokenizer \(downsample 32.*this model is a mask tokenizer \(downsample 16"
    with pytest.raises(ValueError, match=message):
        load_official(mask, depth_state, strict=True)
    with pytest.raises(ValueError, match=message):
        mask.load_state_dict(depth_state)


def test_si_log_loss_matches_the_official_formula():
    vae = _small(loss="si_log")
    with torch.no_grad():
        vae.decoder[-1].bias += 20.0  # positive predictions: the log is defined everywhere
    label = _depth()
    label[:, :, :3] = 0.0
    out = vae(label)
    valid = label > 0
    assert (out["output"] > 0).all()
    diff = torch.log(label[valid]) - torch.log(out["output"][valid])
    expected = torch.sqrt(diff.pow(2).mean() - 0.5 * diff.mean().pow(2))
    torch.testing.assert_close(out["recon_loss"], expected)


def test_shapes_only_forward_on_the_meta_device():
    """``swinlab info`` measures models on the meta device: no check or statistic may need values."""
    with torch.device("meta"):
        vae = swinlab.create_model("ait_depth_vqvae", image_size=64)
        out = vae(torch.empty(1, 1, 64, 64))
    assert out["ids"].shape == (1, 2, 2) and out["output"].shape == (1, 1, 64, 64)


def test_code_search_under_autocast_runs_in_the_codebook_dtype():
    # encode() of a bf16 run: bf16 distances would tie and reorder near codes
    torch.manual_seed(0)
    codebook = _small(num_codes=512)._vq_vae
    with torch.no_grad():
        codebook.codebook.copy_(torch.randn_like(codebook.codebook))  # 49 of 4096 ids differ in a bf16 search
    z = torch.randn(64, 8, 8, 8).bfloat16()
    expected = codebook.nearest(z.float().permute(0, 2, 3, 1).reshape(-1, 8)).view(64, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(codebook.ids(z), expected)
