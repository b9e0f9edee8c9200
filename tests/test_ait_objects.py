"""AiT's object sequences (instance segmentation as tokens): box bins, class, mask codes per object; noise objects,
class corruption and loss weights on the training side; restricted decoding and predictions on the other."""

from __future__ import annotations

import pytest
import torch

from swinlab.ait import ObjectCoder, SoftVQVAE, TaskSolver, Vocabulary
from swinlab.ait.objects import IGNORE_INDEX, crop_masks, paste_masks

H, W = 48, 64
NUM_BINS, NUM_OBJECTS = 64, 6


def _tokenizer() -> SoftVQVAE:
    torch.manual_seed(0)
    return SoftVQVAE(kind="mask", image_size=16, downsample=4, num_codes=16, code_dim=8, width=8, num_res_blocks=1)


def _coder(**kwargs) -> ObjectCoder:
    vocabulary = Vocabulary.official(num_bins=NUM_BINS, num_classes=3, codes={"mask": 16, "depth": 8})
    return ObjectCoder(vocabulary, _tokenizer().eval(), num_objects=NUM_OBJECTS, **kwargs)


def _targets() -> list[dict[str, torch.Tensor]]:
    yy, xx = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    disc = ((xx - 20) ** 2 / 100 + (yy - 20) ** 2 / 64) <= 1
    block = (xx >= 40) & (xx < 60) & (yy >= 10) & (yy < 40)
    small = (xx >= 2) & (xx < 9) & (yy >= 30) & (yy < 45)
    first = {"boxes": torch.tensor([[10.0, 12.0, 30.0, 28.0], [40.0, 10.0, 60.0, 40.0], [2.0, 30.0, 9.0, 45.0]]),
             "labels": torch.tensor([0, 2, 1]), "masks": torch.stack([disc, block, small])}  # fmt: skip
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "masks": torch.zeros(0, H, W).bool(),
    }
    return [first, empty]


def _one_hot(coder: ObjectCoder, ids: torch.Tensor) -> torch.Tensor:
    return torch.full((*ids.shape, coder.vocabulary.size), -40.0).scatter_(2, ids[..., None], 40.0)


def test_crop_then_paste_gives_the_mask_back():
    targets = _targets()[0]
    crops = crop_masks(targets["masks"], targets["boxes"], 32)
    assert crops.shape == (3, 32, 32) and set(crops.unique().tolist()) == {0.0, 1.0}
    assert crops[1].all()  # the block fills its box
    pasted = paste_masks(crops, targets["boxes"], H, W) >= 0.5
    iou = (pasted & targets["masks"]).sum((1, 2)) / (pasted | targets["masks"]).sum((1, 2))
    assert (iou > 0.95).all(), iou
    assert not pasted[0, :, 35:].any()  # nothing outside the box


def test_round_trip_with_one_hot_logits():
    """encode -> targets -> decode: boxes within a bin, true classes with score 1, masks = the tokenizer's hard
    decode of the target codes pasted into the box."""
    coder = _coder()
    targets = _targets()
    seq = coder.encode(targets, H, W, torch.Generator().manual_seed(0))
    assert seq.inputs.shape == seq.targets.shape == (2, NUM_OBJECTS * 21) and coder.per_object == 21
    ids = torch.where(seq.targets == IGNORE_INDEX, seq.inputs, seq.targets)
    predictions = coder.decode(_one_hot(coder, ids), ids, H, W)
    slots = seq.real[0].nonzero().flatten()
    got = predictions[0]
    # which real object sits in which slot: match by the quantised box
    for slot in slots:
        k = int(((coder.quantize(targets[0]["boxes"], H, W) - ids[0].view(NUM_OBJECTS, 21)[slot, :4]) == 0)
                .all(1).nonzero()[0])  # fmt: skip
        bin_size = torch.tensor([W, H, W, H]) / NUM_BINS
        assert ((got["boxes"][slot] - targets[0]["boxes"][k]).abs() <= bin_size / 2 + 1e-4).all()
        assert got["labels"][slot] == targets[0]["labels"][k] and got["scores"][slot] == pytest.approx(1.0)
        codes = ids[0].view(NUM_OBJECTS, 21)[slot, 5:] - coder.codes[0]
        hard = coder.tokenizer.decode_ids(codes[None])[:, 0]
        expected = paste_masks(hard, got["boxes"][slot][None], H, W)[0] >= 0.5
        assert torch.equal(got["masks"][slot], expected)
    noise = ~seq.real[0]
    assert (got["scores"][noise] < 1e-6).all()  # the noise class wins there, and its column is dropped
    assert got["masks"].shape == (NUM_OBJECTS, H, W) and got["masks"].dtype == torch.bool
    assert len(predictions) == 2 and not seq.real[1].any()


