"""FP8-LM mixed precision (issue 3): FP8 formats and scaling, scaled FP8 tensors, FP8 linears, FP8 optimizers,
``initialize`` and ``memory_report``, the FP8 gradient all-reduce (DDP hook) and O3 sharding."""

from swinlab.fp8.amp import clear_flags, found_nonfinite, initialize
from swinlab.fp8.comm import FP8CommState, data_parallel, fp8_allreduce_hook
from swinlab.fp8.formats import E4M3, E5M2, FP8Format, ScalingMeta, compute_scale, saturating_cast
from swinlab.fp8.linear import FP8Linear, scaled_mm
from swinlab.fp8.memory import MemoryReport, memory_report
from swinlab.fp8.optim import FP8SGD, FP8AdamW
from swinlab.fp8.shard import ShardedFP8Linear
from swinlab.fp8.tensor import ScaledFP8, quantize

__all__ = [
    "E4M3",
    "E5M2",
    "FP8SGD",
    "FP8AdamW",
    "FP8CommState",
    "FP8Format",
    "FP8Linear",
    "MemoryReport",
    "ScaledFP8",
    "ScalingMeta",
    "ShardedFP8Linear",
    "clear_flags",
    "compute_scale",
    "data_parallel",
    "found_nonfinite",
    "fp8_allreduce_hook",
    "initialize",
    "memory_report",
    "quantize",
    "saturating_cast",
    "scaled_mm",
]
