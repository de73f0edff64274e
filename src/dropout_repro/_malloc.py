"""Keep the C heap from handing freed tensor buffers back to the OS after every training step.

A step frees and reallocates buffers of a few hundred kilobytes; glibc serves those with fresh
``mmap`` pages and trims the heap on free, so every step pays page faults for memory it has just
released (about 10 % of a CPU epoch here). Raising the two thresholds keeps that memory in the
process. Only glibc has ``mallopt``; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Set glibc's trim and mmap thresholds once; return whether it took effect."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # glibc caps the mmap threshold at 32 MiB on 64-bit (HEAP_MAX/2); ask for that much.
    ok = bool(mallopt(_M_MMAP_THRESHOLD, min(threshold, 32 << 20)))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, threshold)) and ok
    _done = ok
    return ok
