"""AiT's instance segmentation as tokens (the sequence format of the official insseg head): every object is a short
run of tokens in the shared vocabulary — its box as four coordinate bins, its class, then the frozen mask
tokenizer's codes of its mask cropped to the box — and an image is a fixed number of such runs.

Building a training sequence (:meth:`ObjectCoder.encode`): the objects are shuffled (a fresh order every call;
optionally sorted by box area instead, see :data:`ORDERS`), then padded to ``num_objects`` with *noise objects*
(Pix2Seq's sequence augmentation): random boxes, or jittered duplicates of real boxes. The targets supervise the
real objects fully; for a noise object only its class, as the noise label (its box and mask targets are ignored).
Every input class token is corrupted — a random class or the noise label, even odds — while the target keeps the
true class, so the solver cannot copy classes forward. Tokens are weighted box 1, class 1, mask 0.2 (official).

Box coordinates are normalised per axis: ``x / W`` and ``y / H`` of the image the solver sees, times ``num_bins``,
rounded and clamped to ``[0, num_bins]`` (the official code divides by the padded 640 px side, the same for a
square input). Masks are cropped to their box RoIAlign-style (one bilinear sample at the centre of each cell of a
``mask_size`` grid over the box), binarised at 0.5 and encoded by the tokenizer; decoding pastes the tokenizer's
soft decode back with the inverse bilinear sampling and thresholds it at 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swinlab.ait.tokenizer import SoftVQVAE
from swinlab.ait.vocabulary import Vocabulary

__all__ = ["ObjectCoder", "ObjectSequences", "crop_masks", "paste_masks"]

IGNORE_INDEX = -100
TASK = "mask"
BOX_TOKENS = 4
CLASS_POSITION = 4
ORDERS = ("random", "area")
"""How real objects are ordered in a sequence: ``random`` (official: a fresh permutation every time) or ``area``
(largest box first, ties by the random draw; not official: a fixed rule spares a small model the choice of which
object to write first)."""


def _sample_grid(boxes: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    """``(n, size, size, 2)`` grid_sample coordinates (align_corners=False) of the cell centres of a ``size`` x
    ``size`` grid laid over each box (pixel-edge coordinates, ``(x1, y1, x2, y2)``) in an ``height`` x ``width``
    image."""
    steps = (torch.arange(size, dtype=boxes.dtype, device=boxes.device) + 0.5) / size
    x = boxes[:, 0, None] + steps * (boxes[:, 2] - boxes[:, 0])[:, None]
    y = boxes[:, 1, None] + steps * (boxes[:, 3] - boxes[:, 1])[:, None]
    gx, gy = 2 * x / width - 1, 2 * y / height - 1
    return torch.stack((gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)), dim=-1)


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Binary ``(n, size, size)`` float crops of masks ``(n, H, W)`` to their boxes ``(n, 4)`` (xyxy pixels):
    RoIAlign-like bilinear sampling at the centre of each cell, then thresholded at 0.5."""
    if masks.ndim != 3 or boxes.shape != (masks.shape[0], 4):
        raise ValueError(
            f"crop_masks needs masks (n, H, W) and boxes (n, 4), got {tuple(masks.shape)}, {tuple(boxes.shape)}"
        )
    if not masks.shape[0]:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    grid = _sample_grid(boxes.float(), size, *masks.shape[-2:])
    sampled = F.grid_sample(masks[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (sampled[:, 0] >= 0.5).float()


def paste_masks(crops: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`crop_masks`: ``(n, height, width)`` soft masks of box crops ``(n, S, S)`` pasted
    into their boxes with bilinear sampling (zero outside the box); threshold the result for binary masks."""
    if not crops.shape[0]:
        return crops.new_zeros((0, height, width))
    b = boxes.float()
    px = (torch.arange(width, dtype=b.dtype, device=b.device) + 0.5)[None] - b[:, 0, None]
    py = (torch.arange(height, dtype=b.dtype, device=b.device) + 0.5)[None] - b[:, 1, None]
    gx = 2 * px / (b[:, 2] - b[:, 0]).clamp_min(1e-6)[:, None] - 1
    gy = 2 * py / (b[:, 3] - b[:, 1]).clamp_min(1e-6)[:, None] - 1
    grid = torch.stack((gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)), dim=-1)
    return F.grid_sample(crops[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


@dataclass(frozen=True)
class ObjectSequences:
    """A batch of training sequences: ``inputs`` (teacher-forced ids, classes corrupted) and ``targets`` (``-100``
    where ignored) ``(B, L)``, per-token loss ``weights`` ``(B, L)``, ``real`` ``(B, num_objects)`` marking the
    slots that hold real objects, and ``crops`` ``(n, S, S)`` — the binary box crops of those real objects in
    slot order (``real.nonzero()``), the auxiliary mask loss's targets."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    real: torch.Tensor
    crops: torch.Tensor

    def to(self, device: torch.device | str) -> ObjectSequences:
        return ObjectSequences(
            *(t.to(device) for t in (self.inputs, self.targets, self.weights, self.real, self.crops))
        )


class ObjectCoder:
    """Objects <-> token sequences of ``num_objects`` runs of ``4 + 1 + T`` tokens (T = the mask tokenizer's
    grid cells; 21 for the official 4 x 4), in a vocabulary with ``bins``, ``classes``, ``noise`` and ``mask``
    ranges (:meth:`Vocabulary.official`). See the module docstring for the format and its augmentations."""

    def __init__(
        self,
        vocabulary: Vocabulary,
        tokenizer: SoftVQVAE,
        num_objects: int = 100,
        weights: tuple[float, float, float] = (1.0, 1.0, 0.2),
        duplicate_ratio: float = 0.5,
        jitter: float = 0.1,
        order: str = "random",
    ) -> None:
        if tokenizer.kind != TASK:
            raise TypeError(f"instance segmentation needs a mask tokenizer, got a {tokenizer.kind} tokenizer")
        if vocabulary.num_codes(TASK) != tokenizer.num_codes:
            raise ValueError(
                f"the vocabulary has {vocabulary.num_codes(TASK)} mask codes, the tokenizer {tokenizer.num_codes}"
            )
        if num_objects < 1:
            raise ValueError(f"num_objects must be >= 1, got {num_objects}")
        if order not in ORDERS:
            raise ValueError(f"object order must be one of {ORDERS}, got {order!r}")
        self.vocabulary, self.tokenizer, self.num_objects = vocabulary, tokenizer, num_objects
        self.bins, self.classes = vocabulary.span("bins"), vocabulary.span("classes")
        self.noise, self.codes = vocabulary.span("noise")[0], vocabulary.task_span(TASK)
        self.num_bins = self.bins[1] - self.bins[0] - 1
        self.num_classes = self.classes[1] - self.classes[0]
        self.mask_size = tokenizer.image_size
        self.mask_tokens = tokenizer.grid[0] * tokenizer.grid[1]
        self.per_object = BOX_TOKENS + 1 + self.mask_tokens
        self.length = num_objects * self.per_object
        self.duplicate_ratio, self.jitter, self.order = duplicate_ratio, jitter, order
        self.token_weights = torch.tensor([weights[0]] * BOX_TOKENS + [weights[1]] + [weights[2]] * self.mask_tokens)

    # ------------------------------------------------------------------------------------------- layout
    def allowed(self) -> torch.Tensor:
        """``(per_object, V)`` bool: the ids each position of an object may hold (box -> bins, class -> classes
        and noise, mask -> the mask codes); :meth:`TaskSolver.generate_tokens` decodes under it."""
        allowed = torch.zeros(self.per_object, self.vocabulary.size, dtype=torch.bool)
        allowed[:BOX_TOKENS, slice(*self.bins)] = True
        allowed[CLASS_POSITION, slice(*self.classes)] = True
        allowed[CLASS_POSITION, self.noise] = True
        allowed[CLASS_POSITION + 1 :, slice(*self.codes)] = True
        return allowed

    def soft_positions(self) -> torch.Tensor:
        """``(per_object,)`` bool: the mask-code positions (where AiT's soft next-token input applies)."""
        return torch.arange(self.per_object) > CLASS_POSITION

    def check(self, ids: torch.Tensor) -> None:
        """Every id of ``(B, L)`` sequences (but ``-100``) is one its position allows, or a ``ValueError`` naming the
        id, the position and the range."""
        if ids.ndim != 2 or ids.shape[1] != self.length:
            raise ValueError(f"object sequences must be (B, {self.length}), got {tuple(ids.shape)}")
        allowed = self.allowed().to(ids.device)[torch.arange(self.length, device=ids.device) % self.per_object]
        ok = (ids == IGNORE_INDEX) | allowed.gather(1, ids.clamp(0, self.vocabulary.size - 1).T).T
        ok &= (ids == IGNORE_INDEX) | ((ids >= 0) & (ids < self.vocabulary.size))
        if not ok.all():
            b, i = (int(v) for v in (~ok).nonzero()[0])
            slot, pos = divmod(i, self.per_object)
            kind = "box" if pos < BOX_TOKENS else "class" if pos == CLASS_POSITION else "mask"
            ranges = {"box": f"bins {self.bins}", "class": f"classes {self.classes} or noise {self.noise}",
                      "mask": f"mask codes {self.codes}"}  # fmt: skip
            raise ValueError(
                f"token id {int(ids[b, i])} at position {i} ({kind} token of object {slot}) lies outside {ranges[kind]}"
            )

    # ------------------------------------------------------------------------------------------- boxes
    def quantize(self, boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bin ids of xyxy pixel boxes ``(n, 4)``: ``round(x / width * num_bins)`` (y by ``height``), clamped."""
        scale = boxes.new_tensor([width, height, width, height], dtype=torch.float32)
        bins = torch.round(boxes.float() / scale * self.num_bins).clamp(0, self.num_bins).long()
        return bins + self.bins[0]

    def dequantize(self, ids: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """xyxy pixel boxes of bin ids ``(..., 4)``."""
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=ids.device)
        return (ids - self.bins[0]).float() / self.num_bins * scale

    # ------------------------------------------------------------------------------------------- encoding
    def _noise_boxes(
        self, boxes: torch.Tensor, n: int, height: int, width: int, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` noise boxes and the real object each duplicates (``-1``: none): jittered duplicates of real
        ``boxes`` (share ``duplicate_ratio``, when there are real ones; each side moved by a normal offset of
        σ = jitter / 2 of the box's size, truncated at ± jitter) or random boxes (uniform centre and size)."""
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        centre, size = torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g)
        noise = torch.cat((centre - size / 2, centre + size / 2), dim=1).clamp(0, 1) * scale
        source = torch.full((n,), -1)
        if len(boxes):
            picked = torch.randint(len(boxes), (n,), generator=g)
            wh = (boxes[picked, 2:] - boxes[picked, :2]).repeat(1, 2)
            offset = (torch.randn(n, 4, generator=g) * self.jitter / 2).clamp(-self.jitter, self.jitter) * wh
            duplicate = torch.rand(n, generator=g) < self.duplicate_ratio
            noise = torch.where(duplicate[:, None], boxes[picked] + offset, noise)
            source = torch.where(duplicate, picked, -1)
        lo, hi = torch.minimum(noise[:, :2], noise[:, 2:]), torch.maximum(noise[:, :2], noise[:, 2:])
        return torch.cat((lo, hi), dim=1).clamp_min(0).minimum(scale), source

    def encode(
        self, targets: Sequence[Mapping[str, torch.Tensor]], height: int, width: int, generator: torch.Generator
    ) -> ObjectSequences:
        """Training sequences of per-image targets (``boxes`` (n, 4) xyxy pixels, ``labels`` (n,) in
        ``[0, num_classes)``, ``masks`` (n, H, W) bool, of a ``height`` x ``width`` image), real objects in
        ``order``. Objects beyond ``num_objects`` are dropped (a random subset: the first after the shuffle). Every
        random draw comes from ``generator`` (CPU), so a seeded generator gives the same sequences. A noise object's
        input mask tokens encode the mask of the object it duplicates recropped to its box, or an empty mask."""
        g, k = generator, self.num_objects
        boxes_all, classes_in, classes_out, crops, real = [], [], [], [], []
        for target in targets:
            labels = target["labels"].cpu().long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"object labels must lie in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
                )
            order = torch.randperm(len(labels), generator=g)[:k]
            boxes = target["boxes"].cpu().float()
            if self.order == "area":
                area = (boxes[order, 2] - boxes[order, 0]) * (boxes[order, 3] - boxes[order, 1])
                order = order[area.argsort(descending=True, stable=True)]
            boxes, labels, masks = boxes[order], labels[order], target["masks"].cpu()[order]
            n = len(labels)
            noise, source = self._noise_boxes(boxes, k - n, height, width, g)
            empty = masks.new_zeros((1, *masks.shape[1:]))
            noise_masks = torch.cat((masks, empty))[torch.where(source < 0, n, source)]
            boxes = torch.cat((boxes, noise))
            crops.append(crop_masks(torch.cat((masks, noise_masks)), boxes, self.mask_size))
            boxes_all.append(self.quantize(boxes, height, width))
            random_class = torch.randint(*self.classes, (k,), generator=g)
            classes_in.append(torch.where(torch.rand(k, generator=g) < 0.5, random_class, self.noise))
            classes_out.append(torch.cat((labels + self.classes[0], torch.full((k - n,), self.noise))))
            real.append(torch.arange(k) < n)
        crop = torch.cat(crops)
        device = self.tokenizer.encoder[0].weight.device
        codes = self.vocabulary.from_codes(TASK, self.tokenizer.encode(crop[:, None].to(device)).flatten(1).cpu())
        codes, box_ids, is_real = codes.view(len(targets), k, -1), torch.stack(boxes_all), torch.stack(real)
        inputs = torch.cat((box_ids, torch.stack(classes_in)[..., None], codes), dim=2).flatten(1)
        kept = is_real[..., None]
        out = torch.cat(
            (torch.where(kept, box_ids, IGNORE_INDEX), torch.stack(classes_out)[..., None],
             torch.where(kept, codes, IGNORE_INDEX)), dim=2,
        ).flatten(1)  # fmt: skip
        weights = torch.where(out == IGNORE_INDEX, 0.0, self.token_weights.repeat(k)[None])
        return ObjectSequences(inputs, out, weights, is_real, crop.view(len(targets), k, *crop.shape[1:])[is_real])

    # ------------------------------------------------------------------------------------------- losses
    def token_loss(self, logits: torch.Tensor, seq: ObjectSequences) -> torch.Tensor:
        """Weighted cross-entropy over the vocabulary: ``Σ w·CE / (number of supervised tokens)`` (official)."""
        self.check(seq.targets)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), seq.targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")  # fmt: skip
        counted = (seq.targets != IGNORE_INDEX).sum().clamp_min(1)
        return (ce * seq.weights.flatten().to(ce)).sum() / counted

    def mask_logits(self, logits: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """The mask-code logits ``(n, T, K)`` of vocabulary logits ``(B, L, V)``: every object, or the slots
        ``real`` ``(B, num_objects)`` marks, in slot order."""
        per_object = logits.unflatten(1, (self.num_objects, self.per_object))
        codes = per_object[:, :, CLASS_POSITION + 1 :, slice(*self.codes)]
        return codes.flatten(0, 1) if real is None else codes[real]

    # ------------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode(
        self, logits: torch.Tensor, ids: torch.Tensor, height: int, width: int, tau: float | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image predictions of generated sequences (vocabulary ``logits`` (B, L, V) and ``ids`` (B, L)):
        ``boxes`` (N, 4) xyxy pixels from the bins (corners sorted), ``scores`` and ``labels`` (N,) — the best class
        of the softmax over classes and noise with the noise column dropped — and ``masks`` (N, H, W) bool: the
        soft decode (``tau``) of the mask-code logits pasted into the box, thresholded at 0.5."""
        self.check(ids)
        b = ids.shape[0]
        per_object = ids.view(b, self.num_objects, self.per_object)
        boxes = self.dequantize(per_object[..., :BOX_TOKENS], height, width)
        lo, hi = boxes[..., :2], boxes[..., 2:]
        boxes = torch.cat((torch.minimum(lo, hi), torch.maximum(lo, hi)), dim=-1)
        class_logits = logits.unflatten(1, (self.num_objects, self.per_object))[:, :, CLASS_POSITION]
        columns = torch.cat((torch.arange(*self.classes), torch.tensor([self.noise]))).to(logits.device)
        probs = class_logits[..., columns].float().softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        crops = self.tokenizer.decode_soft(self.mask_logits(logits).float(), tau)[:, 0]
        masks = paste_masks(crops, boxes.flatten(0, 1), height, width) >= 0.5
        masks = masks.view(b, self.num_objects, height, width)
        return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i], "masks": masks[i]} for i in range(b)]
