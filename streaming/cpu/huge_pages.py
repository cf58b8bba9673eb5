"""Big CPU tensors (packed weights, the KV cache) on 2 MiB pages.

A CPU decode step streams every weight of the model once, and on 4 KiB pages that is a TLB
miss every 4 KiB of the stream, hundreds of thousands a step, each a page walk (two levels
of them in a virtual machine). On this project's 2-core Xeon VM the packed body's fp32
matrices through the few_rows kernel, 4 KiB and 2 MiB pages alternating in one process:
2 rows 72 -> 57 ms, 16 rows 100-107 -> 83 ms. The small matrices gained most: a cold
1152x896 fp32 matrix (4 MB) took 440 us a call on 4 KiB pages, with stalls of ~150 us at a
few blocks of it, and 200 us on 2 MiB pages (the 17 MB ones 650-700 us either way).

`empty()` maps anonymous memory, aligned to 2 MiB, and asks for huge pages with
madvise(MADV_HUGEPAGE), which Linux grants where /sys/kernel/mm/transparent_hugepage/enabled
is "always" or "madvise" (the usual default). The tensor keeps the mapping alive and frees it
when it goes. A tensor's last huge page is whole: at most 2 MiB over its size (~100 MB over
the real-size model's 1.5 GB of packed matrices). Anywhere else (not Linux, THP "never", a
tensor under 2 MiB, OMNI2_HUGE_PAGES=0) it is a plain torch.empty: the same values, only
slower to read.
"""
from __future__ import annotations

import functools
import logging
import math
import mmap
import os

import torch

from . import features as cpu_features

log = logging.getLogger("omni2.huge_pages")

HUGE_PAGE = 2 << 20  # (a tensor smaller than one stays in torch's allocator)


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether empty() maps huge pages here (logged once)."""
    if os.environ.get("OMNI2_HUGE_PAGES", "1") == "0":
        log.info("huge pages for big CPU tensors: off (OMNI2_HUGE_PAGES=0)")
        return False
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        log.info("huge pages for big CPU tensors: not on this platform")
        return False
    reason = cpu_features.missing("huge_pages")
    if reason is not None:
        log.info("huge pages for big CPU tensors: not used (%s)", reason)
        return False
    return True


def empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, on 2 MiB pages where available()."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not available():
        return torch.empty(shape, dtype=dtype)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except OSError as exc:  # e.g. a kernel built without THP
        log.info("huge pages for big CPU tensors: madvise refused (%s)", exc)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping until freed
    start = -raw.data_ptr() % HUGE_PAGE  # huge pages need 2 MiB-aligned ranges
    return raw[start : start + nbytes].view(dtype).view(shape)


def zeros(shape: tuple, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled CPU tensor, on 2 MiB pages where available() (e.g. a KV cache, whose
    scattered writes and reads each touch another page)."""
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"huge pages are CPU memory, not {device}")
    return empty(tuple(shape), dtype).zero_()