def test_noise_objects_supervise_only_their_class():
    coder = _coder()
    seq = coder.encode(_targets(), H, W, torch.Generator().manual_seed(1))
    targets = seq.targets.view(2, NUM_OBJECTS, 21)
    weights = seq.weights.view(2, NUM_OBJECTS, 21)
    real = seq.real
    assert real.sum() == 3 and real[0].sum() == 3
    assert (targets[~real][:, :4] == IGNORE_INDEX).all() and (targets[~real][:, 5:] == IGNORE_INDEX).all()
    assert (targets[~real][:, 4] == coder.noise).all()
    assert (targets[real] != IGNORE_INDEX).all()
    assert ((targets[real][:, 4] >= coder.classes[0]) & (targets[real][:, 4] < coder.classes[1])).all()
    assert torch.equal(weights[real][0], torch.tensor([1.0] * 5 + [0.2] * 16))
    assert (
        (weights[~real][:, 4] == 1).all() and (weights[~real][:, :4] == 0).all() and (weights[~real][:, 5:] == 0).all()
    )
    # inputs hold well-formed tokens everywhere, the real objects' boxes and codes equal their targets
    coder.check(seq.inputs)
    inputs = seq.inputs.view(2, NUM_OBJECTS, 21)
    assert torch.equal(inputs[real][:, :4], targets[real][:, :4]) and torch.equal(
        inputs[real][:, 5:], targets[real][:, 5:]
    )
    assert seq.crops.shape == (3, 16, 16)
    # an empty image is all noise objects; the loss of perfect logits is 0, of uniform ones log V over the weights
    assert coder.token_loss(_one_hot(coder, torch.where(seq.targets < 0, 0, seq.targets)), seq) < 1e-6
    uniform = coder.token_loss(torch.zeros(2, coder.length, coder.vocabulary.size), seq)
    counted = (seq.targets != IGNORE_INDEX).sum()
    expected = seq.weights.sum() / counted * torch.log(torch.tensor(float(coder.vocabulary.size)))
    assert uniform == pytest.approx(float(expected), rel=1e-5)


def test_class_corruption_only_on_inputs():
    coder = _coder()
    targets = [_targets()[0]] * 64
    seq = coder.encode(targets, H, W, torch.Generator().manual_seed(2))
    inputs = seq.inputs.view(64, NUM_OBJECTS, 21)[..., 4]
    truth = seq.targets.view(64, NUM_OBJECTS, 21)[..., 4]
    noise_share = (inputs == coder.noise).float().mean()
    assert 0.4 < noise_share < 0.6, noise_share  # 384 draws of p = 0.5
    corrupted_classes = inputs[inputs != coder.noise]
    assert set((corrupted_classes - coder.classes[0]).unique().tolist()) == {0, 1, 2}
    # the targets keep the true labels: each image's real classes are {0, 1, 2}
    real_truth = truth[seq.real] - coder.classes[0]
    assert sorted(real_truth.view(64, 3)[0].tolist()) == [0, 1, 2] and (truth[~seq.real] == coder.noise).all()
    # shuffling: the real objects do not always come in the same order
    orders = {tuple(row.tolist()) for row in real_truth.view(64, 3)}
    assert len(orders) > 1


