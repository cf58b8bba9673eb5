"""glibc malloc settings (streaming/cpu/malloc.py): big blocks come from the heap afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from omni2.streaming.cpu import malloc as cpu_malloc

PROBE = textwrap.dedent("""
    import ctypes, ctypes.util, sys
    from omni2.streaming.cpu.malloc import keep_large_allocations

    class Info(ctypes.Structure):  # struct mallinfo2: ten size_t fields
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = Info

    def mapped_while_holding(size):
        p = libc.malloc(size)
        mapped = libc.mallinfo2().hblks
        libc.free(p)
        return mapped

    before = mapped_while_holding(8 << 20) - libc.mallinfo2().hblks
    applied = keep_large_allocations()
    after = mapped_while_holding(8 << 20) - libc.mallinfo2().hblks
    print(before, applied, after, keep_large_allocations())
""")


def probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60, check=True)
    before, applied, after, again = out.stdout.split()
    return int(before), applied == "True", int(after), again == "True"


@pytest.mark.skipif(cpu_malloc._glibc() is None, reason="not glibc")
def test_an_8_mb_block_is_mapped_afresh_before_and_taken_from_the_heap_after():
    env = {k: v for k, v in os.environ.items() if k not in cpu_malloc.USER_SETTINGS}
    before, applied, after, again = probe(env)
    assert (before, applied, after, again) == (1, True, 0, True)


@pytest.mark.skipif(cpu_malloc._glibc() is None, reason="not glibc")
def test_the_users_own_malloc_settings_win():
    env = dict(os.environ, MALLOC_TOP_PAD_="1048576")
    before, applied, after, _ = probe(env)
    assert (before, applied, after) == (1, False, 1)


RELEASE = textwrap.dedent("""
    import ctypes, ctypes.util, os
    from omni2.streaming.cpu.malloc import keep_large_allocations, release_free_memory

    def rss_mb():
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert keep_large_allocations()
    blocks = [libc.malloc(8 << 20) for _ in range(40)]   # 320 MB from the heap (below the mmap threshold)
    for p in blocks:
        ctypes.memset(p, 1, 8 << 20)
    held = rss_mb()
    for p in blocks[:-1]:   # the last one pins the heap's top: only a trim inside the heap helps
        libc.free(p)
    kept = rss_mb()
    released = release_free_memory()
    print(round(held), round(kept), round(rss_mb()), released)
""")


@pytest.mark.skipif(cpu_malloc._glibc() is None, reason="not glibc")
def test_free_heap_memory_is_kept_until_released():
    env = {k: v for k, v in os.environ.items() if k not in cpu_malloc.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=env, timeout=60,
                         check=True)
    held, kept, after, released = out.stdout.split()
    held, kept, after = int(held), int(kept), int(after)
    assert released == "True"
    assert kept > held - 50, (held, kept)   # freed, but the heap keeps it resident (for reuse)
    assert after < kept - 250, (kept, after)  # malloc_trim gives the pages back
