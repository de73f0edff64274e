"""Two process settings that a CPU training run makes before it starts.

- Keep the C heap from handing freed tensor buffers back to the OS after every training step.
  A step frees and reallocates buffers of a few hundred kilobytes; glibc serves those with fresh
  ``mmap`` pages and trims the heap on free, so every step pays page faults for memory it has
  just released (about 10 % of a CPU epoch here). Raising the two thresholds keeps that memory
  in the process. Only glibc has ``mallopt``; elsewhere this does nothing.
- Flush denormal floats to zero. The velocity rows of units that never fire (dead ReLUs are
  common) decay by the momentum every step and pass through the denormal range, below
  1.2e-38, where x86 arithmetic is many times slower: within a few hundred steps the weight
  update took 40 % longer. Values that small move no weight; flushing them changes nothing
  that shows, and the run's summary records it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False
_flushing = False


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


def flush_denormals() -> bool:
    """Treat denormal floats as zero on this thread and the threads it starts (FTZ and DAZ on
    x86); return whether the CPU supports it. Call it before torch starts its worker threads,
    which copy the setting when they are made."""
    global _flushing
    _flushing = bool(torch.set_flush_denormal(True))
    return _flushing


def flushing_denormals() -> bool:
    """Whether ``flush_denormals`` has taken effect in this process."""
    return _flushing