def test_same_seed_same_sequences_and_noise_boxes_inside_the_image():
    coder = _coder()
    a = coder.encode(_targets(), H, W, torch.Generator().manual_seed(3))
    b = coder.encode(_targets(), H, W, torch.Generator().manual_seed(3))
    c = coder.encode(_targets(), H, W, torch.Generator().manual_seed(4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and torch.equal(a.crops, b.crops)
    assert not torch.equal(a.inputs, c.inputs)
    boxes = a.inputs.view(2, NUM_OBJECTS, 21)[..., :4]
    assert (boxes >= 0).all() and (boxes <= NUM_BINS).all()
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def test_duplicates_take_the_recropped_mask_random_boxes_an_empty_one(monkeypatch):
    def encoded_noise_crops(ratio: float) -> torch.Tensor:
        coder, seen = _coder(duplicate_ratio=ratio), []
        encode = coder.tokenizer.encode
        monkeypatch.setattr(coder.tokenizer, "encode", lambda x: seen.append(x) or encode(x))
        seq = coder.encode(_targets()[:1], H, W, torch.Generator().manual_seed(5))
        return seen[0][:, 0][~seq.real[0]]

    duplicates = encoded_noise_crops(1.0)
    assert (duplicates.flatten(1).sum(1) > 0).all()  # each a real mask recropped to its jittered box
    assert (encoded_noise_crops(0.0) == 0).all()  # random boxes: empty masks


def test_ids_outside_their_positions_range_are_named():
    coder = _coder()
    seq = coder.encode(_targets(), H, W, torch.Generator().manual_seed(0))
    bad = seq.targets.clone()
    bad[0, 21 + 7] = coder.noise  # a mask position of object 1
    with pytest.raises(ValueError, match=rf"token id {coder.noise} at position 28 \(mask token of object 1\)"):
        coder.token_loss(torch.zeros(2, coder.length, coder.vocabulary.size), seq.__class__(
            seq.inputs, bad, seq.weights, seq.real, seq.crops))  # fmt: skip
    bad = seq.targets.clone()
    bad[1, 4] = coder.codes[0]
    with pytest.raises(ValueError, match=r"at position 4 \(class token of object 0\) lies outside classes"):
        coder.check(bad)
    with pytest.raises(ValueError, match=r"object labels must lie in \[0, 3\)"):
        coder.encode([{**_targets()[0], "labels": torch.tensor([0, 3, 1])}], H, W, torch.Generator())
    depth = SoftVQVAE(kind="depth", image_size=16, downsample=4, num_codes=16, code_dim=8, width=8)
    with pytest.raises(TypeError, match="needs a mask tokenizer, got a depth tokenizer"):
        ObjectCoder(coder.vocabulary, depth)


def test_restricted_generation_gives_well_formed_objects():
    coder = _coder()
    torch.manual_seed(0)
    solver = TaskSolver(
        "swinv2_tiny_window8_256", coder.vocabulary, prompts=("mask",), max_length=coder.length, dim=32, heads=4,
        hidden=64, encoder_layers=1, decoder_layers=1, dropout=0.0, drop_path=0.0,
        backbone_kwargs={"img_size": 32, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4},
    ).eval()  # fmt: skip
    with torch.no_grad():  # a bias that makes one id win everywhere unless the restriction holds
        solver.output_bias[coder.codes[0] + 3] = 100.0
    images = torch.randn(2, 3, 32, 32)
    allowed, soft = coder.allowed(), coder.soft_positions()
    logits, ids = solver.generate_tokens(images, "mask", coder.length, allowed, soft=soft)
    assert logits.shape == (2, coder.length, coder.vocabulary.size) and ids.shape == (2, coder.length)
    coder.check(ids)
    per_object = ids.view(2, NUM_OBJECTS, 21)
    assert (per_object[..., 5:] == coder.codes[0] + 3).all() and (per_object[..., :5] != coder.codes[0] + 3).all()
    assert torch.isinf(logits[0, 0, coder.codes[0]]) and torch.isinf(logits[0, 5, 0])
    uncached = solver.generate_tokens(images, "mask", coder.length, allowed, soft=soft, use_cache=False)
    assert torch.equal(uncached[1], ids) and torch.allclose(uncached[0], logits, atol=1e-4)
    sampled = [
        solver.generate_tokens(images, "mask", 42, allowed, top_p=0.9, generator=torch.Generator().manual_seed(s))[1]
        for s in (0, 0, 1)
    ]
    assert torch.equal(sampled[0], sampled[1])
    coder.check(torch.cat((sampled[2], ids[:, 42:]), dim=1))
    predictions = coder.decode(logits, ids, 32, 32)
    assert all(((p["boxes"] >= 0) & (p["boxes"] <= 32)).all() for p in predictions)
    with pytest.raises(ValueError, match=r"allowed must be a \(P, "):
        solver.generate_tokens(images, "mask", 4, allowed.float())


def test_area_order_writes_the_largest_box_first():
    coder = _coder(order="area")
    for seed in range(3):
        seq = coder.encode(_targets(), H, W, torch.Generator().manual_seed(seed))
        boxes = coder.dequantize(seq.targets.view(2, NUM_OBJECTS, 21)[0, :3, :4], H, W)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert area.tolist() == sorted(area.tolist(), reverse=True) and seq.real[0, :3].all()
    with pytest.raises(ValueError, match=r"object order must be one of \('random', 'area'\), got 'size'"):
        _coder(order="size")
