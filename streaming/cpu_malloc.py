"""glibc malloc settings for a CPU engine: big buffers are reused, not mapped afresh.

glibc serves an allocation above its mmap threshold (128 KiB at start, rising as it sees big
blocks freed) with freshly mapped pages and unmaps them on free. SNAC's decoder works on
[channels, samples] tensors of 1-10 MB and makes dozens per window, so each of them costs
page faults and the kernel's zeroing. With the threshold at its maximum (32 MiB on 64-bit)
and a high trim threshold, those buffers stay in the heap and are reused. Measured on the
development machine (real-size SNAC decoder, one thread, prepared as in snac_codec): a
10-frame window 201 -> 181 ms, a batch of 8 windows 2115 -> 1723 ms; an LM decode step
unchanged. The cost: the heap keeps up to the trim threshold of free memory around.

Process-wide and applied once. Skipped where the C library is not glibc, and where the user
set one of these through MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_
(their settings win).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024

USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")

_lock = threading.Lock()
_applied: bool | None = None


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


def keep_large_allocations() -> bool:
    """Apply the settings (once per process); returns whether they are in force."""
    global _applied
    with _lock:
        if _applied is None:
            libc = None if any(k in os.environ for k in USER_SETTINGS) else _glibc()
            _applied = libc is not None and all(
                libc.mallopt(param, value) == 1
                for param, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                     (M_TOP_PAD, TOP_PAD)))
        return _applied
