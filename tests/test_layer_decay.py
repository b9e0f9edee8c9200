"""Layer-wise learning-rate decay: the official SimMIM per-block layer ids, checked against values worked out by hand
for small Swins (2D, video), and how the scales reach the optimizer's groups."""

from __future__ import annotations

import pytest
import torch

from swinlab.config import ConfigError, OptimConfig
from swinlab.engine.optim import build_optimizer, param_groups, swin_layer_ids
from swinlab.engine.schedule import LRSchedule, build_schedule
from swinlab.models.swin import SwinTransformerV2
from swinlab.models.video_swin import VideoSwinClassifier
from swinlab.recipe import load_config


def _small_swin(**kwargs) -> SwinTransformerV2:
    # depths 2, 1, 3: blocks numbered 1-2 | 3 | 4-6; the last id is 6 + 1 = 7
    return SwinTransformerV2(
        img_size=32, embed_dim=8, depths=(2, 1, 3), num_heads=(1, 2, 4), window_size=4, num_classes=5, **kwargs
    )


# By hand, from the official rule: patch embedding 0; block j of stage i -> blocks before stage i + j + 1; stage i's
# downsample -> the id of its last block; everything else -> sum(depths) + 1.
HAND_IDS = {
    "patch_embed.proj.weight": 0,
    "patch_embed.norm.bias": 0,
    "layers.0.blocks.0.attn.qkv.weight": 1,
    "layers.0.blocks.1.mlp.fc2.bias": 2,
    "layers.0.downsample.reduction.weight": 2,
    "layers.0.downsample.norm.weight": 2,
    "layers.1.blocks.0.attn.cpb_mlp.0.weight": 3,
    "layers.1.downsample.reduction.weight": 3,
    "layers.2.blocks.0.norm1.weight": 4,
    "layers.2.blocks.1.attn.logit_scale": 5,
    "layers.2.blocks.2.mlp.fc1.weight": 6,
    "norm.weight": 7,
    "head.weight": 7,
    "head.bias": 7,
}


def test_swin_layer_ids_match_the_official_rule_worked_by_hand():
    model = _small_swin(ape=True)
    ids, last = swin_layer_ids(model)
    assert last == 7
    for name, expected in HAND_IDS.items():
        assert ids[name] == expected, name
    assert ids["absolute_pos_embed"] == 7  # the official rule's "everything else", not the stem
    assert set(ids) == {name for name, _ in model.named_parameters()}


def test_extra_norms_share_their_blocks_id():
    model = SwinTransformerV2(img_size=32, embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=4,
                              num_classes=0, extra_norm_period=1)  # fmt: skip
    ids, _ = swin_layer_ids(model)
    assert ids["layers.0.extra_norms.1.weight"] == ids["layers.0.blocks.1.norm1.weight"] == 2
    assert ids["layers.1.extra_norms.0.weight"] == 3


def test_video_swin_ids_are_counted_inside_the_backbone():
    model = VideoSwinClassifier(num_classes=3, embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=(2, 2, 2),
                                patch_size=(2, 4, 4), clip_size=(4, 16, 16))  # fmt: skip
    ids, last = swin_layer_ids(model)
    assert last == 4
    assert ids["backbone.patch_embed.proj.weight"] == 0
    assert ids["backbone.layers.0.blocks.0.attn.qkv.weight"] == 1
    assert ids["backbone.layers.0.downsample.reduction.weight"] == 1
    assert ids["backbone.layers.1.blocks.1.mlp.fc1.weight"] == 3
    assert ids["backbone.norm.weight"] == ids["cls_head.fc_cls.weight"] == 4


def test_param_groups_scale_by_decay_and_lr_mult():
    model = _small_swin()
    groups = param_groups(model, 0.05, lr_mult={"cpb_mlp": 10.0}, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert scale[id(params["patch_embed.proj.weight"])] == 0.5**7
    assert scale[id(params["layers.0.blocks.1.mlp.fc2.weight"])] == 0.5**5
    assert scale[id(params["layers.1.blocks.0.attn.cpb_mlp.0.weight"])] == 10.0 * 0.5**4
    assert scale[id(params["head.weight"])] == 1.0
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(params["layers.0.blocks.1.mlp.fc2.weight"])] == 0.05  # the weight-decay split still holds
    assert decay[id(params["layers.0.blocks.1.mlp.fc2.bias"])] == 0.0
    # off by default: one scale for everything
    assert {g["lr_scale"] for g in param_groups(model, 0.05)} == {1.0}


def test_layer_decay_errors():
    with pytest.raises(ValueError, match=r"optim\.layer_decay needs per-block layer ids.*Linear.*no Swin stages"):
        build_optimizer(torch.nn.Linear(3, 3), OptimConfig(layer_decay=0.75))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        param_groups(_small_swin(), 0.05, layer_decay=1.5)
    with pytest.raises(ConfigError, match=r"optim\.layer_decay=0\.0: must be > 0 and <= 1"):
        load_config(None, ["optim.layer_decay=0.0"])


def test_multistep_schedule():
    cfg = OptimConfig(lr=1.0, warmup_lr=0.0, warmup_epochs=1, schedule="multistep", milestones=(3, 5), gamma=0.1)
    schedule = build_schedule(cfg, steps_per_epoch=2, epochs=6)
    lrs = [schedule.lr_at(step) for step in range(12)]
    assert lrs[:2] == [0.0, 0.5]  # warm-up over the first epoch
    assert lrs[2:6] == [1.0] * 4
    torch.testing.assert_close(lrs[6:], [0.1] * 4 + [0.01] * 2)  # from epoch 3 (step 6) on, then epoch 5 (step 10)
    with pytest.raises(ValueError, match="needs milestones"):
        LRSchedule(lr=1, min_lr=0, warmup_lr=0, warmup_steps=0, total_steps=4, kind="multistep")
