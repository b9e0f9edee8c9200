"""Hugging Face ``transformers`` Swin V2 weights -> the official microsoft/Swin-Transformer key layout.

Why: most users get Swin V2 weights from the Hugging Face hub, in transformers' layout (``Swinv2Model``,
``Swinv2ForImageClassification``, ``Swinv2ForMaskedImageModeling``). Converting them to the official layout lets
:func:`swinlab.models.checkpoints.load_official` stay the one loader (window / resolution adaptation, reports,
strict checks) for every source. Pure functions over state dicts; transformers itself is never imported.

Facts read from transformers' ``models/swinv2/modeling_swinv2.py`` (5.x) and checked against its outputs in
``tests/test_hf_keys.py``:

* attention projections are three Linears ``query`` / ``key`` / ``value``; ``key`` never has a bias, ``query``
  and ``value`` have one when ``qkv_bias`` -> official ``qkv.weight`` (rows q, k, v), ``q_bias``, ``v_bias``;
* ``layernorm_before`` / ``layernorm_after`` are applied to the branch outputs (res-post-norm) exactly as the
  official ``norm1`` / ``norm2``; ``continuous_position_bias_mlp`` is ``cpb_mlp`` (same indices 0 and 2);
* the patch-embedding LayerNorm is ``embeddings.norm``; the mask token ``embeddings.mask_token`` (1, 1, C) is
  applied after it, as in the official ``SwinTransformerV2ForSimMIM``;
* ``relative_coords_table`` / ``relative_position_index`` are derived buffers (non-persistent in 5.x, present in
  some older files): dropped, swinlab rebuilds them;
* ``embeddings.position_embeddings`` (``use_absolute_embeddings``) has N + 1 rows (a class-token slot Swin does not
  have) and transformers' forward cannot add it to the N patch tokens, so no working weights of that kind exist:
  such a dict is rejected rather than converted by guesswork.

Where transformers' model itself differs from the official one (weights convert all the same):

* a token grid that is not a window multiple is zero-padded and the padded tokens are attended as keys (swinlab
  masks them; the official classifier rejects such inputs), so outputs agree only where the window divides the grid;
* the shifted-window mask is added twice (-200 instead of -100): no visible effect in float32;
* ``attention_probs_dropout_prob`` also drops the attention output projection (official: ``drop_rate``); training
  only;
* ``Swinv2ForMaskedImageModeling``: the loss is the official one without target normalisation (which the official
  Swin V2 recipe enables), ``encoder_stride`` is configurable (official: 32), the token map is assumed square.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_BLOCK_HF = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_BLOCK = r"layers.\1.blocks.\2."

_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"embeddings\.norm\.", "patch_embed.norm."),
        (r"embeddings\.mask_token$", "mask_token"),
        (_BLOCK_HF + r"layernorm_before\.", _BLOCK + "norm1."),
        (_BLOCK_HF + r"layernorm_after\.", _BLOCK + "norm2."),
        (_BLOCK_HF + r"attention\.self\.logit_scale$", _BLOCK + "attn.logit_scale"),
        (_BLOCK_HF + r"attention\.self\.continuous_position_bias_mlp\.", _BLOCK + "attn.cpb_mlp."),
        # q / k / v weights keep a per-projection name here and are fused by _fuse_qkv
        (_BLOCK_HF + r"attention\.self\.(query|key|value)\.weight$", _BLOCK + r"attn.\3.weight"),
        (_BLOCK_HF + r"attention\.self\.query\.bias$", _BLOCK + "attn.q_bias"),
        (_BLOCK_HF + r"attention\.self\.key\.bias$", _BLOCK + "attn.k_bias"),
        (_BLOCK_HF + r"attention\.self\.value\.bias$", _BLOCK + "attn.v_bias"),
        (_BLOCK_HF + r"attention\.output\.dense\.", _BLOCK + "attn.proj."),
        (_BLOCK_HF + r"intermediate\.dense\.", _BLOCK + "mlp.fc1."),
        (_BLOCK_HF + r"output\.dense\.", _BLOCK + "mlp.fc2."),
        (r"encoder\.layers\.(\d+)\.downsample\.", r"layers.\1.downsample."),
        (r"layernorm\.", "norm."),
        (r"classifier\.", "head."),
        (r"decoder\.0\.", "decoder.0."),
    )
)
"""transformers name (without the ``swinv2.`` prefix) -> official name; the first pattern matching at the start
wins. The one mapping table of this module."""

_DERIVED = ("relative_coords_table", "relative_position_index")
_PREFIX = "swinv2."
_HF_MARKERS = re.compile(r"^(embeddings\.patch_embeddings\.|" + _BLOCK_HF + r"attention\.self\.)")


def _strip_prefix(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


def is_hf_swinv2(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` is in transformers' Swinv2 layout (with or without the ``swinv2.`` prefix of the
    task models). Official-layout dicts, including official SimMIM ones (``encoder.layers.*.attn.*``), are not."""
    return any(isinstance(k, str) and _HF_MARKERS.match(_strip_prefix(k)) for k in state_dict)


