"""glibc malloc settings for a CPU engine: big buffers are reused, not mapped afresh.

glibc serves an allocation above its mmap threshold (128 KiB at start, rising as it sees big
blocks freed) with freshly mapped pages and unmaps them on free. SNAC's decoder works on
[channels, samples] tensors of 1-10 MB and makes dozens per window, so each of them costs
page faults and the kernel's zeroing. With the threshold at its maximum (32 MiB on 64-bit)
and a high trim threshold, those buffers stay in the heap and are reused. Measured on the
development machine (real-size SNAC decoder, one thread, prepared as in snac_codec): a
10-frame window 201 -> 181 ms, a batch of 8 windows 2115 -> 1723 ms; an LM decode step
unchanged. (Re-measured for issue 19: 8 windows 2646-2741 ms with glibc's defaults, 2062-2392
with these settings, 2658-2689 with a 32 MiB trim threshold: the high trim threshold is part
of the gain.)

The cost is memory the heap keeps, and it adds up: glibc gives threads their own arenas (up
to 8 per core), the encoders run on short-lived threads (cpu_threads) that land on one arena or
another, and each arena keeps its freed blocks and up to the trim threshold at its top. A
server that answered 16 sessions had 213 MB of heap in use and 1.3 GB free but resident
(mallinfo2); a 10-minute soak of 16 sessions grew 36% after its warm-up even with two arenas.
So memory is bounded in two ways: at most `arena_max` arenas (M_ARENA_MAX), and
`release_free_memory()` (malloc_trim(0): free pages go back to the kernel, from every arena,
the middle of the heap included), which the engine runs every `malloc_trim_interval_s`
(EngineConfig) on a thread of its own: a trim takes ~7 ms, and the next big buffers pay their
page faults once, not on every decode.

Process-wide and applied once. Skipped where the C library is not glibc, and where the user
set one of these through MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_TOP_PAD_
(their settings win); MALLOC_ARENA_MAX likewise wins over `arena_max`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 256 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024
ARENA_MAX = 2  # the step thread's and the rest's (the encoders' and vocoder's share)

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


def keep_large_allocations(arena_max: int = ARENA_MAX) -> bool:
    """Apply the settings (once per process: the first call's arena_max wins; 0 = glibc's
    own limit); returns whether they are in force. Call it before threads start allocating
    where possible: arenas that exist already stay."""
    global _applied
    with _lock:
        if _applied is None:
            libc = None if any(k in os.environ for k in USER_SETTINGS) else _glibc()
            settings = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)]
            if arena_max > 0 and "MALLOC_ARENA_MAX" not in os.environ:
                settings.append((M_ARENA_MAX, arena_max))
            _applied = libc is not None and all(libc.mallopt(param, value) == 1 for param, value in settings)
        return _applied


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33: ten size_t fields
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_stats() -> dict | None:
    """Bytes the C heap has in use and holds free (all arenas), or None where glibc cannot say."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "free": info.fordblks}


def release_free_memory() -> bool:
    """Give the heap's free pages back to the kernel (every arena); False where not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
