"""AiT task-solver: shared vocabulary, cached / uncached / parallel decoding, soft tokens, auxiliary loss."""

import math
from pathlib import Path

import pytest
import torch

from swinlab.ait import SoftVQVAE
from swinlab.ait.aux_loss import aux_loss, dice_loss, freeze_tokenizer
from swinlab.ait.solver import TaskSolver, nucleus_sample
from swinlab.ait.vocabulary import Vocabulary
from swinlab.data.depth import ProceduralDepth
from swinlab.models.swin import SwinTransformerV2

TOKENS = 16  # a 32 px depth map at downsample 8: 4 x 4 codes


def tiny_backbone() -> SwinTransformerV2:
    return SwinTransformerV2(
        img_size=32, embed_dim=16, depths=(1, 1, 1), num_heads=(2, 2, 4), window_size=2, num_classes=0
    )


def tiny_vocabulary() -> Vocabulary:
    return Vocabulary.official(num_bins=20, num_classes=3, codes={"mask": 8, "depth": 16})


def tiny_solver(**kwargs) -> TaskSolver:
    options = dict(prompts=("depth",), max_length=TOKENS, dim=32, heads=4, hidden=64, encoder_layers=1)
    options.update(dropout=0.0, drop_path=0.0, decoder_layers=2)
    return TaskSolver(tiny_backbone(), tiny_vocabulary(), **{**options, **kwargs})


def varied(solver: TaskSolver) -> TaskSolver:
    """Weights far from the 0.02 initialisation, so an untrained solver's greedy tokens vary by position."""
    with torch.no_grad():
        for name, p in solver.named_parameters():
            p.normal_(0, 1.0 if name.endswith("_embed") else 0.3)
    return solver.eval()


def tiny_tokenizer() -> SoftVQVAE:
    return SoftVQVAE(
        kind="depth",
        image_size=32,
        downsample=8,
        num_codes=16,
        code_dim=8,
        width=8,
        num_res_blocks=1,
        codebook_init="official",
    )


