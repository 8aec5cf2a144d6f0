"""CPU memory-allocator tuning for training (glibc ``mallopt``).

A training step on the CPU allocates and frees the same large activation and im2col buffers
every step (SimpleConvNet at batch 256: about 100 MB for the last convolution's output alone).
glibc's malloc serves every block above its mmap threshold (dynamic, at most 32 MiB) with a
fresh ``mmap`` and returns it with ``munmap`` on free, so each step page-faults its buffers in
again: the kernel zeroes every page, which shows up as system time. Raising the mmap and trim
thresholds makes malloc keep those blocks in its heap and reuse them.

The cost is memory: the process keeps its peak heap instead of returning freed blocks to the
system while it runs, which for a training loop (the same peak every step) is what it needs
anyway. Nothing here changes any computed value. Measured in ``docs/benchmarks.md``
(``benchmarks/bench_train_speed.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: mallopt parameter numbers from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks up to this size come from the heap; freed heap memory above this stays with the process
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB (mallopt takes an int)

_applied: int | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Make glibc malloc serve blocks up to ``threshold`` bytes from its heap and keep freed ones.

    Returns True if glibc accepted both settings (then for the rest of the process), False where
    the C library is not glibc (macOS, musl, Windows) and nothing was changed. Calling it again
    with the same threshold does nothing.
    """
    global _applied
    if not 0 < threshold < 1 << 31:
        raise ValueError(f"threshold must be a positive int below 2 GiB (mallopt takes an int), got {threshold}")
    if _applied == threshold:
        return True
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, threshold) == 1
    if ok:
        _applied = threshold
    return ok


def applied() -> int | None:
    """The threshold :func:`keep_freed_memory` set in this process, or None."""
    return _applied
