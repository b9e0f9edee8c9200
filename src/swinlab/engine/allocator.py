"""Keep freed CPU memory in the process, so that the next tensor of the same size costs no page faults.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back
with ``munmap`` when freed, and trims the heap top above 128 KiB. A vision model's widest activations are larger than
that (SwinV2-T at batch 8: 48 MiB per MLP hidden map), so every step maps them anew and the kernel zero-fills and
faults in each 4 KiB page on first touch. In a VM that costs more than the arithmetic: a fresh 48 MiB
``gelu_backward`` took 26 ms where writing into an existing buffer took 4.5 ms (Zen 5 guest, 2 threads). Turning off
``mmap`` for large blocks and raising the trim threshold makes freed blocks stay in the heap for reuse; peak RSS is
the same (it is the high-water mark either way, ``benchmarks/RESULTS.md``), but RSS no longer shrinks after a peak.

This is a process-wide switch, so the library never flips it on import: ``swinlab.engine.train`` / ``evaluate`` do
(config ``reuse_cpu_memory``, on by default), and a script of your own can call :func:`reuse_freed_memory`.
"""

from __future__ import annotations

import ctypes
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30
"""Free memory at the heap top that glibc keeps before returning it (bytes)."""


def reuse_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse (no ``mmap`` per large block, trimming only above 1 GiB).
    Returns whether it took effect: ``False`` where the C library is not glibc (macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