def depth_batch(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [ProceduralDepth(n, 32, 0)[i] for i in range(n)]
    images = torch.stack([rgb for rgb, _ in samples]).float() / 255
    images = (images - images.mean((0, 2, 3), keepdim=True)) / images.std((0, 2, 3), keepdim=True)
    return images, torch.stack([depth for _, depth in samples])


# ------------------------------------------------------------------------------------------------- vocabulary
def test_official_layout_matches_the_reference_ids():
    v = Vocabulary.official()
    assert v.size == 2339
    assert v.span("classes") == (2001, 2081) and v.span("noise") == (2082, 2083)
    assert v.task_span("mask") == (2083, 2211) and v.task_span("depth") == (2211, 2339)


def test_overlapping_layout_names_both_ranges():
    with pytest.raises(ValueError, match=r"'bins' = \[0, 10\) and 'depth' = \[5, 20\) overlap"):
        Vocabulary({"bins": (0, 10), "depth": (5, 20)}, tasks=("depth",))
    with pytest.raises(ValueError, match="empty"):
        Vocabulary({"bins": (3, 3)})
    with pytest.raises(ValueError, match=r"\['depth'\] are not in the vocabulary layout"):
        Vocabulary({"bins": (0, 10)}, tasks=("depth",))


def test_id_outside_task_range_names_id_and_range():
    v = tiny_vocabulary()
    start, stop = v.task_span("depth")
    assert torch.equal(v.to_codes("depth", v.from_codes("depth", torch.tensor([0, 15]))), torch.tensor([0, 15]))
    with pytest.raises(ValueError, match=rf"token id {start - 1} lies outside task 'depth'.*\[{start}, {stop}\)"):
        v.to_codes("depth", torch.tensor([start, start - 1]))
    with pytest.raises(ValueError, match=r"depth codes must lie in \[0, 16\)"):
        v.from_codes("depth", torch.tensor([16]))
    solver = tiny_solver()
    with pytest.raises(ValueError, match="outside task 'depth'"):
        solver.loss(torch.zeros(1, 2, v.size), torch.tensor([[start, 3]]), "depth")


def test_backbone_by_registered_name_feeds_its_last_stage():
    solver = TaskSolver(
        "swinv2_tiny_window8_256",
        tiny_vocabulary(),
        dim=32,
        heads=4,
        hidden=64,
        encoder_layers=1,
        decoder_layers=1,
        max_length=4,
        backbone_kwargs={"img_size": 64, "depths": (1, 1, 1, 1)},
    )
    assert solver.backbone.num_features == 768 and solver.encode(torch.randn(1, 3, 64, 64)).shape == (1, 4, 32)
    with pytest.raises(ValueError, match="backbone_kwargs"):
        TaskSolver(solver.backbone, tiny_vocabulary(), backbone_kwargs={"img_size": 64})
    with pytest.raises(KeyError, match="no prompt for task 'mask'"):
        solver.generate(torch.randn(1, 3, 64, 64), "mask", 2)


def test_loss_over_the_task_codes_only():
    solver = tiny_solver()
    start, stop = solver.vocabulary.task_span("depth")
    logits = torch.randn(2, 3, solver.vocabulary.size)
    targets = torch.tensor([[start, start + 5, -100], [stop - 1, start, start + 2]])
    codes = torch.tensor([[0, 5, -100], [15, 0, 2]])
    expected = torch.nn.functional.cross_entropy(logits[..., start:stop].flatten(0, 1), codes.flatten())
    torch.testing.assert_close(solver.loss(logits, targets, "depth", over="task"), expected)
    full = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(solver.loss(logits, targets, "depth"), full)


# ------------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("soft_input", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_decoding_equals_uncached(soft_input, dtype):
    """Same tokens exactly; the logits differ only by rounding (a GEMM's row depends on the row count on this
    CPU: 5e-7 for one 32-wide Linear), which float64 shrinks to ~1e-15."""
    solver = varied(tiny_solver()).to(dtype)
    images = torch.randn(2, 3, 32, 32, dtype=dtype)
    logits, codes = solver.generate(images, "depth", TOKENS, soft_input=soft_input)
    ref_logits, ref_codes = solver.generate(images, "depth", TOKENS, soft_input=soft_input, use_cache=False)
    assert torch.equal(codes, ref_codes)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    assert logits.shape == (2, TOKENS, 16) and len(codes.unique()) > 1


def test_cached_decoding_equals_teacher_forcing_on_its_own_output():
    """The step-by-step positions and prompt line up with the training forward's."""
    solver = varied(tiny_solver())
    images = torch.randn(2, 3, 32, 32)
    logits, codes = solver.generate(images, "depth", TOKENS)
    assert len(codes.unique()) > 1
    forced = solver(images, "depth", solver.vocabulary.from_codes("depth", codes))
    torch.testing.assert_close(solver.code_logits(forced, "depth"), logits, rtol=0, atol=1e-5)


def test_nucleus_sampling_keeps_the_top_p_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(nucleus_sample(logits, 0.0), torch.zeros(4000, dtype=torch.long))
    drawn = nucleus_sample(logits, 0.6, g)  # mass ranked above: 0, 0.5, 0.8, 0.95
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.03, share
    solver = varied(tiny_solver())
    images = torch.randn(2, 3, 32, 32)
    runs = [
        solver.generate(images, "depth", TOKENS, top_p=0.9, generator=torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0][1], runs[1][1]) and not torch.equal(runs[0][1], runs[2][1])
    cached = solver.generate(images, "depth", TOKENS, top_p=0.9, generator=torch.Generator().manual_seed(1))
    uncached = solver.generate(
        images, "depth", TOKENS, top_p=0.9, generator=torch.Generator().manual_seed(1), use_cache=False
    )
    assert torch.equal(cached[1], uncached[1])


def test_parallel_mode_shapes_and_one_step_reduces_loss():
    solver = tiny_solver(parallel=True)
    images = torch.randn(2, 3, 32, 32)
    targets = solver.vocabulary.from_codes("depth", torch.randint(0, 16, (2, TOKENS)))
    opt = torch.optim.SGD(solver.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        logits = solver(images, "depth", targets)
        assert logits.shape == (2, TOKENS, solver.vocabulary.size)
        loss = solver.loss(logits, targets, "depth")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    code_logits, codes = solver.eval().generate(images, "depth", TOKENS)
    assert code_logits.shape == (2, TOKENS, 16) and codes.shape == (2, TOKENS)


def test_soft_decode_at_zero_temperature_equals_hard_decode():
    """τ multiplies the logits (an inverse temperature): temperature 1/τ → 0 is the hard decode."""
    tokenizer = freeze_tokenizer(tiny_tokenizer())
    solver = varied(tiny_solver())
    logits, codes = solver.generate(torch.randn(2, 3, 32, 32), "depth", TOKENS)
    hard = tokenizer.decode_ids(codes)
    torch.testing.assert_close(tokenizer.decode_soft(logits, tau=1e4), hard, rtol=0, atol=1e-5)
    assert torch.equal(tokenizer.decode_soft(logits, tau=math.inf), hard)
    assert not torch.allclose(tokenizer.decode_soft(logits, tau=1.0), hard, atol=1e-3)


# ------------------------------------------------------------------------------------------------- aux loss
def test_aux_loss_needs_a_frozen_tokenizer_and_reaches_the_logits():
    tokenizer = tiny_tokenizer()
    _, depth = depth_batch()
    logits = torch.randn(2, TOKENS, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="freeze_tokenizer"):
        aux_loss(tokenizer, logits, depth)
    freeze_tokenizer(tokenizer)
    loss = aux_loss(tokenizer, logits, depth, tau=0.8)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad.abs().sum() > 0
    assert all(p.grad is None for p in tokenizer.parameters())


def test_mask_aux_loss_is_dice_plus_mse():
    tokenizer = freeze_tokenizer(SoftVQVAE(kind="mask", image_size=16, downsample=4, num_codes=8, code_dim=4, width=4))
    logits = torch.randn(3, 16, 8)
    masks = (torch.rand(3, 16, 16) > 0.5).float()
    pred = tokenizer.decode_soft(logits)[:, 0]
    clipped = pred.clamp(0, 1)
    dice = 1 - (2 * (clipped * masks).sum((1, 2)) + 1) / (clipped.sum((1, 2)) + masks.sum((1, 2)) + 1)
    expected = dice.mean() + ((pred - masks) ** 2).mean()
    torch.testing.assert_close(aux_loss(tokenizer, logits, masks), expected)
    # an overshooting prediction is clipped to 1 first: a perfect mask, not a penalty (official)
    assert dice_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == 0.0


def test_depth_tokenizer_and_solver_round_trip():
    """GT depth -> tokenizer codes -> teacher-forced solver training -> decoded tokens -> depth through the
    tokenizer: a few steps on two scenes make the greedy decode reproduce the target codes."""
    tokenizer = freeze_tokenizer(tiny_tokenizer())
    images, depth = depth_batch()
    solver = tiny_solver()
    targets = solver.vocabulary.from_codes("depth", tokenizer.encode(depth).flatten(1))
    opt = torch.optim.AdamW(solver.parameters(), lr=3e-3)
    for _ in range(100):
        logits = solver(images, "depth", targets)
        loss = solver.loss(logits, targets, "depth") + aux_loss(tokenizer, solver.code_logits(logits, "depth"), depth)
        opt.zero_grad()
        loss.backward()
        opt.step()
    code_logits, codes = solver.eval().generate(images, "depth", TOKENS)
    assert torch.equal(solver.vocabulary.from_codes("depth", codes), targets)
    assert torch.equal(tokenizer.decode_ids(codes), tokenizer.decode_ids(tokenizer.encode(depth)))
    decoded = tokenizer.decode_soft(code_logits, tau=0.8)
    assert decoded.shape == depth.shape and torch.isfinite(decoded).all()


# ------------------------------------------------------------------------------------------------- official parity
class FeaturesIn(torch.nn.Module):
    """Stands in for the backbone so the head reads the recorded backbone features as they are."""

    def forward_features(self, x: torch.Tensor, return_map: bool = True) -> torch.Tensor:
        return x


def test_head_matches_the_official_artransformer():
    """A case recorded from the official ``ARTransformer`` (1 + 2 blocks, width 16, vocabulary of 50 ids, depth
    codes 34..49, random weights of std 0.3): teacher-forced, AR (hard and soft inputs) and AiT-P logits."""
    case = torch.load(Path(__file__).parent / "fixtures" / "ait_head_official_small.pt", weights_only=True)
    cfg = case["config"]
    vocabulary = Vocabulary.official(cfg["num_bins"], cfg["num_classes"], {"mask": 8, "depth": 16})
    backbone = SwinTransformerV2(img_size=32, embed_dim=cfg["in_chans"], depths=(1,), num_heads=(2,), num_classes=0)
    solver = TaskSolver(
        backbone, vocabulary, prompts=("det", "insseg", "depth", "other"), max_length=cfg["dec_length"],
        dim=cfg["d_model"], heads=cfg["nhead"], hidden=cfg["dim_feedforward"], encoder_layers=1, decoder_layers=2,
        dropout=0.0, drop_path=0.0, parallel=True,
    )  # fmt: skip
    solver.load_official_head(case["state_dict"])
    solver.backbone = FeaturesIn()
    feats, targets, n = case["features"], case["targets"], cfg["dec_length"]
    tol = dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(solver(feats, "depth", targets), case["parallel_logits"], **tol)
    logits, codes = solver.eval().generate(feats, "depth", n)
    torch.testing.assert_close(logits, case["parallel_ar"][0], **tol)
    assert torch.equal(codes, case["parallel_ar"][1])
    solver.parallel = False
    torch.testing.assert_close(solver.train()(feats, "depth", targets), case["forced_logits"], **tol)
    for mode in ("hard", "soft"):
        logits, codes = solver.eval().generate(feats, "depth", n, soft_input=mode == "soft")
        torch.testing.assert_close(logits, case[f"ar_{mode}"][0], **tol)
        assert torch.equal(codes, case[f"ar_{mode}"][1]), mode
    with pytest.raises(KeyError, match=r"unknown key 'head\.bias'"):
        solver.load_official_head({"head.bias": torch.zeros(1)})
    learned = {**case["state_dict"], "enc_embed": torch.randn_like(case["state_dict"]["enc_embed"])}
    with pytest.raises(ValueError, match="not the fixed 2-D sine table"):
        solver.load_official_head(learned)