def hf_key_to_official(name: str) -> str:
    """One transformers key -> its official name (model-relative, without the SimMIM ``encoder.`` prefix). Names
    the table does not know are returned unchanged, so a loader reports them as unexpected."""
    name = _strip_prefix(name)
    for pattern, repl in _RENAMES:
        match = pattern.match(name)
        if match:
            return match.expand(repl) + name[match.end() :]
    return name


def _fuse_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``attn.{query,key,value}.weight`` -> one ``attn.qkv.weight`` (rows q, k, v, the official order); a
    ``k_bias`` is dropped if zero (the official model has a constant zero there) and rejected otherwise."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        head, _, leaf = name.rpartition("attn.")
        if leaf in ("query.weight", "key.weight", "value.weight"):
            parts.setdefault(head + "attn.", {})[leaf.split(".")[0]] = value
        elif leaf == "k_bias":
            if torch.count_nonzero(value):
                raise ValueError(
                    f"{name}: a non-zero key bias cannot be expressed in the official Swin V2 layout "
                    "(its key projection has a constant zero bias)"
                )
        else:
            out[name] = value
    for prefix, qkv in parts.items():
        if set(qkv) != {"query", "key", "value"}:
            raise ValueError(f"{prefix}: incomplete attention projections, found only {sorted(qkv)}")
        out[prefix + "qkv.weight"] = torch.cat([qkv["query"], qkv["key"], qkv["value"]])
    return out


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a transformers Swinv2 state dict to the official layout.

    ``Swinv2Model`` / ``Swinv2ForImageClassification`` -> the official ``SwinTransformerV2`` keys (``head.*`` from
    ``classifier.*``); ``Swinv2ForMaskedImageModeling`` (recognised by its ``decoder.0.*``) -> the official SimMIM
    keys: ``encoder.*`` including ``encoder.mask_token``, and ``decoder.0.*``.
    """
    if not is_hf_swinv2(state_dict):
        raise ValueError("not a transformers Swinv2 state dict (no embeddings.patch_embeddings.* / attention.self.*)")
    ape = [k for k in state_dict if _strip_prefix(k) == "embeddings.position_embeddings"]
    if ape:
        raise ValueError(
            f"{ape[0]}: transformers' Swinv2 absolute position embeddings (use_absolute_embeddings=True) carry a "
            "class-token row Swin has no place for, and its forward cannot use them; not converted"
        )
    renamed = {hf_key_to_official(name): value for name, value in state_dict.items() if not name.endswith(_DERIVED)}
    state = _fuse_qkv(renamed)
    if any(k.startswith("decoder.") for k in state):
        state = {k if k.startswith("decoder.") else "encoder." + k: v for k, v in state.items()}
    return state


def hf_config_to_kwargs(config: Any, *, num_classes: int = 0) -> dict[str, Any]:
    """``SwinTransformerV2`` keyword arguments equivalent to a transformers ``Swinv2Config`` (the object, its
    ``to_dict()`` or a hub ``config.json`` loaded as a dict). ``num_classes``: 0 for ``Swinv2Model`` /
    ``Swinv2ForMaskedImageModeling``, the label count for ``Swinv2ForImageClassification``.

    Raises ``ValueError`` for settings swinlab's model does not express: an activation other than exact GELU, a
    LayerNorm eps other than 1e-5, absolute position embeddings (see the module docstring)."""
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    problems = []
    if get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act={get('hidden_act')!r} (swinlab's MLP uses exact GELU)")
    if get("layer_norm_eps", 1e-5) != 1e-5:
        problems.append(f"layer_norm_eps={get('layer_norm_eps')} (swinlab's LayerNorms use 1e-5)")
    if get("use_absolute_embeddings", False):
        problems.append("use_absolute_embeddings=True (transformers' own forward cannot use them)")
    if problems:
        raise ValueError("unsupported Swinv2Config: " + "; ".join(problems))
    depths = tuple(get("depths", (2, 2, 6, 2)))
    return {
        "img_size": get("image_size", 224),
        "patch_size": get("patch_size", 4),
        "in_chans": get("num_channels", 3),
        "num_classes": num_classes,
        "embed_dim": get("embed_dim", 96),
        "depths": depths,
        "num_heads": tuple(get("num_heads", (3, 6, 12, 24))),
        "window_size": get("window_size", 7),
        "mlp_ratio": get("mlp_ratio", 4.0),
        "qkv_bias": get("qkv_bias", True),
        "drop_rate": get("hidden_dropout_prob", 0.0),
        "attn_drop_rate": get("attention_probs_dropout_prob", 0.0),
        "drop_path_rate": get("drop_path_rate", 0.1),
        # transformers reads only the first len(depths) entries (its default has four, whatever the depth)
        "pretrained_window_sizes": tuple(get("pretrained_window_sizes", None) or (0,) * len(depths))[: len(depths)],
    }
