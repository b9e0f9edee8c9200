"""Building blocks shared by the Swin-family models. Everything public is re-exported here; modules starting
with an underscore and names starting with an underscore are internal."""

from swinlab.layers.attention import LOGIT_SCALE_MAX, WindowAttentionV1, WindowAttentionV2, windowed_sdpa
from swinlab.layers.drop import DropPath, drop_path
from swinlab.layers.gmconv import (
    ConversionReport,
    GMConv2d,
    conv2d_factory,
    convert_to_gmconv,
    fuse_gmconv,
)
from swinlab.layers.linear import Linear
from swinlab.layers.mlp import Mlp
from swinlab.layers.patch import PatchEmbed, PatchMerging, PatchMergingV2, merge_2x2, pad_to_multiple
from swinlab.layers.position import (
    continuous_position_bias,
    cpb_mlp,
    gather_relative_bias,
    log_spaced_coords,
    relative_bias_table_size,
    relative_position_index,
)
from swinlab.layers.windows import (
    MASK_VALUE,
    WindowGeometry,
    clamp_window,
    from_windows,
    to_windows,
    window_geometry,
    window_mask,
    window_partition,
    window_reverse,
    window_token_index,
)

__all__ = [  # noqa: RUF022 - grouped by purpose, not alphabetically
    # window bookkeeping
    "MASK_VALUE",
    "WindowGeometry",
    "clamp_window",
    "from_windows",
    "to_windows",
    "window_geometry",
    "window_mask",
    "window_partition",
    "window_reverse",
    "window_token_index",
    # position bias
    "continuous_position_bias",
    "cpb_mlp",
    "gather_relative_bias",
    "log_spaced_coords",
    "relative_bias_table_size",
    "relative_position_index",
    # attention
    "LOGIT_SCALE_MAX",
    "WindowAttentionV1",
    "WindowAttentionV2",
    "windowed_sdpa",
    # patches, linears, MLP, regularisation
    "DropPath",
    "Linear",
    "Mlp",
    "PatchEmbed",
    "PatchMerging",
    "PatchMergingV2",
    "drop_path",
    "merge_2x2",
    "pad_to_multiple",
    # Gaussian-masked convolution
    "ConversionReport",
    "GMConv2d",
    "conv2d_factory",
    "convert_to_gmconv",
    "fuse_gmconv",
]
